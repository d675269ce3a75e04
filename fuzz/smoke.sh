#!/usr/bin/env bash
# Fuzz smoke test for CI: builds every cargo-fuzz target (with ASan) and runs
# each one for N seconds (default 20) starting from the committed seeds in
# corpus/seed/<target>/. New inputs go to a scratch directory, so the seeds
# are never modified. Exits nonzero if any target crashes, leaks, times out
# or runs out of memory; the reproducer is left in artifacts/<target>/.
#
#   fuzz/smoke.sh            # 20 s per target
#   fuzz/smoke.sh 60         # 60 s per target
#   FUZZ_TARGETS="uri state_machine" fuzz/smoke.sh 5
set -euo pipefail

secs="${1:-${FUZZ_SECONDS:-20}}"
cd "$(dirname "$0")"

# cargo-fuzz needs -Z flags; RUSTC_BOOTSTRAP lets the stable toolchain take them.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "smoke.sh: cargo-fuzz is missing; install it with: cargo install cargo-fuzz --locked" >&2
    exit 2
fi

cargo fuzz build

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

failed=()
for t in $targets; do
    mkdir -p "$scratch/$t" "corpus/seed/$t"
    args=(-max_total_time="$secs" -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=512 -print_final_stats=1)
    case "$t" in
        state_machine | negotiation | wire_reply | wire_option | wire_handshake) args+=(-dict=nbd.dict) ;;
    esac
    echo "=== $t: ${secs}s"
    if cargo fuzz run "$t" "$scratch/$t" "corpus/seed/$t" -- "${args[@]}" \
        >"$scratch/$t.log" 2>&1; then
        grep -E '^(Done|stat::number_of_executed_units)' "$scratch/$t.log" || true
    else
        echo "!!! $t FAILED; last lines of its log:"
        tail -n 40 "$scratch/$t.log"
        failed+=("$t")
    fi
done

if ((${#failed[@]})); then
    echo "smoke.sh: crashes in: ${failed[*]} (reproducers in fuzz/artifacts/)" >&2
    exit 1
fi
echo "smoke.sh: all targets ran ${secs}s without a crash"
