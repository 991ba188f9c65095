#!/usr/bin/env python3
"""Whole-path inference benchmark: HTTP -> the `chat` Wasm function ->
slinfer:llm -> scheduler -> OpenVINO engine, against openvino_genai,
interleaved A/B in one run (BENCHMARKS.md).

    .venv/bin/python scripts/bench-inference.py URL MODEL_DIR [TOKENS] [ROUNDS]

URL is a running slinfer with `chat` deployed. GenAI runs in a helper
process (scripts/models/bench_genai.py) that holds LLMPipeline and
ContinuousBatchingPipeline loaded; each round measures, back to back:
slinfer single stream, GenAI single stream, slinfer 8 streams, GenAI CB 8
streams. Both sides get the same prompts, greedy, the chat template, EOS
honoured (so they generate the same tokens). Definitions, the same on both
sides: single-stream decode tok/s = (n - 1) / (last - first token time);
8-stream aggregate tok/s = tokens generated / wall time from submitting to
the last token (prefill included). Prints per-round figures, the medians of
the paired ratios, then TTFT/TPOT percentiles at 1/4/8/16 streams.
"""

import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

PROMPT = "Write a long, detailed story about a dragon who learns to cook."
BATCH = 8


def one(url: str, prompt: str, tokens: int, t0: float, out: list) -> None:
    start = time.perf_counter()
    req = urllib.request.Request(f"{url}/fn/chat/?max_tokens={tokens}&temperature=0",
                                 data=prompt.encode(), method="POST")
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
    out.append({"ttft": first - start, "decode_s": last - first, "n": n,
                "tpot": (last - first) / max(n - 1, 1), "end": last, "start": t0})


def prompts(k: int) -> list:
    return [PROMPT] if k == 1 else [f"{PROMPT} ({i})" for i in range(k)]


def slinfer(url: str, tokens: int, k: int) -> list:
    out: list = []
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(url, p, tokens, t0, out)) for p in prompts(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class GenAI:
    def __init__(self, model_dir: str):
        self.p = subprocess.Popen([sys.executable, "scripts/models/bench_genai.py", model_dir],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.p.stdout.readline())["ready"]

    def ask(self, **cmd) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def main() -> int:
    url, model_dir = sys.argv[1], sys.argv[2]
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    slinfer(url, 8, 1)  # warm-up: loads the model
    slinfer(url, 8, BATCH)
    genai = GenAI(model_dir)
    print("| round | slinfer 1 stream | GenAI LLMPipeline | ratio | slinfer 8 streams | GenAI CB 8 | ratio | slinfer 8 / 1 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    r1, r8, scale = [], [], []
    for k in range(rounds):
        s1 = slinfer(url, tokens, 1)[0]
        s1_tok_s = (s1["n"] - 1) / s1["decode_s"]
        g1 = genai.ask(op="single", prompt=PROMPT, tokens=tokens)
        s8 = slinfer(url, tokens, BATCH)
        s8_tok_s = sum(r["n"] for r in s8) / (max(r["end"] for r in s8) - s8[0]["start"])
        g8 = genai.ask(op="batch", prompts=prompts(BATCH), tokens=tokens)
        r1.append(s1_tok_s / g1["decode_tok_s"])
        r8.append(s8_tok_s / g8["tok_s"])
        scale.append(s8_tok_s / s1_tok_s)
        print(f"| {k + 1} | {s1_tok_s:.1f} ({s1['n']} tok) | {g1['decode_tok_s']:.1f} ({g1['n']} tok) | {r1[-1]:.2f}x "
              f"| {s8_tok_s:.1f} ({sum(r['n'] for r in s8)} tok) | {g8['tok_s']:.1f} ({g8['n']} tok) | {r8[-1]:.2f}x "
              f"| {scale[-1]:.2f}x |", flush=True)
    genai.close()
    print()
    print(f"median paired ratios over {rounds} rounds: single stream {statistics.median(r1):.2f}x "
          f"(min {min(r1):.2f}, max {max(r1):.2f}); 8 streams vs CB {statistics.median(r8):.2f}x "
          f"(min {min(r8):.2f}, max {max(r8):.2f}); 8 streams vs 1 {statistics.median(scale):.2f}x")
    print()
    print("| streams | aggregate tok/s (prefill included) | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) |")
    print("|---:|---:|---:|---:|")
    for n in (1, 4, 8, 16):
        rs = slinfer(url, tokens, n)
        agg = sum(r["n"] for r in rs) / (max(r["end"] for r in rs) - rs[0]["start"])
        print(f"| {n} | {agg:.1f} | {pct([r['ttft'] for r in rs], .5):.2f} / {pct([r['ttft'] for r in rs], .99):.2f} "
              f"| {1000 * pct([r['tpot'] for r in rs], .5):.0f} / {1000 * pct([r['tpot'] for r in rs], .99):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
