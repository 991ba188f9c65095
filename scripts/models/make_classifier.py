#!/usr/bin/env python3
"""Build the tensor-model package `nn-classifier-v1`: a tiny deterministic
OpenVINO classifier for `wasi:nn` (the `nn-classify` function and its tests).

    .venv/bin/python scripts/models/make_classifier.py [--models-dir DIR] [--force]

The model is an MLP with fixed seeded weights:

    input  "features"       f32 [1, 4]
    hidden relu(x @ W1 + b1)     [1, 8]
    output "probabilities"  f32 [1, 3]   softmax(h @ W2 + b2)

The package `<models-dir>/nn-classifier-v1/` holds:
  model.toml       kind = "tensor", format = "openvino", the graph's name (= the folder's)
  model.xml/.bin   the OpenVINO IR (`ov.save_model`, fp32 weights kept)
  reference.json   inputs and the outputs numpy computes for them (the tests' yardstick)

Because the IR files are named `model.xml`/`model.bin`, the same folder also
works with `wasmtime serve -S nn -S nn-graph=openvino::<folder>`.

The package is built in a temporary folder beside the target and renamed into
place, so a failure (or a concurrent run) never leaves it half-written; an
existing package is left alone unless --force. Prints the package path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

NAME = "nn-classifier-v1"
SEED = 20241028
INPUT, OUTPUT = "features", "probabilities"
N_IN, N_HIDDEN, N_OUT = 4, 8, 3
CLASSES = ["setosa", "versicolor", "virginica"]
# Inputs whose answers the tests check (iris-like measurements).
SAMPLES = [
    [5.1, 3.5, 1.4, 0.2],
    [6.0, 2.7, 5.1, 1.6],
    [6.9, 3.1, 5.4, 2.1],
    [0.0, 0.0, 0.0, 0.0],
    [-1.5, 2.25, 10.0, -3.0],
]


def weights():
    import numpy as np

    rng = np.random.default_rng(SEED)
    w1 = rng.normal(0.0, 0.6, (N_IN, N_HIDDEN)).astype(np.float32)
    b1 = rng.normal(0.0, 0.1, (N_HIDDEN,)).astype(np.float32)
    w2 = rng.normal(0.0, 0.6, (N_HIDDEN, N_OUT)).astype(np.float32)
    b2 = rng.normal(0.0, 0.1, (N_OUT,)).astype(np.float32)
    return w1, b1, w2, b2


def reference(x):
    """The classifier in numpy (float32 throughout)."""
    import numpy as np

    w1, b1, w2, b2 = weights()
    x = np.asarray(x, dtype=np.float32).reshape(1, N_IN)
    h = np.maximum(x @ w1 + b1, 0.0)
    z = h @ w2 + b2
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def build_model():
    import openvino as ov
    import openvino.opset13 as ops

    w1, b1, w2, b2 = weights()
    x = ops.parameter([1, N_IN], ov.Type.f32, name=INPUT)
    h = ops.relu(ops.add(ops.matmul(x, ops.constant(w1), False, False), ops.constant(b1)))
    z = ops.add(ops.matmul(h, ops.constant(w2), False, False), ops.constant(b2))
    p = ops.softmax(z, 1)
    p.output(0).get_tensor().set_names({OUTPUT})
    return ov.Model([p], [x], NAME)


def write_package(dst: Path) -> None:
    import numpy as np
    import openvino as ov

    model = build_model()
    ov.save_model(model, dst / "model.xml", compress_to_fp16=False)
    # Check the IR against numpy before publishing it.
    # fp32 as the host compiles tensor models (the CPU default may be bf16).
    compiled = ov.Core().compile_model(
        dst / "model.xml", "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    cases = []
    for s in SAMPLES:
        want = reference(s)
        got = compiled(np.asarray(s, dtype=np.float32).reshape(1, N_IN))[0]
        if not np.allclose(got, want, atol=1e-5):
            raise SystemExit(f"make_classifier: OpenVINO {got} != numpy {want} for {s}")
        cases.append(
            {
                "input": s,
                "probabilities": [float(v) for v in want[0]],
                "class": int(want[0].argmax()),
            }
        )
    (dst / "reference.json").write_text(
        json.dumps(
            {
                "input": {"name": INPUT, "type": "fp32", "shape": [1, N_IN]},
                "output": {"name": OUTPUT, "type": "fp32", "shape": [1, N_OUT]},
                "classes": CLASSES,
                "cases": cases,
            },
            indent=1,
        )
        + "\n"
    )
    (dst / "model.toml").write_text(
        "\n".join(
            [
                "# A tensor model for wasi:nn (scripts/models/make_classifier.py).",
                'kind = "tensor"',
                f'name = "{NAME}"',
                'format = "openvino"',
                "",
                "[files]",
                'xml = "model.xml"',
                'weights = "model.bin"',
                "",
            ]
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models-dir",
        default=os.environ.get("SLINFER_MODELS_DIR", ".data/models"),
    )
    ap.add_argument("--force", action="store_true", help="rebuild an existing package")
    args = ap.parse_args()
    models = Path(args.models_dir)
    dst = models / NAME
    if (dst / "model.toml").is_file() and not args.force:
        print(dst)
        return 0
    models.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}.", dir=models))
    try:
        write_package(tmp)
        os.chmod(tmp, 0o755)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{NAME}.old.", dir=models))
            os.rename(dst, old / NAME)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, dst)
            except OSError:
                # Another run published it first; theirs is identical.
                if not (dst / "model.toml").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
