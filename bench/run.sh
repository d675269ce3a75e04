#!/usr/bin/env bash
# Builds both benchmark clients and races them; see bench/README.md.
# Usage: bash bench/run.sh [OUT.jsonl]
#   env: QUICK=1 (smoke: 4 points, 1 rep), REPS, POINTS, SERVERS, OPS, SIZES,
#        DEPTHS, TOTAL, EXPORT, SENTINEL, PIN, NBD_RS_B (see bench/compare.py)
# Needs only the repository plus the packages `.ci/run` installs (nbdkit,
# libnbd-dev, pkg-config) and a C compiler.
set -euo pipefail
cd "$(dirname "$0")/.."

source bench/build.sh
command -v taskset >/dev/null || { echo "bench: taskset not found (util-linux)" >&2; exit 1; }

out=${1:-bench/results.jsonl}
if [ "${QUICK:-0}" = 1 ] && [ $# -eq 0 ]; then
    out=$TARGET/bench/quick.jsonl
    rm -f "$out"
fi
OUT=$out python3 bench/compare.py
python3 bench/table.py "$out"
