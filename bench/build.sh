#!/usr/bin/env bash
# Builds the two benchmark clients from the repository:
#   target/bench/libnbd-aio-bench          (bench/libnbd-aio-bench.c)
#   target/release/examples/aio-bench      (nbd-mio/examples/aio-bench.rs)
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in cc pkg-config nbdkit python3; do
    command -v "$tool" >/dev/null || { echo "bench: $tool not found (bash .ci/run installs the packages)" >&2; exit 1; }
done
pkg-config --exists libnbd || { echo "bench: libnbd-dev not installed (bash .ci/run installs it)" >&2; exit 1; }
mkdir -p target/bench
cc -O2 -g -Wall -o target/bench/libnbd-aio-bench bench/libnbd-aio-bench.c $(pkg-config --cflags --libs libnbd)
cargo build -q --release --locked -p nbd-mio --example aio-bench
