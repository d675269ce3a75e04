#!/usr/bin/env python3
"""Paired-ratio table of a bench/compare.py result file (Markdown).

Usage: python3 bench/table.py RESULTS.jsonl

For every grid point: the median over reps of candidate/libnbd-c throughput
measured in the same rep (min-max beside it), the same for the A/A twin
libnbd-c-b/libnbd-c (the noise floor), and client CPU seconds per GiB
(user + system, from the inner timer of each program).
"""
import collections
import json
import statistics
import sys

SIZE = {4096: "4K", 65536: "64K", 262144: "256K", 1048576: "1M"}
runs = collections.defaultdict(dict)  # point -> rep -> client -> record
for line in open(sys.argv[1]):
    r = json.loads(line)
    point = (r["server"], r["op"], r["rs"], r["qd"])
    runs[point].setdefault(r["rep"], {})[r["client"]] = r


def gibs(r):
    return r["inner"]["gibs"]


def cpu_per_gib(r):
    i = r["inner"]
    return (i["usr"] + i["sys"]) / (r["bytes"] / 2**30)


def ratio(reps, a, b):
    rs = [c[a] and gibs(c[a]) / gibs(c[b]) for c in reps if a in c and b in c]
    return f"{statistics.median(rs):.2f} ({min(rs):.2f}–{max(rs):.2f})"


print("| server | op | rs | qd | nbd-rs GiB/s | libnbd GiB/s | nbd-rs/libnbd (min–max) "
      "| A/A (min–max) | CPU s/GiB nbd-rs / libnbd |")
print("|---|---|---|---|---|---|---|---|---|")
order = {"null": 0, "memory": 1}
for point in sorted(runs, key=lambda p: (order.get(p[0], 9), p[1], p[2], p[3])):
    reps = list(runs[point].values())
    med = lambda c, f: statistics.median(f(x[c]) for x in reps if c in x)
    srv, op, rs, qd = point
    print(f"| {srv} | {op} | {SIZE.get(rs, rs)} | {qd} | {med('candidate', gibs):.2f} "
          f"| {med('libnbd-c', gibs):.2f} | {ratio(reps, 'candidate', 'libnbd-c')} "
          f"| {ratio(reps, 'libnbd-c-b', 'libnbd-c')} "
          f"| {med('candidate', cpu_per_gib):.2f} / {med('libnbd-c', cpu_per_gib):.2f} |")
