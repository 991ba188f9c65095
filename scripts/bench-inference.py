#!/usr/bin/env python3
"""CPU inference benchmark, interleaved in one run (BENCHMARKS.md): slinfer's
whole path (HTTP -> the `chat` Wasm function -> slinfer:llm -> scheduler ->
CPU engine) against OpenVINO GenAI and llama.cpp on the same model,
prompts and cores.

    .venv/bin/python scripts/bench-inference.py LABEL=URL [LABEL=URL...] MODEL_DIR [--tokens N]
        [--rounds R] [--streams 1,4,8,16] [--genai-props JSON] [--threads T]
        [--genai-prefix-caching]

`./dev bench-llm` sets everything up and runs it. Each URL is a running
slinfer with `chat` deployed, measured as the side LABEL (`./dev bench-llm`
runs three: `slinfer/openvino`, `slinfer/llama.cpp` and `slinfer/paired`,
one per `--cpu-engine`); MODEL_DIR the imported model package (its
`model.gguf` is what llama.cpp runs, its IR what GenAI runs). The other two
run in helper processes held loaded for the whole run:
scripts/models/bench_genai.py (`LLMPipeline` for one stream,
`ContinuousBatchingPipeline` for several, with --genai-props as CPU
properties) and scripts/llama-cpp/anchor.mjs (the prebuilt llama.cpp of the
npm package node-llama-cpp, T threads, one context with a sequence per
stream). `--genai-prefix-caching` adds a third anchor, `genai+prefix-cache`:
GenAI's `ContinuousBatchingPipeline` with its prefix cache on (GenAI's
default is off), which reuses the blocks of a prompt's start that any
earlier or running request computed (slinfer shares a common start only
among the prompts of one prefill).

Each round runs every stream count on every side back to back, the order of
the sides rotating from round to round. All sides get the same text (the
model's chat template applied to the same user prompts), greedy, stopping
at EOS or N tokens. Definitions, the same on every side: a stream's decode
tok/s = (n - 1) / (last - first token time), its TPOT the inverse; the
aggregate tok/s of K streams = tokens generated / wall time from submission
to the last token (prefill included). The headline figure is decode tok/s
at one stream and aggregate tok/s at several; ratios are paired within a
round and summarised by their median (min-max).
"""

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchlib import chat_stream, cpu_name

PROMPT = "Write a long, detailed story about a dragon who learns to cook."


def user_prompts(k: int) -> list:
    return [PROMPT] if k == 1 else [f"{PROMPT} ({i})" for i in range(k)]


def one(url: str, prompt: str, tokens: int, t0: float, out: list) -> None:
    out.append(chat_stream(url, prompt, tokens, t0))


def slinfer(url: str, prompts: list, tokens: int) -> dict:
    out: list = []
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(url, p, tokens, t0, out)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(out) != len(prompts):
        raise RuntimeError("a slinfer stream failed")
    return {"wall_s": max(s["last"] for s in out), "streams": out}


class Helper:
    """A helper process answering one JSON line per JSON line."""

    def __init__(self, argv: list):
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{argv[1]} exited before it was ready")
        self.hello = json.loads(line)

    def ask(self, cmd: dict) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        out = json.loads(self.p.stdout.readline())
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def decode_tok_s(s: dict) -> float:
    return (s["n"] - 1) / max(s["last"] - s["first"], 1e-9)


def headline(run: dict) -> float:
    streams = run["streams"]
    if len(streams) == 1:
        return decode_tok_s(streams[0])
    return sum(s["n"] for s in streams) / run["wall_s"]


def median_range(xs: list) -> str:
    return f"{statistics.median(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("servers", nargs="+", metavar="LABEL=URL")
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--streams", default="1,4,8,16")
    ap.add_argument("--genai-props", default='{"INFERENCE_PRECISION_HINT": "f32"}')
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--genai-prefix-caching", action="store_true")
    args = ap.parse_args()
    counts = [int(k) for k in args.streams.split(",")]
    servers = dict(s.split("=", 1) for s in args.servers)
    ours = tuple(servers)
    anchors = ("genai", "llama.cpp") + (("genai+prefix-cache",) if args.genai_prefix_caching else ())
    sides = ours + anchors

    import openvino_genai as ov_genai

    tok = ov_genai.Tokenizer(str(args.model_dir))
    templated = {k: [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                     for p in user_prompts(k)] for k in counts}
    here = Path(__file__).parent
    genai_argv = [sys.executable, str(here / "models/bench_genai.py"), str(args.model_dir), args.genai_props]
    genai = Helper(genai_argv)
    cached = Helper(genai_argv + ["--prefix-caching"]) if args.genai_prefix_caching else None
    llama = Helper(["node", str(here / "llama-cpp/anchor.mjs"), str(args.model_dir / "model.gguf"),
                    str(args.threads)])
    runners = {label: (lambda k, url=url: slinfer(url, user_prompts(k), args.tokens))
               for label, url in servers.items()}
    runners |= {
        "genai": lambda k: genai.ask({"op": "streams", "prompts": templated[k], "tokens": args.tokens}),
        "llama.cpp": lambda k: llama.ask({"prompts": templated[k], "tokens": args.tokens}),
    }
    if cached:
        runners["genai+prefix-cache"] = lambda k: cached.ask(
            {"op": "streams", "prompts": templated[k], "tokens": args.tokens})
    for side in sides:  # warm-up: loads slinfer's instance, touches every path
        for k in counts:
            runners[side](k)

    print(f"CPU: {cpu_name()}")
    print(f"GenAI properties: {genai.hello['props']}; llama.cpp: {llama.hello['version']['release']}, "
          f"{args.threads} threads; {args.tokens} tokens per stream, {args.rounds} rounds")
    print()
    ratios = [(o, a) for o in ours for a in anchors]
    print("| round | streams | " + " | ".join(sides) + " | "
          + " | ".join(f"{o} / {a}" for o, a in ratios) + " |")
    print("|---:|---:|" + "---:|" * (len(sides) + len(ratios)))
    results = {(side, k): [] for side in sides for k in counts}
    for r in range(args.rounds):
        order = sides[r % len(sides):] + sides[:r % len(sides)]
        for k in counts:
            got = {side: runners[side](k) for side in order}
            for side in sides:
                results[side, k].append(got[side])
            h = {side: headline(got[side]) for side in sides}
            print(f"| {r + 1} | {k} | " + " | ".join(f"{h[s]:.1f}" for s in sides) + " | "
                  + " | ".join(f"{h[o] / h[a]:.2f}x" for o, a in ratios) + " |", flush=True)
    genai.close()
    llama.close()
    if cached:
        cached.close()

    print()
    print("Headline: decode tok/s of one stream; aggregate tok/s (prefill included) of several. "
          "Medians over the rounds; ratios paired within a round.")
    print()
    names = " / ".join(sides)
    print("| streams | " + " | ".join(sides) + " | " + " | ".join(f"{o} / {a}" for o, a in ratios)
          + f" | TPOT p50 ms ({names}) | TTFT p50 s ({names}) |")
    print("|---:|" + "---:|" * (len(sides) + len(ratios) + 2))
    for k in counts:
        h = {side: [headline(x) for x in results[side, k]] for side in sides}
        paired = [median_range([a / b for a, b in zip(h[o], h[a])]) for o, a in ratios]
        tpot = {side: statistics.median(1000 / decode_tok_s(s) for x in results[side, k] for s in x["streams"])
                for side in sides}
        ttft = {side: statistics.median(s["first"] for x in results[side, k] for s in x["streams"])
                for side in sides}
        print(f"| {k} | " + " | ".join(f"{statistics.median(h[s]):.1f}" for s in sides) + " | "
              + " | ".join(paired) + " | "
              + " / ".join(f"{tpot[s]:.1f}" for s in sides) + " | "
              + " / ".join(f"{ttft[s]:.3f}" for s in sides) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
