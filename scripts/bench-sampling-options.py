#!/usr/bin/env python3
"""What the sampling options of `openai-api` cost (BENCHMARKS.md, "Sampling
options"): the same chat completions, 128 tokens each (`ignore_eos`, so every
answer has the same length), plain and with log-probabilities (chosen only,
and with 20 alternatives), with penalties and a logit bias, and constrained
to a JSON schema or a regular expression (each too long to end before 128
tokens), at 1 and 8 concurrent streams. Modes take turns round by round so the machine's drift
touches each alike; each figure is a ratio to `plain` from the same run.

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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}")
    one(args.url, {}, 0)  # the instance loaded first
    for streams in (1, 8):
        seen = {m: [] for m in MODES}
        for r in range(args.rounds):
            for mode, extra in MODES.items():
                seen[mode].append(tokens_per_s(args.url, extra, streams, r))
        base = statistics.median(seen["plain"])
        print(f"\n{streams} stream(s), {TOKENS} tokens each, median of {args.rounds} rounds")
        print(f"{'mode':<16} {'tokens/s':>9} {'vs plain':>9}")
        for mode in MODES:
            med = statistics.median(seen[mode])
            print(f"{mode:<16} {med:>9.1f} {med / base:>8.3f}x")


if __name__ == "__main__":
    main()
