#!/usr/bin/env python3
"""The next turn of a conversation (BENCHMARKS.md, "The next call of a
conversation copies the last one's KV"): its time to first token when
sent as soon as the last turn ends (the last turn's sequence is still
kept on the instance) against the same messages sent once the idle
instance's KV pool has gone back (4 s later), through slinfer's whole
path and the `openai-api` function, paired within a round.

    .venv/bin/python scripts/bench-conversation.py URL [ROUNDS]

URL: an `openai-api` function's base, e.g.
http://127.0.0.1:7100/fn/openai-api/v1. Each round: a first turn (a
document of 240 words and "Summarize it (round).", 64 tokens), then the
next turn (that, the answer, and a question; 4 tokens) at once, then the
same next turn after 4 s. Greedy throughout.
"""

import random
import statistics
import sys
import time

import openai
url = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
M = "smollm2-135m-instruct"
words = "river stone market winter lantern orchard copper violin harbor meadow signal thunder garden mirror castle pepper".split()
def first_token(messages):
    t = time.perf_counter()
    s = c.chat.completions.create(model=M, messages=messages, max_tokens=4, temperature=0, stream=True,
                                  stream_options={"include_usage": True})
    ttft, usage = None, None
    for ch in s:
        if ttft is None and ch.choices and ch.choices[0].delta.content:
            ttft = time.perf_counter() - t
        if ch.usage:
            usage = ch.usage
    return ttft, usage
warm, cold = [], []
for r in range(rounds):
    rnd = random.Random(r)
    doc = " ".join(rnd.choice(words) for _ in range(240))
    turn1 = [{"role": "user", "content": doc + f" Summarize it ({r})."}]
    a = c.chat.completions.create(model=M, messages=turn1, max_tokens=64, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": a.choices[0].message.content},
                     {"role": "user", "content": "Which word comes most often?"}]
    w, wu = first_token(turn2)
    time.sleep(4)
    k, ku = first_token(turn2)
    warm.append(w); cold.append(k)
    print(r, f"next turn at once {w:.3f} s (prompt {wu.prompt_tokens}, cached {wu.prompt_tokens_details.cached_tokens});"
          f" same messages after idle {k:.3f} s (cached {ku.prompt_tokens_details.cached_tokens}); ratio {w/k:.2f}", flush=True)
    time.sleep(4)
print(f"median: at once {statistics.median(warm):.3f} s, after idle {statistics.median(cold):.3f} s, "
      f"ratios {' '.join(f'{w/k:.2f}' for w, k in zip(warm, cold))}, median ratio {statistics.median([w/k for w, k in zip(warm, cold)]):.2f}")
