#!/usr/bin/env python3
"""The next turn of a conversation (BENCHMARKS.md, "The next call of a
conversation copies the last one's KV"): its time to first token through
slinfer's whole path and the `openai-api` function, on each server given,
after the caller has read the last answer for THINK seconds (0: sent as
soon as the last turn ends), paired within a round against the last server
given (the baseline).

    .venv/bin/python scripts/bench-conversation.py [--rounds N] [--think S] URL... BASELINE_URL

Each URL: an `openai-api` function's base on its own server, e.g.
http://127.0.0.1:7100/fn/openai-api/v1. Each round: on every server a
first turn (a document of 240 words and "Summarize it (round).", 64
tokens); THINK seconds; on every server the next turn (that, the answer,
and a question; 4 tokens). Greedy throughout. The servers take their turns
one after another, never at once.

To measure what an idle instance's kept KV gives: `slinfer serve` against
`slinfer serve --idle-kv-tokens 0` with `--think 10` (past the 2 s after
which an idle CPU pool shrinks); what a kept sequence gives at all: one
server's `--think 0` against another's `--think` past its keep-alive, or
`--idle-kv-tokens 0` with `--think 4`.
"""

import argparse
import random
import statistics
import time

import openai

M = "smollm2-135m-instruct"
WORDS = ("river stone market winter lantern orchard copper violin harbor meadow "
         "signal thunder garden mirror castle pepper").split()


def first_token(client, messages):
    t = time.perf_counter()
    s = client.chat.completions.create(model=M, messages=messages, max_tokens=4, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    ttft, usage = None, None
    for ch in s:
        if ttft is None and ch.choices and ch.choices[0].delta.content:
            ttft = time.perf_counter() - t
        if ch.usage:
            usage = ch.usage
    return ttft, usage


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--think", type=float, default=10.0)
    ap.add_argument("urls", nargs="+")
    a = ap.parse_args()
    clients = [openai.OpenAI(base_url=u, api_key="x", max_retries=0, timeout=120) for u in a.urls]
    ttfts = [[] for _ in clients]
    for r in range(a.rounds):
        rnd = random.Random(r)
        doc = " ".join(rnd.choice(WORDS) for _ in range(240))
        turn1 = [{"role": "user", "content": doc + f" Summarize it ({r})."}]
        nexts = []
        for c in clients:
            ans = c.chat.completions.create(model=M, messages=turn1, max_tokens=64, temperature=0)
            nexts.append(turn1 + [{"role": "assistant", "content": ans.choices[0].message.content},
                                  {"role": "user", "content": "Which word comes most often?"}])
        time.sleep(a.think)
        line = []
        for i, (c, turn2) in enumerate(zip(clients, nexts)):
            t, u = first_token(c, turn2)
            ttfts[i].append(t)
            line.append(f"{a.urls[i]}: {t:.3f} s (prompt {u.prompt_tokens}, "
                        f"cached {u.prompt_tokens_details.cached_tokens})")
        base = ttfts[-1][-1]
        print(r, "; ".join(line), "; ratios", " ".join(f"{x[-1] / base:.2f}" for x in ttfts[:-1]),
              flush=True)
    base = ttfts[-1]
    for url, xs in zip(a.urls, ttfts):
        ratios = [x / b for x, b in zip(xs, base)]
        print(f"{url}: median {statistics.median(xs):.3f} s, ratios to the baseline "
              f"{' '.join(f'{q:.2f}' for q in ratios)}, median ratio {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
