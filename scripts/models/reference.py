#!/usr/bin/env python3
"""Reference outputs from openvino_genai for slinfer's engine tests.

    .venv/bin/python scripts/models/reference.py MODEL_DIR MAX_NEW_TOKENS < prompts.json > out.json

Reads a JSON list of prompt strings on stdin; writes a JSON list of
{"prompt", "prompt_ids", "tokens", "batched_tokens"}: the prompt as GenAI's
own tokenizer encodes it (no chat template, no added special tokens beyond
the tokenizer's own), the greedy tokens `openvino_genai.LLMPipeline`
generates from those ids one prompt at a time, and the greedy tokens
`openvino_genai.ContinuousBatchingPipeline` generates for all the prompts
submitted at once (EOS ignored, so every list has MAX_NEW_TOKENS tokens).
Both load the package's stateful IR folder, the same weights the engine runs.
Also "text" and "batched_text": GenAI's own decoding of those tokens up to
the first EOS (what a server that stops at EOS answers).
"""

import json
import sys

import numpy as np
import openvino as ov
import openvino_genai as ov_genai


def main() -> int:
    model_dir, max_new = sys.argv[1], int(sys.argv[2])
    prompts = json.load(sys.stdin)
    pipe = ov_genai.LLMPipeline(model_dir, "CPU")
    tok = pipe.get_tokenizer()
    cfg = ov_genai.GenerationConfig()
    cfg.max_new_tokens = max_new
    cfg.do_sample = False
    cfg.ignore_eos = True
    cfg.apply_chat_template = False
    out = []
    for p in prompts:
        enc = tok.encode(p)
        ids = enc.input_ids.data.reshape(-1).astype(np.int64)
        inputs = ov_genai.TokenizedInputs(
            ov.Tensor(ids.reshape(1, -1)), ov.Tensor(np.ones((1, ids.size), dtype=np.int64))
        )
        res = pipe.generate(inputs, cfg)
        out.append({"prompt": p, "prompt_ids": ids.tolist(), "tokens": [int(t) for t in res.tokens[0]]})
    del pipe
    cb = ov_genai.ContinuousBatchingPipeline(model_dir, ov_genai.SchedulerConfig(), "CPU")
    inputs = [ov.Tensor(np.array([o["prompt_ids"]], dtype=np.int64)) for o in out]
    for o, r in zip(out, cb.generate(inputs, [cfg] * len(inputs))):
        o["batched_tokens"] = [int(t) for t in r.m_generation_ids[0]]
    eos = tok.get_eos_token_id()

    def upto_eos(ts):
        return ts[: ts.index(eos)] if eos in ts else ts

    for o in out:
        o["text"] = tok.decode(upto_eos(o["tokens"]), skip_special_tokens=True)
        o["batched_text"] = tok.decode(upto_eos(o["batched_tokens"]), skip_special_tokens=True)
        o["eos_at"] = len(upto_eos(o["tokens"]))
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
