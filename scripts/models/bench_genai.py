#!/usr/bin/env python3
"""openvino_genai's side of the inference benchmarks (BENCHMARKS.md), as a
server the benchmark drives between its own measurements (interleaved).

    .venv/bin/python scripts/models/bench_genai.py MODEL_DIR [PROPS] [--prefix-caching]              # server
    .venv/bin/python scripts/models/bench_genai.py MODEL_DIR N BATCH [PROPS] [--prefix-caching]      # one shot

PROPS is a JSON object of CPU properties given to both pipelines (for
example '{"INFERENCE_PRECISION_HINT": "f32"}'); default: none, GenAI's own
defaults. `--prefix-caching` turns on the prefix cache of
`ContinuousBatchingPipeline` (off by default in GenAI): a prompt's blocks
already computed, by a finished request or one running, are reused. Loads `LLMPipeline` and `ContinuousBatchingPipeline` on the CPU
once, then reads one JSON command per line on stdin and answers one JSON
line:

    {"op": "streams", "prompts": [TEXT...], "tokens": N}
        -> {"wall_s": s, "streams": [{"n", "first", "last"}...]}

One prompt runs on `LLMPipeline`, several at once on
`ContinuousBatchingPipeline`. TEXT is used as is (the caller applies the
chat template), greedy, stopping at EOS or after N tokens; "first"/"last"
are the seconds from submission to each stream's first and last token
(LLMPipeline: its streamer's calls; CB: the step after which the token
could be read), measured the way the benchmark measures slinfer's stream.

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


def config(tokens: int, ignore_eos: bool) -> "ov_genai.GenerationConfig":
    cfg = ov_genai.GenerationConfig()
    cfg.max_new_tokens = tokens
    cfg.do_sample = False
    cfg.apply_chat_template = False
    cfg.ignore_eos = ignore_eos
    return cfg


def single(pipe, prompt: str, tokens: int, ignore_eos: bool = False) -> dict:
    times = []

    def streamer(_text):
        times.append(time.perf_counter())
        return ov_genai.StreamingStatus.RUNNING

    t0 = time.perf_counter()
    res = pipe.generate([prompt], config(tokens, ignore_eos), streamer=streamer)
    wall = time.perf_counter() - t0
    n = res.perf_metrics.get_num_generated_tokens()
    # The streamer gets text pieces (a token may wait for the next one to
    # form whole UTF-8): its first and last calls bound the decode.
    return {"wall_s": wall, "streams": [{"n": n, "first": times[0] - t0, "last": times[-1] - t0}]}


def batch(cb, prompts: list, tokens: int, ignore_eos: bool = False) -> dict:
    cfg = config(tokens, ignore_eos)
    t0 = time.perf_counter()
    handles = [cb.add_request(i, p, cfg) for i, p in enumerate(prompts)]
    streams = [{"n": 0, "first": None, "last": None} for _ in prompts]
    while cb.has_non_finished_requests():
        cb.step()
        now = time.perf_counter() - t0
        for h, s in zip(handles, streams):
            if h.can_read():
                got = sum(len(o.generated_ids) for o in h.read().values())
                if got:
                    s["n"] += got
                    s["first"] = s["first"] if s["first"] is not None else now
                    s["last"] = now
    return {"wall_s": time.perf_counter() - t0, "streams": streams}


def run(pipe, cb, prompts: list, tokens: int, ignore_eos: bool = False) -> dict:
    if len(prompts) == 1:
        return single(pipe, prompts[0], tokens, ignore_eos)
    return batch(cb, prompts, tokens, ignore_eos)


def main() -> int:
    args = [a for a in sys.argv if a != "--prefix-caching"]
    model_dir = args[1]
    one_shot = len(args) >= 4
    props_at = 4 if one_shot else 2
    props = json.loads(args[props_at]) if len(args) > props_at else {}
    pipe = ov_genai.LLMPipeline(model_dir, "CPU", **props)
    scheduler = ov_genai.SchedulerConfig()
    scheduler.enable_prefix_caching = "--prefix-caching" in sys.argv
    cb = ov_genai.ContinuousBatchingPipeline(model_dir, scheduler, "CPU", props)
    run(pipe, cb, ["Hello"], 4)  # warm-up
    run(pipe, cb, ["Hello", "Hi"], 4)
    if one_shot:
        n, k = int(args[2]), int(args[3])

        def decode_tok_s(out):
            s = out["streams"][0]
            return (s["n"] - 1) / max(s["last"] - s["first"], 1e-9)

        runs = sorted(decode_tok_s(single(pipe, RAW_PROMPT, n, True)) for _ in range(3))
        cb_out = batch(cb, [f"{RAW_PROMPT} ({i})" for i in range(k)], n, True)
        total = sum(s["n"] for s in cb_out["streams"])
        print(json.dumps({"llm_pipeline_decode_tok_s": runs[1], "cb_batch": k,
                          "cb_aggregate_tok_s": total / cb_out["wall_s"]}))
        return 0
    print(json.dumps({"ready": True, "props": props,
                      "prefix_caching": scheduler.enable_prefix_caching}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "streams":
            out = run(pipe, cb, cmd["prompts"], cmd["tokens"])
        else:
            out = {"error": f"unknown op {cmd.get('op')}"}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
