#!/usr/bin/env python3
"""Bad inputs to import.py get a clear error and leave nothing behind.

    .venv/bin/python scripts/models/test_import.py

Run by `cargo test -p slinfer-openvino` (tests/import.rs). Builds tiny GGUF
files with the `gguf` package; needs no model download.
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import gguf

HERE = Path(__file__).resolve().parent


def tiny_gguf(path: Path, arch: str, qtype=None) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab"])
    w.add_token_merges(["a b"])
    data = np.zeros((32, 32), dtype=np.float32)
    if qtype is None:
        w.add_tensor("token_embd.weight", data)
    else:  # raw bytes of a K-quant tensor: rows of one 256-element super-block
        nbytes = gguf.GGML_QUANT_SIZES[qtype][1]
        w.add_tensor("token_embd.weight", np.zeros((4, nbytes), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run(models: Path, source: str) -> tuple[int, str]:
    r = subprocess.run([sys.executable, str(HERE / "import.py"), "--models-dir", str(models), source],
                       capture_output=True, text=True)
    return r.returncode, r.stderr


def ir_folder_imports(t: Path) -> bool:
    """An OpenVINO IR folder (as optimum exports: IR + config.json +
    tokenizer.json) imports, with the same numbers as the GGUF gave. Uses the
    default package from $SLINFER_MODELS_DIR when there is one."""
    import os
    import tomllib

    pkg = Path(os.environ.get("SLINFER_MODELS_DIR", HERE.parent.parent / ".data/models")) / "smollm2-135m-instruct"
    if not (pkg / "model.toml").is_file():
        print("skip ir-folder: no default package (./dev test imports it)")
        return True
    want = tomllib.loads((pkg / "model.toml").read_text())["config"]
    src = t / "ir"
    src.mkdir()
    for f in ("openvino_model.xml", "openvino_model.bin", "tokenizer.json"):
        (src / f).symlink_to(pkg / f)
    hf = {"model_type": "llama", "num_hidden_layers": want["num_layers"],
          "num_attention_heads": want["num_heads"], "num_key_value_heads": want["num_kv_heads"],
          "hidden_size": want["hidden_size"], "intermediate_size": want["intermediate_size"],
          "vocab_size": want["vocab_size"], "max_position_embeddings": want["context_length_tokens"],
          "rope_theta": want["rope_theta"], "rms_norm_eps": want["rms_norm_eps"],
          "bos_token_id": want["bos_token_id"], "eos_token_id": want["eos_token_ids"][0],
          "tie_word_embeddings": True}
    (src / "config.json").write_text(json.dumps(hf))
    models = t / "ir-models"
    rc, err = run(models, str(src))
    got = tomllib.loads((models / "ir" / "model.toml").read_text())["config"] if rc == 0 else None
    ok = rc == 0 and got == {**want, "attention_bias": False}
    print(f"{'ok  ' if ok else 'FAIL'} ir-folder: rc={rc} {err.strip().splitlines()[-1]!r}")
    if not ok:
        print(f"  want {want}\n  got  {got}")
    shutil.rmtree(models, ignore_errors=True)
    return ok


def main() -> int:
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        models = t / "models"
        bad_magic = t / "bad.gguf"
        bad_magic.write_bytes(b"hello, not a model")
        gemma = t / "gemma.gguf"
        tiny_gguf(gemma, "gemma3")
        kquant = t / "kquant.gguf"
        tiny_gguf(kquant, "llama", gguf.GGMLQuantizationType.Q4_K)
        truncated = t / "truncated.gguf"
        truncated.write_bytes(kquant.read_bytes()[:200])
        cases = [
            (str(t / "missing.gguf"), "no such file"),
            (str(bad_magic), "not a GGUF file"),
            (str(truncated), "corrupt or truncated"),
            (str(gemma), "unsupported architecture 'gemma3'"),
            (str(kquant), "unsupported quantization Q4_K"),
            (str(t), "neither a GGUF file nor an OpenVINO IR folder"),
        ]
        failed = 0
        failed += not ir_folder_imports(t)
        for source, want in cases:
            rc, err = run(models, source)
            leftovers = list(models.iterdir()) if models.exists() else []
            ok = rc == 1 and want in err and not leftovers
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {Path(source).name}: rc={rc} {err.strip().splitlines()[-1]!r}"
                  f"{' leftovers ' + str(leftovers) if leftovers else ''}")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
