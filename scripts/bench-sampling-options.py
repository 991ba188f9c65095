#!/usr/bin/env python3
"""What the sampling options of `openai-api` cost (BENCHMARKS.md, "Sampling
options"): the same chat completions, 128 tokens each (`ignore_eos`, so every
answer has the same length), plain (greedy), sampled (temperature 0.8,
top_p 0.95), with log-probabilities (chosen only,
and with 20 alternatives), with penalties and a logit bias, and constrained
to a JSON schema or a regular expression (each too long to end before 128
tokens), at 1 and 8 concurrent streams. Then `n=4` choices of one prompt
against four separate requests for it at once, and embeddings per second one
input per request against 16 inputs per request. Modes take turns round by
round so the machine's drift touches each alike; each figure is a ratio to
its baseline from the same run.

    scripts/bench-sampling-options.py BASE_URL [--rounds N]

BASE_URL is the function's `/v1` (`./dev bench-options` starts a release
server, deploys openai-api and runs this).
"""

import argparse
import json
import statistics
import threading
import time
import urllib.request

from benchlib import cpu_name

MODEL = "smollm2-135m-instruct"
TOKENS = 128
MODES = {
    "plain": {},
    "sampled": {"temperature": 0.8, "top_p": 0.95, "seed": 1},
    "logprobs": {"logprobs": True},
    "logprobs+top20": {"logprobs": True, "top_logprobs": 20},
    "penalties+bias": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": {"42": -100}},
    # A constraint decides where the output ends (no ignore_eos): these
    # cannot end before 2,000 characters, far past 128 tokens.
    "json_schema": {"ignore_eos": None, "response_format": {"type": "json_schema", "json_schema": {
        "name": "story", "schema": {"type": "object", "properties": {
            "story": {"type": "string", "minLength": 2000}}, "required": ["story"]}}}},
    "regex": {"ignore_eos": None, "guided_regex": "[A-Z][A-Za-z ,.'\\n]{2000}"},
}


def one(url, extra, i):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Write a long story about lighthouse number {i}."}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }
    req = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=600) as resp:
        r = json.load(resp)
    assert r["usage"]["completion_tokens"] == TOKENS, r["usage"]


def tokens_per_s(url, extra, streams, round_):
    done = []
    threads = [threading.Thread(target=lambda k=k: done.append(one(url, extra, round_ * streams + k)))
               for k in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == streams, "a request failed"
    return streams * TOKENS / (time.perf_counter() - t0)


def post(url, path, body):
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.load(resp)


# A prompt of ~400 tokens: what choices share.
LONG = "The lighthouse keeper counted the waves and wrote each number down. " * 30


def choices_s(url, n, separate, round_):
    """Seconds for n continuations of LONG, as one request or as n at once."""
    body = {"model": MODEL, "prompt": LONG, "max_tokens": TOKENS, "temperature": 1,
            "ignore_eos": True, "seed": round_ * 100}
    t0 = time.perf_counter()
    if separate:
        threads = [threading.Thread(target=post, args=(url, "/completions", {**body, "seed": body["seed"] + k}))
                   for k in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        r = post(url, "/completions", {**body, "n": n})
        assert r["usage"]["completion_tokens"] == n * TOKENS, r["usage"]
    return time.perf_counter() - t0


def embeddings_s(url, batch, total, round_):
    """Seconds to embed `total` inputs, `batch` per request."""
    texts = [f"Sentence number {round_}-{i} about a lighthouse and the sea." for i in range(total)]
    t0 = time.perf_counter()
    for k in range(0, total, batch):
        r = post(url, "/embeddings", {"model": MODEL, "input": texts[k:k + batch], "encoding_format": "base64"})
        assert len(r["data"]) == len(texts[k:k + batch])
    return time.perf_counter() - t0


def report(title, column, unit, seen, base, rate):
    """The median of each mode's figures as a rate, and its ratio to `base`'s."""
    print(f"\n{title}")
    print(f"{column:<16} {unit:>9} {'vs ' + str(base):>14}")
    b = rate(statistics.median(seen[base]))
    for mode, figures in seen.items():
        r = rate(statistics.median(figures))
        print(f"{str(mode):<16} {r:>9.1f} {r / b:>13.3f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rounds = args.rounds
    print(f"CPU: {cpu_name()}")
    one(args.url, {}, 0)  # the instance loaded first
    for streams in (1, 8):
        seen = {m: [] for m in MODES}
        for r in range(rounds):
            for mode, extra in MODES.items():
                seen[mode].append(tokens_per_s(args.url, extra, streams, r))
        report(f"{streams} stream(s), {TOKENS} tokens each, median of {rounds} rounds",
               "mode", "tokens/s", seen, "plain", lambda x: x)
    n = 4
    seen = {"n=4": [], "4 requests": []}
    for r in range(rounds):
        seen["4 requests"].append(choices_s(args.url, n, True, r))
        seen["n=4"].append(choices_s(args.url, n, False, r))
    report(f"{n} continuations of a ~400-token prompt, {TOKENS} tokens each, median of {rounds} rounds",
           "as", "tokens/s", seen, "4 requests", lambda s: n * TOKENS / s)
    total = 32
    seen = {1: [], 16: []}
    for r in range(rounds):
        for batch in seen:
            seen[batch].append(embeddings_s(args.url, batch, total, r))
    report(f"embeddings of {total} short inputs, median of {rounds} rounds",
           "inputs/request", "inputs/s", seen, 1, lambda s: total / s)


if __name__ == "__main__":
    main()
