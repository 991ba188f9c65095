#!/usr/bin/env python3
"""Whole-path inference benchmark: HTTP -> the `chat` Wasm function ->
slinfer:llm -> scheduler -> OpenVINO engine, against openvino_genai in the
same run (BENCHMARKS.md).

    .venv/bin/python scripts/bench-inference.py URL MODEL_DIR [TOKENS]

URL is a running slinfer with `chat` deployed. Prints a Markdown table:
single-stream decode tok/s (chunk arrival times; greedy), and at 1/4/8/16
concurrent streams the aggregate decode tok/s and TTFT/TPOT p50/p99.
"""

import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

PROMPT = "Write a long, detailed story about a dragon who learns to cook."


def one(url: str, tokens: int, out: list) -> None:
    t0 = time.perf_counter()
    req = urllib.request.Request(f"{url}/fn/chat/?max_tokens={tokens}&temperature=0",
                                 data=PROMPT.encode(), method="POST")
    first = last = None
    usage = None
    with urllib.request.urlopen(req, timeout=600) as resp:
        event = None
        for raw in resp:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                now = time.perf_counter()
                if event == "usage":
                    usage = json.loads(line[6:])
                elif event is None:
                    first = first or now
                    last = now
                else:
                    raise RuntimeError(line)
            elif line == "":
                event = None
    n = usage["generated_tokens"]
    out.append({"ttft": first - t0, "decode_s": last - first, "n": n,
                "tpot": (last - first) / max(n - 1, 1), "end": last, "first": first})


def run(url: str, tokens: int, streams: int) -> list:
    out: list = []
    threads = [threading.Thread(target=one, args=(url, tokens, out)) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    url, model_dir = sys.argv[1], sys.argv[2]
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    run(url, 8, 1)  # warm-up: loads the model
    singles = [run(url, tokens, 1)[0] for _ in range(3)]
    single = statistics.median((r["n"] - 1) / r["decode_s"] for r in singles)
    genai = json.loads(subprocess.check_output(
        [sys.executable, "scripts/models/bench_genai.py", model_dir, str(tokens), "8"]))
    print(f"| single stream | slinfer whole path {single:.1f} tok/s "
          f"({statistics.median(r['n'] for r in singles)} tokens) | GenAI LLMPipeline "
          f"{genai['llm_pipeline_decode_tok_s']:.1f} tok/s | ratio {single / genai['llm_pipeline_decode_tok_s']:.2f}x |")
    print(f"| GenAI ContinuousBatchingPipeline, 8 streams | {genai['cb_aggregate_tok_s']:.1f} tok/s (prefill included) | | |")
    print()
    print("| streams | aggregate decode tok/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) |")
    print("|---:|---:|---:|---:|")
    for n in (1, 4, 8, 16):
        rs = run(url, tokens, n)
        span = max(r["end"] for r in rs) - min(r["first"] for r in rs)
        agg = sum(r["n"] - 1 for r in rs) / span
        print(f"| {n} | {agg:.1f} | {pct([r['ttft'] for r in rs], .5):.2f} / {pct([r['ttft'] for r in rs], .99):.2f} "
              f"| {1000 * pct([r['tpot'] for r in rs], .5):.0f} / {1000 * pct([r['tpot'] for r in rs], .99):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
