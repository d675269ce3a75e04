#!/usr/bin/env bash
# Builds both benchmark clients and races them (see BENCHMARKS.md).
# Usage: bash bench/run.sh [OUT.jsonl]   (env: REPS, ONLY, SIZES, DEPTHS)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=../shared/bench
mkdir -p /tmp/nbd-bench-bin
cc -O2 -Wall -o /tmp/nbd-bench-bin/libnbd-aio-bench $shared/libnbd-aio-bench.c $(pkg-config --cflags --libs libnbd)
cc -O2 -Wall -o /tmp/nbd-bench-bin/rawsock-bench $shared/rawsock-bench.c
cargo build -q --release -p nbd-mio --example aio-bench
out=${1:-bench/results.jsonl}
CANDIDATE=$PWD/target/release/examples/aio-bench OUT=$out /usr/bin/python3 bench/compare.py
/usr/bin/python3 $shared/summarize.py "$out"
