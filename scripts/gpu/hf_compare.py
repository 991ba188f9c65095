#!/usr/bin/env python3
"""Check slinfer's CUDA engine against Hugging Face transformers on the GPU.

Builds a small random-weight Llama with transformers, saves it as safetensors
(f16 or bf16), runs `slinfer-cuda-bench logits` on it (prefill + N greedy
decode steps), then runs transformers in float32 on the same weights over the
same token sequence and compares every step's last-position logits: max
absolute error, max error relative to the logits' scale, and top-1
agreement. Also checks transformers' own greedy continuation against ours.

Usage: hf_compare.py --bench PATH/slinfer-cuda-bench --out result.json
Exit status 0 when top-1 agreement >= 90% and relative error <= 5%.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--dtype", choices=["f16", "bf16"], default="f16")
    a = ap.parse_args()

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        initializer_range=0.05,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    dt = torch.float16 if a.dtype == "f16" else torch.bfloat16
    model = model.to(dt)
    d = tempfile.mkdtemp(prefix="slinfer-hf-")
    model.save_pretrained(d)
    print("saved", d, sorted(os.listdir(d)), file=sys.stderr)

    prompt = [1] + [int(x) for x in torch.randint(3, cfg.vocab_size, (23,))]
    ours_path = os.path.join(d, "ours.json")
    t0 = time.time()
    r = subprocess.run(
        [a.bench, "logits", "--model", d, "--prompt", ",".join(map(str, prompt)),
         "--decode", str(a.decode), "--out", ours_path, "--dtype", a.dtype],
        capture_output=True, text=True)
    print(r.stderr, file=sys.stderr)
    if r.returncode != 0:
        json.dump({"ok": False, "error": r.stderr[-2000:]}, open(a.out, "w"))
        return 1
    ours_s = time.time() - t0
    ours = json.load(open(ours_path))
    gen = ours["generated"]
    seq = prompt + gen
    ref = model.float().to("cuda").eval()
    with torch.no_grad():
        logits = ref(torch.tensor([seq], device="cuda")).logits[0].float().cpu()
        hf_gen = ref.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=a.decode,
                              do_sample=False, min_new_tokens=a.decode)[0, len(prompt):].tolist()
    steps = []
    for i, ol in enumerate(ours["logits"]):
        o = torch.tensor(ol)
        h = logits[len(prompt) - 1 + i]
        err = (o - h).abs().max().item()
        scale = max(1.0, h.abs().max().item())
        steps.append({"step": i, "max_abs_err": err, "rel_err": err / scale,
                      "top1_agree": int(o.argmax()) == int(h.argmax())})
    agree = sum(s["top1_agree"] for s in steps) / len(steps)
    same_prefix = 0
    for x, y in zip(gen, hf_gen):
        if x != y:
            break
        same_prefix += 1
    summary = {
        "ok": agree >= 0.9 and max(s["rel_err"] for s in steps) <= 0.05,
        "dtype": a.dtype,
        "device": torch.cuda.get_device_name(0),
        "steps": len(steps),
        "prefill_max_abs_err": steps[0]["max_abs_err"],
        "max_abs_err": max(s["max_abs_err"] for s in steps),
        "max_rel_err": max(s["rel_err"] for s in steps),
        "top1_agreement": agree,
        "greedy_tokens_same_as_hf_prefix": same_prefix,
        "ours_seconds": ours_s,
        "per_step": steps,
    }
    json.dump(summary, open(a.out, "w"), indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_step"}))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
