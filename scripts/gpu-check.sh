#!/usr/bin/env bash
# The CUDA engine's GPU check (issue 5). Two halves:
#
#   scripts/gpu-check.sh build    here, where Rust is: builds the release test
#                                 binaries and the bench tool into
#                                 target/gpu-carry/ (stripped, < 64 MiB).
#   scripts/gpu-check.sh device   on the GPU machine (no Rust there): runs the
#                                 GPU tests, the transformers comparison and the
#                                 decode benchmark; writes everything to $OUT.
#
# From a session lent a device machine:
#   scripts/gpu-check.sh build
#   run(command="bash scripts/gpu-check.sh device", carry=["target/gpu-carry"], timeout_s=480)
# then copy the figures from $OUT/bench.jsonl and $OUT/hf_compare.json into
# BENCHMARKS.md ("CUDA engine (issue 5)"), naming the device.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=target/gpu-carry

build() {
    set -e
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-cuda}"
    cargo build --release -p slinfer-cuda --bin slinfer-cuda-bench
    local json
    json=$(cargo test --release --no-run -p slinfer-cuda --message-format=json 2>/dev/null)
    mkdir -p "$CARRY"
    rm -f "$CARRY"/*
    cp "$CARGO_TARGET_DIR/release/slinfer-cuda-bench" "$CARRY/"
    # Test executables: the lib's unit tests and tests/gpu.rs.
    local listing
    listing=$(mktemp)
    printf '%s\n' "$json" >"$listing"
    python3 scripts/gpu/pick_test_bins.py "$listing" "$CARRY"
    rm -f "$listing"
    strip --strip-debug "$CARRY"/* || true
    ls -la "$CARRY"
    du -sh "$CARRY"
    echo "carry: $CARRY (pass carry=[\"$CARRY\"] to the device run)"
}

device() {
    OUT="${OUT:-$PWD/gpu-out}"
    mkdir -p "$OUT"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"
    # The CUDA 13 pip wheels (cuBLAS, NVRTC) in this machine's Python.
    SLINFER_CUDA_LIB_DIRS=$(python3 -c '
import glob, site
roots = site.getsitepackages() + [site.getusersitepackages()]
print(":".join(d for r in roots for d in sorted(glob.glob(r + "/nvidia/*/lib"))))' 2>/dev/null)
    export SLINFER_CUDA_LIB_DIRS
    echo "SLINFER_CUDA_LIB_DIRS=$SLINFER_CUDA_LIB_DIRS" | tee "$OUT/env.txt"
    ls /usr/local/cuda/lib64 2>/dev/null | grep -E 'nvrtc|cublas' | tee -a "$OUT/env.txt"
    local rc=0
    timeout 120 "$CARRY/unit-tests" --nocapture 2>&1 | tee "$OUT/unit-tests.txt" || rc=1
    timeout 180 "$CARRY/gpu-tests" --nocapture --test-threads=1 2>&1 | tee "$OUT/gpu-tests.txt" || rc=1
    timeout 180 python3 scripts/gpu/hf_compare.py --bench "$CARRY/slinfer-cuda-bench" \
        --out "$OUT/hf_compare.json" 2>&1 | tee "$OUT/hf_compare.txt" || rc=1
    timeout 120 python3 scripts/gpu/hf_compare.py --bench "$CARRY/slinfer-cuda-bench" --dtype bf16 \
        --out "$OUT/hf_compare_bf16.json" 2>&1 | tail -3 | tee "$OUT/hf_compare_bf16.txt" || rc=1
    timeout 240 "$CARRY/slinfer-cuda-bench" bench --batches 1,8,32,64 --steps 64 --prompt 128 --graphs \
        2>&1 | tee "$OUT/bench.jsonl" || rc=1
    echo "gpu-check: exit $rc; results in $OUT"
    return $rc
}

case "${1:-}" in
    build) build ;;
    device) device ;;
    *) echo "usage: $0 build|device" >&2; exit 2 ;;
esac
