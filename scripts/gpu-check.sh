#!/usr/bin/env bash
# The GPU check: the CUDA engine alone and the whole path on a GPU. Two halves:
#
#   scripts/gpu-check.sh build    here, where Rust is: builds the release test
#                                 binaries, the bench tool, the `slinfer`
#                                 binary and the `openai-api` package into
#                                 target/gpu-carry/ (stripped, < 64 MiB).
#   scripts/gpu-check.sh device   on the GPU machine (no Rust, no OpenVINO
#                                 there): runs the engine's GPU tests, the
#                                 transformers comparison, the decode
#                                 benchmark, then the whole path
#                                 (scripts/gpu/whole_path.py: `serve --devices
#                                 cuda:0`, openai-api, greedy answers against
#                                 transformers, two models on one GPU, a burst
#                                 of 32 streams, KV growing and shrinking);
#                                 writes everything to $OUT.
#
# From a session lent a device machine:
#   scripts/gpu-check.sh build
#   run(command="bash scripts/gpu-check.sh device", carry=["target/gpu-carry"], timeout_s=540)
# then copy the figures from $OUT/bench.jsonl, $OUT/hf_compare.json and
# $OUT/whole_path.json into BENCHMARKS.md, naming the device.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=target/gpu-carry

build() {
    set -e
    ./dev build
    cargo build --release -p slinfer
    local host_bin=target/release/slinfer
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-cuda}"
    cargo build --release -p slinfer-cuda --bin slinfer-cuda-bench
    local json
    json=$(cargo test --release --no-run -p slinfer-cuda --message-format=json 2>/dev/null)
    mkdir -p "$CARRY"
    rm -f "$CARRY"/*
    cp "$CARGO_TARGET_DIR/release/slinfer-cuda-bench" "$CARRY/"
    cp "$host_bin" "$CARRY/slinfer"
    cp target/packages/openai-api/* "$CARRY/"
    # Test executables: the lib's unit tests and tests/gpu.rs.
    local listing
    listing=$(mktemp)
    printf '%s\n' "$json" >"$listing"
    python3 scripts/gpu/pick_test_bins.py "$listing" "$CARRY"
    rm -f "$listing"
    strip --strip-debug "$CARRY"/slinfer* "$CARRY"/*-tests || true
    ls -la "$CARRY"
    du -sh "$CARRY"
    echo "carry: $CARRY (pass carry=[\"$CARRY\"] to the device run)"
}

device() {
    OUT="${OUT:-$PWD/gpu-out}"
    mkdir -p "$OUT"
    # At most 8 files come back from $OUT: env.txt, unit-tests.txt,
    # gpu-tests.txt, whole_path.txt, whole_path.json, hf_compare.json,
    # hf_compare_bf16.json, bench.jsonl.
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/env.txt"
    # The CUDA 13 pip wheels (cuBLAS, NVRTC) in this machine's Python.
    SLINFER_CUDA_LIB_DIRS=$(python3 -c '
import glob, site
roots = site.getsitepackages() + [site.getusersitepackages()]
print(":".join(d for r in roots for d in sorted(glob.glob(r + "/nvidia/*/lib"))))' 2>/dev/null)
    export SLINFER_CUDA_LIB_DIRS
    echo "SLINFER_CUDA_LIB_DIRS=$SLINFER_CUDA_LIB_DIRS" | tee -a "$OUT/env.txt"
    ls /usr/local/cuda/lib64 2>/dev/null | grep -E 'nvrtc|cublas' | tee -a "$OUT/env.txt"
    local rc=0
    # Caps sum to 570 s (one device command runs at most 600); each step
    # takes seconds to a minute when it works.
    timeout 60 "$CARRY/unit-tests" --nocapture 2>&1 | tee "$OUT/unit-tests.txt" || rc=1
    timeout 120 "$CARRY/gpu-tests" --nocapture --test-threads=1 2>&1 | tee "$OUT/gpu-tests.txt" || rc=1
    # The whole path: the openai-api package is the manifest and component
    # carried beside the binaries.
    local pkg
    pkg=$(mktemp -d)
    cp "$CARRY/slinfer.toml" "$CARRY/openai-api.wasm" "$pkg/"
    PYTHONUNBUFFERED=1 timeout 150 python3 scripts/gpu/whole_path.py --slinfer "$CARRY/slinfer" \
        --package "$pkg" --out "$OUT" 2>&1 | tee "$OUT/whole_path.txt" || rc=1
    timeout 90 python3 scripts/gpu/hf_compare.py --bench "$CARRY/slinfer-cuda-bench" \
        --out "$OUT/hf_compare.json" 2>&1 || rc=1
    timeout 90 "$CARRY/slinfer-cuda-bench" bench --batches 1,8,32,64 --steps 64 --prompt 128 --graphs \
        2>&1 | tee "$OUT/bench.jsonl" || rc=1
    timeout 60 python3 scripts/gpu/hf_compare.py --bench "$CARRY/slinfer-cuda-bench" --dtype bf16 \
        --out "$OUT/hf_compare_bf16.json" 2>&1 | tail -3 || rc=1
    echo "gpu-check: exit $rc; results in $OUT"
    return $rc
}

case "${1:-}" in
    build) build ;;
    device) device ;;
    *) echo "usage: $0 build|device" >&2; exit 2 ;;
esac
