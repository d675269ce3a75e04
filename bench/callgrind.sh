#!/usr/bin/env bash
# Deterministic per-request costs of both clients, under valgrind:
#   - user-space instructions per request (callgrind), and
#   - heap allocations per request (DHAT: blocks allocated),
# each as (X(2N) - X(N)) / (N / RS): two runs of N and 2N bytes, so that
# start-up, connect and the buffers allocated before timing cancel out.
# The server is nbdkit null on a private Unix socket.
#
# Usage: bash bench/callgrind.sh      env: OP=read|write (read) RS=4k QD=16 N=32m
#   RS_FLAGS: extra flags for nbd-rs only (e.g. RS_FLAGS="-T 60": a deadline
#   on every command); NBD_RS: another nbd-rs build to measure.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "bench: valgrind not found (bash .ci/run installs it)" >&2; exit 1; }
source bench/build.sh

OP=${OP:-read} RS=${RS:-4k} QD=${QD:-16} N=${N:-32m}
bytes() { python3 -c 'import sys; s=sys.argv[1].lower(); m={"k":1<<10,"m":1<<20,"g":1<<30}.get(s[-1:],1); print(int(s.rstrip("kmg"))*m)' "$1"; }
n=$(bytes "$N") rs=$(bytes "$RS")
requests=$((n / rs))
flags=(-r "$RS" -q "$QD")
[ "$OP" = write ] && flags=(-w "${flags[@]}")

tmp=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
nbdkit -U "$tmp/sock" -P "$tmp/pid" null 1G
for _ in $(seq 500); do [ -s "$tmp/pid" ] && break; sleep 0.01; done
pid=$(cat "$tmp/pid")
uri="nbd+unix:///?socket=$tmp/sock"

# valgrind's summary line, as a plain number.
collected() { sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$1"; }
blocks() { sed -n 's/.*Total: .* bytes in \([0-9,]*\) blocks.*/\1/p' "$1" | tr -d ,; }

echo "$OP rs=$RS qd=$QD, runs of $N and 2x$N ($requests extra requests), nbdkit null"
printf '%-8s %14s %14s\n' client instr/req allocs/req
for client in nbd-rs libnbd; do
    case $client in
        nbd-rs) bin=$NBD_RS extra=(${RS_FLAGS:-}) ;;
        libnbd) bin=$LIBNBD extra=() ;;
    esac
    for k in 1 2; do
        valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.$client.$k" \
            "$bin" "${flags[@]}" "${extra[@]}" -n $((k * n)) "$uri" >/dev/null 2>"$tmp/cg.$client.$k.log"
        valgrind --tool=dhat --dhat-out-file="$tmp/dh.$client.$k" \
            "$bin" "${flags[@]}" "${extra[@]}" -n $((k * n)) "$uri" >/dev/null 2>"$tmp/dh.$client.$k.log"
    done
    i1=$(collected "$tmp/cg.$client.1.log") i2=$(collected "$tmp/cg.$client.2.log")
    b1=$(blocks "$tmp/dh.$client.1.log") b2=$(blocks "$tmp/dh.$client.2.log")
    python3 -c 'import sys; i1,i2,b1,b2,r=map(int,sys.argv[2:]); print(f"{sys.argv[1]:8s} {(i2-i1)/r:14.0f} {(b2-b1)/r:14.3f}")' \
        "$client" "$i1" "$i2" "$b1" "$b2" "$requests"
done
