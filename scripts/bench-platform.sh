#!/usr/bin/env bash
# Platform benchmark: the `hello` component under load on loopback, served by
# slinfer and by `wasmtime serve` (wasmtime-cli from crates.io, same wasmtime
# version) side by side in one run.
#
#   ./dev bench [DURATION_S]
#
# 1. peak throughput: oha, closed loop, 32 connections, each server in turn
#    (two rounds, alternating, best round kept);
# 2. latency at half of slinfer's peak rate: oha -q (open loop), p50/p99.
# Tools are installed under .cache/ on first use (cargo install), release
# builds everywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DUR=${1:-10}
TOOLS="$ROOT/.cache/tools"
WASMTIME_VERSION=48.0.8
mkdir -p "$TOOLS"

if [ ! -x "$TOOLS/bin/oha" ]; then
    echo "==> installing oha (cargo install)" >&2
    cargo install --quiet --locked oha --root "$TOOLS"
fi
if [ ! -x "$TOOLS/bin/wasmtime" ] || ! "$TOOLS/bin/wasmtime" --version | grep -q "$WASMTIME_VERSION"; then
    echo "==> installing wasmtime-cli $WASMTIME_VERSION (cargo install; slow the first time)" >&2
    cargo install --quiet --locked wasmtime-cli --version "$WASMTIME_VERSION" --root "$TOOLS"
fi
echo "==> building slinfer (release)" >&2
cargo build --quiet --release -p slinfer

WASM="$ROOT/target/packages/hello/hello.wasm"
DATA=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$DATA"' EXIT

"$ROOT/target/release/slinfer" serve --listen 127.0.0.1:18080 --data-dir "$DATA" >/dev/null 2>"$DATA/slinfer.log" &
"$TOOLS/bin/wasmtime" serve -S cli --addr 127.0.0.1:18081 "$WASM" >/dev/null 2>"$DATA/wasmtime.log" &
for port in 18080 18081; do
    for _ in $(seq 100); do curl -sS -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null && break; sleep 0.1; done
done
"$ROOT/target/release/slinfer" deploy "$ROOT/target/packages/hello" --server http://127.0.0.1:18080 --data-dir "$DATA" >&2

SLINFER_URL=http://127.0.0.1:18080/fn/hello/
WASMTIME_URL=http://127.0.0.1:18081/
curl -fsS "$SLINFER_URL" >/dev/null && curl -fsS "$WASMTIME_URL" >/dev/null

# oha --json: rps and latency percentiles (seconds).
run() { "$TOOLS/bin/oha" --no-tui --output-format json "$@" 2>/dev/null; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

peak() {
    local url=$1 best=0
    for _ in 1 2; do
        local rps
        rps=$(run -z "${DUR}s" -c 32 "$url" | field "round(d['summary']['requestsPerSec'])")
        [ "$rps" -gt "$best" ] && best=$rps
    done
    echo "$best"
}

echo "==> peak throughput (${DUR}s x 2 rounds each, 32 connections)" >&2
s_peak=0; w_peak=0
for _ in 1 2; do
    s=$(peak "$SLINFER_URL"); w=$(peak "$WASMTIME_URL")
    [ "$s" -gt "$s_peak" ] && s_peak=$s
    [ "$w" -gt "$w_peak" ] && w_peak=$w
done
half=$(( s_peak / 2 ))
echo "==> latency at ${half} req/s (half of slinfer's peak), ${DUR}s each" >&2
lat() { run -z "${DUR}s" -c 32 -q "$half" "$1" | field "'%.2f %.2f' % (d['latencyPercentiles']['p50']*1000, d['latencyPercentiles']['p99']*1000)"; }
read -r s_p50 s_p99 < <(lat "$SLINFER_URL")
read -r w_p50 w_p99 < <(lat "$WASMTIME_URL")

printf '\n| server | peak req/s | p50 ms @ %d req/s | p99 ms @ %d req/s |\n|---|---|---|---|\n' "$half" "$half"
printf '| slinfer | %d | %s | %s |\n' "$s_peak" "$s_p50" "$s_p99"
printf '| wasmtime serve %s | %d | %s | %s |\n' "$WASMTIME_VERSION" "$w_peak" "$w_p50" "$w_p99"
python3 -c "print(f'\nthroughput ratio slinfer / wasmtime serve: {$s_peak/$w_peak:.2f}x')"
