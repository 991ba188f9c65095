#!/usr/bin/env python3
"""Reference answers and greedy checks from OpenVINO for slinfer's tests.

    .venv/bin/python scripts/models/reference.py generate MODEL_DIR MAX_NEW_TOKENS < prompts.json
    .venv/bin/python scripts/models/reference.py check MODEL_DIR NEAR_TIE_LOGITS < answers.json
    .venv/bin/python scripts/models/reference.py hidden MODEL_DIR last < prompts.json

`generate` reads a JSON list of prompt strings and writes a JSON list of
{"prompt", "prompt_ids", "tokens", "batched_tokens", "text", "batched_text",
"eos_at"}: the prompt as GenAI's own tokenizer encodes it (no chat template),
the greedy tokens `openvino_genai.LLMPipeline` generates from those ids one
prompt at a time, and those `openvino_genai.ContinuousBatchingPipeline`
generates for all the prompts submitted at once (EOS ignored, so every list
has MAX_NEW_TOKENS tokens); "text"/"batched_text" are GenAI's decoding of them
up to the first EOS, "eos_at" the index of that EOS (or MAX_NEW_TOKENS).
LLMPipeline runs the paged-attention backend (pinned: `ATTENTION_BACKEND=PA`)
in f32 (slinfer's default `--cpu-precision`, given to both pipelines), the
same graph and kernels slinfer's CPU engine runs, so one sequence at a
time is a like-for-like comparison; batched kernels differ from the
single-row ones, so batched answers are compared like for like only when the
batch is composed the same way.

`check` tells whether answers are greedy answers of the model on any CPU. It
reads a JSON list of answers, each with the prompt as "prompt" (raw text,
encoded as `generate` does) or "messages" (rendered with the model's chat
template and a generation prompt), and the answer as "tokens" (ids) or "text"
(walked token by token), plus optional "finish" ("stop": the answer ended
with an end-of-sequence token; "length": it was cut) and "generated_tokens"
(the count the server reported). It teacher-forces the answer through the
model's stateful IR compiled in full precision (f32 arithmetic, f32 KV, no
dynamic quantisation) and accepts each token whose f32 logit is within
NEAR_TIE_LOGITS of the best one: engines running bf16 or batched kernels flip
such near-ties, and nothing else. It writes one verdict per answer:
{"ok", "steps", "near_ties": [{"step", "token", "piece", "best", "best_piece",
"gap"}], "error"}.

`hidden` reads a JSON list of prompt strings and writes, for each, the input
of the model's LM head (its final norm's output) at the prompt's last token
in the stateful IR in full precision, [{"prompt", "prompt_ids", "hidden"}]:
what slinfer's embeddings are (before normalising).
"""

import json
import sys
import tomllib

import numpy as np
import openvino as ov
import openvino_genai as ov_genai

# What slinfer's CPU engine computes in by default (`--cpu-precision`).
ENGINE_PROPS = {"INFERENCE_PRECISION_HINT": "f32"}

# Candidates considered at each step of a text walk (those within the
# near-tie distance, best first); more than a handful never come that close.
MAX_CANDIDATES = 8


def generate(model_dir: str, max_new: int, prompts: list[str]) -> list[dict]:
    pipe = ov_genai.LLMPipeline(model_dir, "CPU", ATTENTION_BACKEND="PA", **ENGINE_PROPS)
    tok = pipe.get_tokenizer()
    cfg = ov_genai.GenerationConfig()
    cfg.max_new_tokens = max_new
    cfg.do_sample = False
    cfg.ignore_eos = True
    cfg.apply_chat_template = False
    out = []
    for p in prompts:
        ids = tok.encode(p).input_ids.data.reshape(-1).astype(np.int64)
        inputs = ov_genai.TokenizedInputs(
            ov.Tensor(ids.reshape(1, -1)), ov.Tensor(np.ones((1, ids.size), dtype=np.int64))
        )
        res = pipe.generate(inputs, cfg)
        out.append({"prompt": p, "prompt_ids": ids.tolist(), "tokens": [int(t) for t in res.tokens[0]]})
    del pipe
    cb = ov_genai.ContinuousBatchingPipeline(model_dir, ov_genai.SchedulerConfig(), "CPU", ENGINE_PROPS)
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
    return out


class F32Model:
    """The stateful IR in full precision, fed one chunk at a time."""

    def __init__(self, model_dir: str, hidden: bool = False):
        core = ov.Core()
        model = core.read_model(f"{model_dir}/openvino_model.xml")
        if hidden:
            # The LM head's input, as a second output.
            lm_head = model.output("logits").get_node().input_value(0).get_node()
            self.hidden_output = model.add_outputs([lm_head.input_value(0)])[0]
        self.compiled = core.compile_model(
            model,
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": "f32",
                "KV_CACHE_PRECISION": "f32",
                "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0",
            },
        )
        self.tokenizer = ov_genai.Tokenizer(model_dir)
        # The tokens the host ends a generation at (model.toml).
        with open(f"{model_dir}/model.toml", "rb") as f:
            self.eos = set(tomllib.load(f)["config"]["eos_token_ids"])

    def start(self):
        self.request = self.compiled.create_infer_request()
        self.request.reset_state()
        self.position = 0

    def feed(self, ids: list[int]) -> np.ndarray:
        """Appends `ids`; returns the logits after each of them ([len(ids), vocab])."""
        n = len(ids)
        self.request.infer(
            {
                "input_ids": np.array([ids], dtype=np.int64),
                "attention_mask": np.ones((1, self.position + n), dtype=np.int64),
                "position_ids": np.arange(self.position, self.position + n, dtype=np.int64)[None],
                "beam_idx": np.zeros(1, dtype=np.int32),
            }
        )
        self.position += n
        return self.request.get_tensor("logits").data[0].copy()

    def prompt_ids(self, answer: dict) -> list[int]:
        if "messages" in answer:
            text = self.tokenizer.apply_chat_template(answer["messages"], add_generation_prompt=True)
        else:
            text = answer["prompt"]
        return [int(t) for t in self.tokenizer.encode(text).input_ids.data.reshape(-1)]

    def piece(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def near_tie(model: F32Model, step: int, logits: np.ndarray, token: int) -> dict:
    best = int(np.argmax(logits))
    return {
        "step": step,
        "token": token,
        "piece": model.piece([token]),
        "best": best,
        "best_piece": model.piece([best]),
        "gap": float(logits[best] - logits[token]),
    }


def check_one(model: F32Model, answer: dict, eps: float) -> dict:
    model.start()
    prompt = model.prompt_ids(answer)
    logits = model.feed(prompt)[-1]
    tokens = answer.get("tokens")
    text = answer.get("text")
    finish = answer.get("finish")
    accepted: list[int] = []
    ties: list[dict] = []

    def verdict(error=None):
        if error is None and answer.get("generated_tokens") not in (None, len(accepted)):
            error = f"the server reported {answer['generated_tokens']} tokens; the answer is {len(accepted)}"
        return {"ok": error is None, "steps": len(accepted), "near_ties": ties, "error": error}

    def take(token: int):
        nonlocal logits
        if token != int(np.argmax(logits)):
            ties.append(near_tie(model, len(accepted), logits, token))
        accepted.append(token)
        logits = model.feed([token])[-1]

    def within(token: int) -> bool:
        return bool(logits.max() - logits[token] <= eps)

    def describe(prefix: str) -> str:
        top = np.argsort(-logits)[:5]
        alts = ", ".join(f"{model.piece([int(t)])!r} {logits[t] - logits.max():+.3f}" for t in top)
        return f"{prefix} at step {len(accepted)} (after {model.piece(accepted)!r}); the f32 model's best: {alts}"

    if tokens is not None:
        for t in tokens:
            if not within(t):
                return verdict(describe(f"token {t} ({model.piece([t])!r}) is not a greedy choice"))
            take(t)
    else:
        while model.piece(accepted) != text:
            done = model.piece(accepted)
            order = [int(t) for t in np.argsort(-logits)[:MAX_CANDIDATES] if within(int(t))]
            chosen = None
            for t in order:
                if t in model.eos:
                    continue
                # A token holding part of a UTF-8 character decodes to U+FFFD
                # until the next token completes it.
                decoded = model.piece(accepted + [t])
                piece = decoded.rstrip("\ufffd")
                partial = piece != decoded and len(text) > len(done) and not text[len(done)].isascii()
                if text.startswith(piece) and (len(piece) > len(done) or partial):
                    chosen = t
                    break
            if chosen is None:
                return verdict(describe(f"no greedy token continues the answer with {text[len(done):]!r}"))
            take(chosen)
            if len(accepted) > 4 * len(text) + 8:
                return verdict(describe("the walk does not end"))
    if finish == "stop" and not any(within(e) for e in model.eos):
        return verdict(describe("the answer stopped where end-of-sequence is not a greedy choice"))
    return verdict()


def hidden(model_dir: str, prompts: list[str]) -> list[dict]:
    model = F32Model(model_dir, hidden=True)
    out = []
    for p in prompts:
        ids = model.prompt_ids({"prompt": p})
        model.start()
        model.feed(ids)
        width = model.hidden_output.get_partial_shape()[-1].get_length()
        h = model.request.get_tensor(model.compiled.outputs[-1]).data.reshape(-1, width)
        out.append({"prompt": p, "prompt_ids": ids, "hidden": [float(x) for x in h[-1]]})
    return out


def check(model_dir: str, eps: float, answers: list[dict]) -> list[dict]:
    model = F32Model(model_dir)
    return [check_one(model, a, eps) for a in answers]


def main() -> int:
    usage = ("usage: reference.py generate MODEL_DIR MAX_NEW_TOKENS | check MODEL_DIR NEAR_TIE_LOGITS"
             " | hidden MODEL_DIR last (JSON on stdin)")
    if len(sys.argv) != 4 or sys.argv[1] not in ("generate", "check", "hidden") \
            or (sys.argv[1] == "hidden" and sys.argv[3] != "last"):
        print(usage, file=sys.stderr)
        return 2
    mode, model_dir, arg = sys.argv[1:]
    items = json.load(sys.stdin)
    if mode == "generate":
        out = generate(model_dir, int(arg), items)
    elif mode == "hidden":
        out = hidden(model_dir, items)
    else:
        out = check(model_dir, float(arg), items)
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
