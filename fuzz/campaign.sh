#!/usr/bin/env bash
# Fuzzing campaign: runs every cargo-fuzz target (with ASan) for N seconds,
# one target at a time, from the committed seeds plus corpus/<target>/ (the
# git-ignored working corpus, which keeps what earlier runs found), and
# prints a table per target: executions per second, total executions,
# coverage (edges: libFuzzer's final "cov:"), and findings. Slow inputs are
# findings: -timeout (default 5 s, FUZZ_TIMEOUT) makes libFuzzer stop with
# a "timeout-*" artifact; crashes, leaks and out-of-memory leave theirs in
# artifacts/<target>/. Exits nonzero if any target found something.
#
#   fuzz/campaign.sh 600                         # 10 minutes per target
#   FUZZ_TARGETS="state_machine" fuzz/campaign.sh 60
#
# Keep a finding: fix it, then copy the artifact to corpus/seed/<target>/
# (the corpus replay test, `cargo test --manifest-path fuzz/Cargo.toml`,
# then runs it on every build).
set -euo pipefail

secs="${1:?usage: campaign.sh SECONDS_PER_TARGET}"
timeout_s="${FUZZ_TIMEOUT:-5}"
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "campaign.sh: cargo-fuzz is missing; install it with: cargo install cargo-fuzz --locked" >&2
    exit 2
fi
cargo fuzz build >/dev/null

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT

rows=()
found=0
for t in $targets; do
    mkdir -p "corpus/$t" "corpus/seed/$t" "artifacts/$t"
    args=(-max_total_time="$secs" -timeout="$timeout_s" -rss_limit_mb=2048
        -malloc_limit_mb=1024 -print_final_stats=1 -artifact_prefix="artifacts/$t/")
    case "$t" in
        state_machine | negotiation | wire_reply | wire_option | wire_handshake) args+=(-dict=nbd.dict) ;;
    esac
    before=$(find "artifacts/$t" -type f | wc -l)
    echo "=== $t: ${secs}s" >&2
    status=ok
    if ! cargo fuzz run "$t" "corpus/$t" "corpus/seed/$t" -- "${args[@]}" >"$logs/$t.log" 2>&1; then
        status=FAILED
    fi
    log="$logs/$t.log"
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    # The last status line ("#N DONE cov: E ft: F ... exec/s: R") has the
    # final coverage; a run that stopped early has it on its last "#" line.
    last=$(grep -E '^#[0-9]+' "$log" | tail -n1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
    slow=$(grep -c 'ALARM: working on the last Unit for' "$log" || true)
    crashes=$(grep -cE 'ERROR: (libFuzzer|AddressSanitizer)|==ERROR' "$log" || true)
    after=$(find "artifacts/$t" -type f | wc -l)
    new=$((after - before))
    if [ "$status" != ok ] || [ "$new" -gt 0 ]; then
        found=1
        echo "!!! $t: $status, $new new artifact(s) in fuzz/artifacts/$t/; last lines:" >&2
        tail -n 30 "$log" >&2
    fi
    rows+=("$(printf '%-16s %10s %12s %8s %8s %6s %8s %10s' "$t" "${rate:-?}" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${slow:-0}" "${crashes:-0}" "$status")")
done

printf '\n%-16s %10s %12s %8s %8s %6s %8s %10s\n' target "exec/s" executions "cov" "ft" slow crashes result
for r in "${rows[@]}"; do echo "$r"; done
echo "(${secs} s per target, -timeout=${timeout_s}; cov = edges covered, ft = features)"
exit "$found"
