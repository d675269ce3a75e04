#!/usr/bin/env bash
# Builds both benchmark clients and races them; see bench/README.md.
# Usage: bash bench/run.sh [OUT.jsonl]
#   env: QUICK=1 (smoke: 4 points, 1 rep), REPS, POINTS, SERVERS, OPS, SIZES,
#        DEPTHS, TOTAL, EXPORT, SENTINEL, PIN, NBD_RS_B (see bench/compare.py)
# Needs only the repository plus the packages `.ci/run` installs (nbdkit,
# libnbd-dev, pkg-config) and a C compiler.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in cc pkg-config nbdkit taskset python3; do
    command -v "$tool" >/dev/null || { echo "bench: $tool not found (bash .ci/run installs the packages)" >&2; exit 1; }
done
pkg-config --exists libnbd || { echo "bench: libnbd-dev not installed" >&2; exit 1; }

mkdir -p target/bench
cc -O2 -Wall -o target/bench/libnbd-aio-bench bench/libnbd-aio-bench.c $(pkg-config --cflags --libs libnbd)
cargo build -q --release --locked -p nbd-mio --example aio-bench

out=${1:-bench/results.jsonl}
if [ "${QUICK:-0}" = 1 ] && [ $# -eq 0 ]; then
    out=target/bench/quick.jsonl
    rm -f "$out"
fi
OUT=$out python3 bench/compare.py
python3 bench/table.py "$out"
