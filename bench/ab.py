#!/usr/bin/env python3
"""Interleaved A/B of benchmark clients on one nbdkit server.

Usage:
  python3 bench/ab.py [--server null|memory] [--reps N] \\
      NAME=COMMAND [NAME=COMMAND ...] -- AIO-BENCH-ARGS...

Each COMMAND is a client that takes aio-bench's flags and the URI last
(libnbd-aio-bench, or any build of nbd-mio's aio-bench; VAR=value words in
front of it are set in its environment). The script starts its own nbdkit
(`null 1G`, or `memory 1G` prefilled with one write pass) pinned to CPU 0,
runs every client once per rep pinned to CPU 1, rotating the order each
rep, and prints per client the median GiB/s and the median of its ratio to
the FIRST client measured in the same rep (min-max beside it). Put a client
twice to see the noise. The server is stopped by its PID at the end.

Example (two builds of the candidate against libnbd):
  python3 bench/ab.py libnbd=target/bench/libnbd-aio-bench \\
      libnbd-b=target/bench/libnbd-aio-bench \\
      old=/tmp/aio-bench-old new=target/release/examples/aio-bench \\
      -- -r 64k -q 16 -n 1G
"""
import argparse
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import tempfile
import time

ap = argparse.ArgumentParser(usage=__doc__)
ap.add_argument("--server", choices=["null", "memory"], default="null")
ap.add_argument("--reps", type=int, default=7)
ap.add_argument("rest", nargs=argparse.REMAINDER)
a = ap.parse_args()
if "--" not in a.rest:
    ap.error("put -- between the clients and the benchmark flags")
k = a.rest.index("--")
clients = [c.split("=", 1) for c in a.rest[:k]]
bench_args = a.rest[k + 1:]

tmp = tempfile.mkdtemp(prefix="nbd-ab-")
sock, pidfile = os.path.join(tmp, "sock"), os.path.join(tmp, "pid")
subprocess.run(["taskset", "-c", "0", "nbdkit", "-U", sock, "-P", pidfile,
                a.server, "1G"], check=True)
for _ in range(500):
    if os.path.exists(pidfile) and open(pidfile).read().strip():
        break
    time.sleep(0.01)
pid = int(open(pidfile).read())
uri = f"nbd+unix:///?socket={sock}"


def run(cmd, args):
    words = shlex.split(cmd)
    env = dict(os.environ)
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    out = subprocess.run(["taskset", "-c", "1"] + words + args + [uri],
                         capture_output=True, text=True, env=env, check=True)
    return float(re.search(r"GiB/s=([0-9.]+)", out.stdout).group(1))


try:
    if a.server == "memory":
        # The first write to each page allocates: prefill before timing.
        run(clients[0][1], ["-w", "-r", "1M", "-q", "16"])
    res = {name: [] for name, _ in clients}
    for rep in range(a.reps):
        r = rep % len(clients)
        for name, cmd in clients[r:] + clients[:r]:
            res[name].append(run(cmd, bench_args))
    base = res[clients[0][0]]
    for name, _ in clients:
        ratios = [x / b for x, b in zip(res[name], base)]
        print(f"{name:12s} {statistics.median(res[name]):7.3f} GiB/s  ratio "
              f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})")
finally:
    os.kill(pid, signal.SIGTERM)
    for _ in range(500):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    shutil.rmtree(tmp, ignore_errors=True)
