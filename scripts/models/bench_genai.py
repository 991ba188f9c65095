#!/usr/bin/env python3
"""openvino_genai's side of the inference benchmarks (BENCHMARKS.md), as a
server the benchmark drives between its own measurements (A/B interleaved).

    .venv/bin/python scripts/models/bench_genai.py MODEL_DIR              # server
    .venv/bin/python scripts/models/bench_genai.py MODEL_DIR N BATCH      # one shot

Loads `LLMPipeline` and `ContinuousBatchingPipeline` on the CPU once, then
reads one JSON command per line on stdin and answers one JSON line:

    {"op": "single", "prompt": P, "tokens": N}
        -> {"n": generated, "ttft": s, "decode_tok_s": (n - 1) / (last - first token)}
    {"op": "batch", "prompts": [P...], "tokens": N}
        -> {"n": total generated, "wall_s": s, "tok_s": n / wall_s}

Greedy, the model's chat template applied (as the `chat` function does),
stopping at EOS like slinfer, so both sides generate the same tokens; token
times come from a streamer callback, measured the way the benchmark measures
slinfer's stream (first to last token).

One shot (the engine benchmark, runtime-plugins/openvino/examples/bench.rs):
a raw prompt, EOS ignored, N new tokens; prints one JSON object with the
median single-stream decode tok/s of 3 runs and the aggregate tok/s of
BATCH sequences at once.
"""

import json
import sys
import time

import openvino_genai as ov_genai


RAW_PROMPT = "The history of the city of Paris begins"


def config(tokens: int, chat: bool) -> "ov_genai.GenerationConfig":
    cfg = ov_genai.GenerationConfig()
    cfg.max_new_tokens = tokens
    cfg.do_sample = False
    cfg.apply_chat_template = chat
    cfg.ignore_eos = not chat
    return cfg


def single(pipe, prompt: str, tokens: int, chat: bool = True) -> dict:
    times = []

    def streamer(_text):
        times.append(time.perf_counter())
        return ov_genai.StreamingStatus.RUNNING

    t0 = time.perf_counter()
    res = pipe.generate([prompt], config(tokens, chat), streamer=streamer)
    n = res.perf_metrics.get_num_generated_tokens()
    # The streamer gets text pieces (a token may wait for the next one to
    # form whole UTF-8): its first and last calls bound the decode.
    return {"n": n, "ttft": times[0] - t0,
            "decode_tok_s": (n - 1) / max(times[-1] - times[0], 1e-9)}


def batch(cb, prompts: list, tokens: int, chat: bool = True) -> dict:
    t0 = time.perf_counter()
    res = cb.generate(prompts, [config(tokens, chat)] * len(prompts))
    wall = time.perf_counter() - t0
    # Each result carries the perf metrics of the whole batch.
    n = res[0].perf_metrics.get_num_generated_tokens()
    return {"n": n, "wall_s": wall, "tok_s": n / wall}


def main() -> int:
    model_dir = sys.argv[1]
    pipe = ov_genai.LLMPipeline(model_dir, "CPU")
    cb = ov_genai.ContinuousBatchingPipeline(model_dir, ov_genai.SchedulerConfig(), "CPU")
    single(pipe, "Hello", 4)  # warm-up
    batch(cb, ["Hello"], 4)
    if len(sys.argv) == 4:
        n, k = int(sys.argv[2]), int(sys.argv[3])
        runs = sorted(single(pipe, RAW_PROMPT, n, chat=False)["decode_tok_s"] for _ in range(3))
        cb_out = batch(cb, [f"{RAW_PROMPT} ({i})" for i in range(k)], n, chat=False)
        print(json.dumps({"llm_pipeline_decode_tok_s": runs[1], "cb_batch": k,
                          "cb_aggregate_tok_s": cb_out["tok_s"]}))
        return 0
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "single":
            out = single(pipe, cmd["prompt"], cmd["tokens"])
        elif cmd["op"] == "batch":
            out = batch(cb, cmd["prompts"], cmd["tokens"])
        else:
            out = {"error": f"unknown op {cmd['op']}"}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
