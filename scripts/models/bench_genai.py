#!/usr/bin/env python3
"""openvino_genai's side of the engine benchmark (BENCHMARKS.md).

    .venv/bin/python scripts/models/bench_genai.py MODEL_DIR NEW_TOKENS BATCH

Prints one JSON object: single-stream decode tok/s of LLMPipeline (from its
own perf metrics: 1000 / TPOT ms, greedy, EOS ignored) and the aggregate
tok/s of ContinuousBatchingPipeline generating BATCH sequences at once
(generated tokens / wall time, prefill included).
"""

import json
import sys
import time

import openvino_genai as ov_genai

PROMPT = "The history of the city of Paris begins"


def main() -> int:
    model_dir, n, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cfg = ov_genai.GenerationConfig()
    cfg.max_new_tokens = n
    cfg.do_sample = False
    cfg.ignore_eos = True
    cfg.apply_chat_template = False

    pipe = ov_genai.LLMPipeline(model_dir, "CPU")
    pipe.generate(PROMPT, cfg)  # warm-up
    runs = []
    for _ in range(3):
        res = pipe.generate([PROMPT], cfg)
        runs.append(1000.0 / res.perf_metrics.get_tpot().mean)
    del pipe

    cb = ov_genai.ContinuousBatchingPipeline(model_dir, ov_genai.SchedulerConfig(), "CPU")
    prompts = [f"{PROMPT} ({i})" for i in range(batch)]
    cb.generate(prompts[:1], [cfg])  # warm-up
    t = time.perf_counter()
    cb.generate(prompts, [cfg] * batch)
    dt = time.perf_counter() - t
    json.dump({"llm_pipeline_decode_tok_s": sorted(runs)[1],
               "cb_batch": batch, "cb_aggregate_tok_s": batch * n / dt}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
