#!/usr/bin/env python3
"""Race nbd-rs's aio-bench against libnbd, interleaved, paired and pinned.

Usage: python3 bench/compare.py        (bash bench/run.sh builds and calls it)

Clients (each takes aio-bench's flags and the URI last, prints one JSON
object per iteration with -j):
  nbd-rs    $NBD_RS    (default target/release/examples/aio-bench)
  nbd-rs-b  $NBD_RS_B  (default: the same binary: the A/A twin, the noise
                        floor; point it at another build for an A/B)
  libnbd    $LIBNBD    (default target/bench/libnbd-aio-bench, built by
                        run.sh from bench/libnbd-aio-bench.c)

For every point (server, op, request size, depth) it starts a fresh nbdkit
on a Unix socket in a private temporary directory (memory: prefilled by one
write pass first), then runs REPS reps; each rep runs the three clients
back to back, the order rotated every rep. The server is pinned to CPU 0
and the clients to CPU 1 (PIN=0 turns that off). Before every point a short
sentinel (null, read, 256 KiB, depth 16, 256 MiB, all three clients) is run
against a server of its own, so the host's speed over time can be seen.
Every run appends one JSON object to OUT; bench/table.py makes the table.

Env:
  OUT      result file (appended to; default bench/results.jsonl)
  REPS     reps per point (default 7)
  SERVERS  nbdkit plugins, comma list of null,memory (default both; ONLY is
           an older name for it)
  OPS      read,write          SIZES  4k,64k,256k,1m     DEPTHS  1,16,64
  POINTS   explicit points instead of the grid: SERVER/OP/SIZE/DEPTH,...
           e.g. POINTS=null/read/4k/1,memory/write/1m/16
  TOTAL    bytes per run (default 1g, 256m at 4 KiB requests)
  EXPORT   export size (default 1g)
  SENTINEL 0 to skip the sentinel runs (default 1)
  PIN      1 (default) pin server to CPU 0 and clients to CPU 1
  QUICK=1  smoke test: 4 points, 1 rep, 64 MiB per run, 256 MiB export,
           no sentinel unless SENTINEL=1
"""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.environ.get("QUICK", "0") == "1"


def size(text):
    text = text.strip().lower()
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("kmg")) * mult


def env_list(name, default):
    return [x for x in os.environ.get(name, default).split(",") if x]


NBD_RS = os.environ.get("NBD_RS", os.path.join(ROOT, "target/release/examples/aio-bench"))
CLIENTS = [
    ("nbd-rs", "A", NBD_RS),
    ("nbd-rs-b", "A2", os.environ.get("NBD_RS_B", NBD_RS)),
    ("libnbd", "ref", os.environ.get("LIBNBD", os.path.join(ROOT, "target/bench/libnbd-aio-bench"))),
]
OUT = os.environ.get("OUT", os.path.join(ROOT, "bench/results.jsonl"))
REPS = int(os.environ.get("REPS", "1" if QUICK else "7"))
EXPORT = size(os.environ.get("EXPORT", "256m" if QUICK else "1g"))
TOTAL = os.environ.get("TOTAL", "64m" if QUICK else "")
SENTINEL = os.environ.get("SENTINEL", "0" if QUICK else "1") == "1"
PIN = os.environ.get("PIN", "1") == "1" and os.cpu_count() and os.cpu_count() >= 2
SRV_PIN = ["taskset", "-c", "0"] if PIN else []
CLI_PIN = ["taskset", "-c", "1"] if PIN else []


def points():
    if "POINTS" in os.environ:
        for p in env_list("POINTS", ""):
            srv, op, rs, qd = p.split("/")
            yield srv, op, size(rs), int(qd)
        return
    if QUICK:
        yield from [("null", "read", 4096, 16), ("null", "read", 262144, 16),
                    ("null", "write", 262144, 16), ("memory", "read", 65536, 16)]
        return
    servers = env_list("SERVERS", os.environ.get("ONLY", "null,memory"))
    for srv in servers:
        for op in env_list("OPS", "read,write"):
            for rs in env_list("SIZES", "4k,64k,256k,1m"):
                for qd in env_list("DEPTHS", "1,16,64"):
                    yield srv, op, size(rs), int(qd)


def total_for(rs):
    if TOTAL:
        return size(TOTAL)
    return (256 << 20) if rs <= 4096 else (1 << 30)


class Nbdkit:
    """nbdkit PLUGIN SIZE on a Unix socket in its own temporary directory."""

    def __init__(self, plugin):
        self.dir = tempfile.mkdtemp(prefix="nbd-bench-")
        self.sock = os.path.join(self.dir, "sock")
        pidfile = os.path.join(self.dir, "pid")
        self.plugin = plugin
        subprocess.run(SRV_PIN + ["nbdkit", "-U", self.sock, "-P", pidfile,
                                  plugin, str(EXPORT)], check=True)
        # nbdkit forks once it listens; the pid file follows.
        for _ in range(500):
            if os.path.exists(pidfile) and open(pidfile).read().strip():
                break
            time.sleep(0.01)
        self.pid = int(open(pidfile).read())
        self.uri = f"nbd+unix:///?socket={self.sock}"

    def stop(self):
        try:
            os.kill(self.pid, signal.SIGTERM)
            for _ in range(500):
                os.kill(self.pid, 0)
                time.sleep(0.01)
        except ProcessLookupError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def run_client(path, args, uri):
    """Runs one client; returns (its JSON object, wall s, (usr s, sys s)) where
    wall and CPU are the whole process's, start-up and connect included."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.run(CLI_PIN + [path, "-j"] + args + [uri], capture_output=True, text=True)
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    ru = (ru1.ru_utime - ru0.ru_utime, ru1.ru_stime - ru0.ru_stime)
    out, err = p.stdout, p.stderr
    if p.returncode != 0:
        sys.exit(f"{path} {' '.join(args)} failed ({p.returncode}): {err.strip()}")
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]), wall, ru


def bench_args(op, rs, qd, total):
    return (["-w"] if op == "write" else []) + ["-r", str(rs), "-q", str(qd), "-n", str(total)]


def record(out, **rec):
    out.write(json.dumps(rec) + "\n")
    out.flush()


def run_point(out, seq, exp, srv, op, rs, qd, total, reps):
    s = Nbdkit(srv)
    try:
        if srv == "memory":
            # nbdkit memory allocates on the first write to a page: prefill.
            run_client(CLIENTS[2][2], bench_args("write", 1 << 20, 16, EXPORT), s.uri)
        for rep in range(reps):
            k = rep % len(CLIENTS)
            order = CLIENTS[k:] + CLIENTS[:k]
            for pos, (name, role, path) in enumerate(order):
                j, wall, (pusr, psys) = run_client(path, bench_args(op, rs, qd, total), s.uri)
                gibs = j["gib_per_s"]
                record(out, seq=seq, exp=exp, server=srv, op=op, rs=rs, qd=qd, bytes=total,
                       rep=rep, pos=pos, client=name, role=role, pin=bool(PIN),
                       t=round(time.time(), 3), wall=round(wall, 6), usr=round(pusr, 6),
                       sys=round(psys, 6), gibs=gibs,
                       inner=dict(secs=j["secs"], gibs=gibs, usr=j["user_s"],
                                  sys=j["sys_s"]),
                       allocs_per_req=j.get("allocs_per_req"),
                       syscalls_per_req=j.get("syscalls_per_req"),
                       structured=j.get("structured"))
                print(f"{exp:8s} {srv:6s} {op:5s} rs={rs:<8d} qd={qd:<3d} rep={rep} "
                      f"{name:9s} {gibs:7.3f} GiB/s", flush=True)
    finally:
        s.stop()


def main():
    for name, _, path in CLIENTS:
        if not os.access(path, os.X_OK):
            sys.exit(f"{name}: {path} is not built (bash bench/run.sh builds it)")
    if shutil.which("nbdkit") is None:
        sys.exit("nbdkit is not installed (bash .ci/run installs it)")
    os.makedirs(os.path.dirname(os.path.abspath(OUT)), exist_ok=True)
    with open(OUT, "a") as out:
        for seq, (srv, op, rs, qd) in enumerate(points()):
            if SENTINEL:
                run_point(out, seq, "sentinel", "null", "read", 262144, 16, 256 << 20, 1)
            run_point(out, seq, "grid", srv, op, rs, qd, total_for(rs), REPS)
    print(f"results appended to {OUT}")


if __name__ == "__main__":
    main()
