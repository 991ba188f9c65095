#!/usr/bin/env python3
"""The whole path on a GPU: `slinfer serve --devices cuda:0` → the
`openai-api` function → slinfer:llm → scheduler → the CUDA engine, checked
against Hugging Face transformers on the same weights. Runs on the device
machine (python3 with torch, transformers, tokenizers, requests; no Rust,
no OpenVINO).

    whole_path.py --slinfer BIN --package DIR --out DIR

DIR is the built `openai-api` package. Steps, each recorded in
OUT/whole_path.json:

1. Two small random-weight Llamas ("gpu-a", "gpu-b") made with transformers
   and written as slinfer model packages (f32 safetensors with Hugging Face
   names, a byte-level tokenizer, model.toml). Only printable-ASCII tokens
   keep output rows, so generations are plain ASCII and text maps back to
   token ids exactly.
2. `slinfer serve --devices cuda:0` on them; `openai-api` deployed for both.
3. Greedy: /v1/completions for a few prompts; every returned token must be
   transformers' (float32) greedy choice after the tokens before it, or
   within a near-tie of it (f16 on the GPU flips only near-ties).
4. Two models on one GPU at once: /v1/status shows both on cuda:0.
5. A burst of 32 streams on gpu-a: all finish; the batch on the GPU and its
   KV pool grow (sampled from /v1/status), and the pool shrinks after.

Exit status 0 when every check passes.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import requests
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM

SPECIALS = ["<pad>", "<s>", "</s>"]
VOCAB = len(SPECIALS) + 256
PROMPTS = ["The quick brown fox", "def main():", "Once upon a time", "1, 2, 3,"]
TOKENS = 32
# A token counts as a greedy choice within this fraction of the logits'
# scale (the CUDA engine's f16 vs transformers' f32).
NEAR_TIE = 0.02


def tokenizer() -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({c: len(SPECIALS) + i for i, c in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok


def make_model(seed: int, tok: Tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, initializer_range=0.05,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
        for i in range(VOCAB):
            text = tok.decode([i], skip_special_tokens=False)
            if not (len(text) == 1 and 0x20 <= ord(text) < 0x7F):
                model.lm_head.weight[i].zero_()
    return model


def write_package(root: str, name: str, model: LlamaForCausalLM, tok: Tokenizer) -> None:
    d = os.path.join(root, name)
    tmp = tempfile.mkdtemp(prefix="hf-")
    model.save_pretrained(tmp, safe_serialization=True)
    os.makedirs(d)
    shutil.copy(os.path.join(tmp, "model.safetensors"), os.path.join(d, "model.safetensors"))
    tok.save(os.path.join(d, "tokenizer.json"))
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 2
    with open(os.path.join(d, "model.toml"), "w") as f:
        f.write(f'''format_version = 1
name = "{name}"
source = "random Llama from transformers (scripts/gpu/whole_path.py)"
kv_bytes_per_token = {kv}

[files]
safetensors = "model.safetensors"
tokenizer = "tokenizer.json"

[config]
family = "llama"
num_layers = {c.num_hidden_layers}
num_heads = {c.num_attention_heads}
num_kv_heads = {c.num_key_value_heads}
head_dim = {head_dim}
hidden_size = {c.hidden_size}
intermediate_size = {c.intermediate_size}
vocab_size = {c.vocab_size}
context_length_tokens = {c.max_position_embeddings}
rope_theta = {c.rope_theta}
rms_norm_eps = {c.rms_norm_eps}
bos_token_id = 1
eos_token_ids = [2]
tie_word_embeddings = false
attention_bias = false
''')


class Server:
    def __init__(self, binary: str, root: str):
        self.data = os.path.join(root, "data")
        self.log = open(os.path.join(root, "server.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--listen", "127.0.0.1:0", "--data-dir", self.data,
             "--models-dir", os.path.join(root, "models"), "--devices", "cuda:0"],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.url = None
        for line in self.proc.stdout:
            if line.startswith("listening on "):
                self.url = line.split()[-1]
                break
        if not self.url:
            raise RuntimeError("slinfer exited before listening; see server.log")
        with open(os.path.join(self.data, "admin-token")) as f:
            self.token = f.read().strip()

    def status(self) -> dict:
        r = requests.get(f"{self.url}/v1/status", headers={"authorization": f"Bearer {self.token}"})
        r.raise_for_status()
        return r.json()["inference"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def deploy(binary: str, server: Server, package: str, root: str) -> None:
    d = os.path.join(root, "openai-api")
    shutil.copytree(package, d)
    p = os.path.join(d, "slinfer.toml")
    text = open(p).read().replace('"smollm2-135m-instruct"', '"gpu-a", "gpu-b"')
    text = text.replace('MODELS = "smollm2-135m-instruct"', 'MODELS = "gpu-a,gpu-b"')
    open(p, "w").write(text)
    subprocess.run([binary, "deploy", d, "--server", server.url, "--data-dir", server.data],
                   check=True)


def complete(server: Server, model: str, prompt: str, tokens: int) -> dict:
    r = requests.post(f"{server.url}/fn/openai-api/v1/completions",
                      json={"model": model, "prompt": prompt, "max_tokens": tokens,
                            "temperature": 0}, timeout=300)
    r.raise_for_status()
    return r.json()


def check_greedy(model, tok, prompt: str, text: str) -> dict:
    """Teacher-forces prompt + answer through the f32 model."""
    p = tok.encode(prompt).ids
    a = tok.encode(text).ids
    assert tok.decode(a) == text, "the answer does not map back to tokens"
    ids = torch.tensor([p + a], device="cuda")
    with torch.no_grad():
        logits = model(ids).logits[0, len(p) - 1:len(p) + len(a) - 1].float()
    best = logits.max(dim=-1).values
    chosen = logits[torch.arange(len(a)), torch.tensor(a, device="cuda")]
    scale = logits.abs().max().item()
    gaps = (best - chosen) / max(scale, 1.0)
    return {"tokens": len(a), "exact": int((gaps == 0).sum().item()),
            "max_gap_rel": float(gaps.max().item()), "ok": bool((gaps <= NEAR_TIE).all().item())}


def burst(server: Server, n: int, tokens: int) -> dict:
    results, samples, stop = [], [], threading.Event()

    def one(i):
        t0 = time.perf_counter()
        first = last = None
        chunks = 0
        with requests.post(f"{server.url}/fn/openai-api/v1/completions",
                           json={"model": "gpu-a", "prompt": f"stream {i}", "max_tokens": tokens,
                                 "temperature": 0, "stream": True}, stream=True, timeout=300) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith(b"data: ") and line != b"data: [DONE]":
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
        results.append({"ttft": first - t0, "decode_s": last - first, "chunks": chunks, "end": last, "start": t0})

    def sample():
        while not stop.is_set():
            s = server.status()
            for m in s["models"]:
                if m["name"] == "gpu-a":
                    for i in m["instances"]:
                        samples.append((i["batch"], i["kv_blocks_committed"]))
            time.sleep(0.02)

    def committed():
        return sum(i["kv_blocks_committed"] for m in server.status()["models"]
                   if m["name"] == "gpu-a" for i in m["instances"])

    idle = committed()
    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    peak_batch = max(b for b, _ in samples)
    peak_kv = max(c for _, c in samples)
    after = committed()
    for _ in range(100):
        if after < peak_kv:
            break
        time.sleep(0.1)
        after = committed()
    total = sum(r["chunks"] for r in results)
    return {"streams": n, "finished": len(results), "wall_s": wall, "aggregate_chunks_per_s": total / wall,
            "peak_batch": peak_batch, "kv_blocks_idle": idle, "kv_blocks_peak": peak_kv,
            "kv_blocks_after": after,
            "ttft_p50_s": sorted(r["ttft"] for r in results)[n // 2],
            "ok": len(results) == n and peak_batch >= 8 and peak_kv > idle and after < peak_kv}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slinfer", required=True)
    ap.add_argument("--package", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    root = tempfile.mkdtemp(prefix="slinfer-whole-")
    os.makedirs(os.path.join(root, "models"))
    tok = tokenizer()
    hf = {}
    for seed, name in enumerate(["gpu-a", "gpu-b"]):
        hf[name] = make_model(seed, tok)
        write_package(os.path.join(root, "models"), name, hf[name], tok)
        hf[name] = hf[name].cuda().eval()
    result = {}
    server = Server(a.slinfer, root)
    try:
        deploy(a.slinfer, server, a.package, root)
        result["devices"] = server.status()["devices"]
        greedy = []
        for model in ["gpu-a", "gpu-b"]:
            for p in PROMPTS:
                r = complete(server, model, p, TOKENS)
                text = r["choices"][0]["text"]
                greedy.append({"model": model, "prompt": p, "text": text,
                               **check_greedy(hf[model], tok, p, text)})
        result["greedy"] = greedy
        both = [threading.Thread(target=complete, args=(server, m, "together", 16))
                for m in ["gpu-a", "gpu-b"]]
        for t in both:
            t.start()
        for t in both:
            t.join()
        placed = {m["name"]: [i["device"] for i in m["instances"]] for m in server.status()["models"]}
        result["two_models"] = {"placed": placed,
                                "ok": placed.get("gpu-a") == ["cuda:0"] and placed.get("gpu-b") == ["cuda:0"]}
        result["burst"] = burst(server, 32, 64)
    finally:
        server.stop()
        with open(os.path.join(root, "server.log")) as f:
            print("server log (last 40 lines):", *f.readlines()[-40:], sep="\n")
    ok = all(g["ok"] for g in result["greedy"]) and result["two_models"]["ok"] and result["burst"]["ok"]
    result["ok"] = ok
    with open(os.path.join(a.out, "whole_path.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "greedy"}, indent=1))
    print("greedy:", [(g["model"], g["prompt"], g["exact"], g["tokens"], round(g["max_gap_rel"], 4))
                      for g in result["greedy"]])
    print("whole path:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
