#!/usr/bin/python3
"""Race nbd-rs's aio-bench against libnbd's, interleaved and pinned, using
the team's driver (../../shared/bench/bench-driver.py) as a library.

Runs, on one Unix-socket server instance each, the grid rs in {4K, 64K,
256K, 1M} x qd in {1, 16, 64}, reads and writes, with three clients per
rep in rotated order: libnbd-c, candidate (nbd-rs) and libnbd-c-b (the
A/A twin that gives the noise floor):
  - nbdkit null 1G (experiment "compare"),
  - nbdkit memory 1G after a prefill pass (experiment "memory").
Env: REPS (default 7), OUT (default results.jsonl), ONLY (null,memory),
SIZES/DEPTHS (comma lists, optional). Summarize with
  /usr/bin/python3 ../../shared/bench/summarize.py results.jsonl
"""
import importlib.util
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("SHARED_BENCH", os.path.join(HERE, "..", "..", "shared", "bench"))
os.environ.setdefault("REPS", "7")
spec = importlib.util.spec_from_file_location("driver", os.path.join(SHARED, "bench-driver.py"))
d = importlib.util.module_from_spec(spec)
spec.loader.exec_module(d)

if not d.CANDIDATE:
    sys.exit("set CANDIDATE=path/to/target/release/examples/aio-bench")

only = os.environ.get("ONLY", "null,memory").split(",")
sizes = [int(x) for x in os.environ.get("SIZES", "4096,65536,262144,1048576").split(",")]
depths = [int(x) for x in os.environ.get("DEPTHS", "1,16,64").split(",")]
clients = ["libnbd-c", "candidate", "libnbd-c-b"]

servers = []
try:
    if "null" in only:
        s = d.nbdkit("null", "null", "1G"); servers.append(s)
        d.grid("compare", s, "read", clients, sizes, depths, d.total_for)
        d.grid("compare", s, "write", clients, sizes, depths, d.total_for)
        s.stop(); servers.remove(s)
    if "memory" in only:
        s = d.nbdkit("memory", "memory", "1G"); servers.append(s)
        # The first write to each page allocates: prefill before timing.
        subprocess.run([d.CBENCH, "-w", "-r", "1M", "-q", "16", s.uri],
                       check=True, capture_output=True)
        d.grid("memory", s, "read", clients, sizes, depths, d.total_for)
        d.grid("memory", s, "write", clients, sizes, depths, d.total_for)
        s.stop(); servers.remove(s)
finally:
    for s in servers:
        s.stop()
