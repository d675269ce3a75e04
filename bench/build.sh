#!/usr/bin/env bash
# Builds the two benchmark clients from the repository:
#   $TARGET/bench/libnbd-aio-bench          (bench/libnbd-aio-bench.c)
#   $TARGET/release/examples/aio-bench      (nbd-mio/examples/aio-bench.rs)
# TARGET is $CARGO_TARGET_DIR, else target/. Sourced by run.sh and
# callgrind.sh, which then find the binaries in $LIBNBD and $NBD_RS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TARGET=${CARGO_TARGET_DIR:-target}
for tool in cc pkg-config nbdkit python3; do
    command -v "$tool" >/dev/null || { echo "bench: $tool not found (bash .ci/run installs the packages)" >&2; exit 1; }
done
pkg-config --exists libnbd || { echo "bench: libnbd-dev not installed (bash .ci/run installs it)" >&2; exit 1; }
mkdir -p "$TARGET/bench"
cc -O2 -g -Wall -o "$TARGET/bench/libnbd-aio-bench" bench/libnbd-aio-bench.c $(pkg-config --cflags --libs libnbd)
cargo build -q --release --locked -p nbd-mio --example aio-bench
export LIBNBD=${LIBNBD:-$TARGET/bench/libnbd-aio-bench}
export NBD_RS=${NBD_RS:-$TARGET/release/examples/aio-bench}
