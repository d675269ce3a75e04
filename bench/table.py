#!/usr/bin/env python3
"""Paired-ratio table of a bench/compare.py result file (Markdown).

Usage: python3 bench/table.py RESULTS.jsonl

For every grid point, the medians over reps of:
  - each client's data-phase GiB/s (the client's own clock);
  - nbd-rs/libnbd: the ratio of the two measured in the SAME rep, min-max
    beside it;
  - A/A: nbd-rs-b/nbd-rs in the same rep (the same binary twice unless
    NBD_RS_B named another build): the noise floor. A difference is real
    only where the nbd-rs/libnbd range clears the A/A range;
  - client CPU seconds per GiB, user + system, over the data phase;
  - nbd-rs's heap allocations per request in the data phase.
Then the sentinel runs, in time order: one fixed point measured before
every grid point, which shows the host's speed phases.

Result files of the earlier driver (clients libnbd-c, candidate and
libnbd-c-b, an A/A twin of libnbd) are read too: the A/A column is then
libnbd-c-b/libnbd-c.
"""
import collections
import json
import statistics
import sys
import time

LEGACY_ROLE = {"candidate": "A", "libnbd-c": "ref", "libnbd-c-b": "ref2"}
SIZE = {4096: "4K", 65536: "64K", 262144: "256K", 1048576: "1M"}


def role(r):
    return r.get("role") or LEGACY_ROLE.get(r["client"], r["client"])


grid = collections.defaultdict(dict)  # point -> rep -> role -> record
sentinel = []
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("exp") == "sentinel":
        sentinel.append(r)
        continue
    point = (r["server"], r["op"], r["rs"], r["qd"])
    grid[point].setdefault(r["rep"], {})[role(r)] = r


def gibs(r):
    return r["inner"]["gibs"]


def cpu_per_gib(r):
    i = r["inner"]
    return (i["usr"] + i["sys"]) / (r["bytes"] / 2**30)


def ratio(reps, a, b):
    rs = [gibs(c[a]) / gibs(c[b]) for c in reps if a in c and b in c and gibs(c[b]) > 0]
    if not rs:
        return "–"
    return f"{statistics.median(rs):.2f} ({min(rs):.2f}–{max(rs):.2f})"


def med(reps, who, f, fmt="{:.2f}"):
    xs = [f(c[who]) for c in reps if who in c and f(c[who]) is not None]
    return fmt.format(statistics.median(xs)) if xs else "–"


print("| server | op | rs | qd | reps | nbd-rs GiB/s | libnbd GiB/s | nbd-rs/libnbd (min–max) "
      "| A/A (min–max) | CPU s/GiB nbd-rs / libnbd | allocs/req nbd-rs |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
order = {"null": 0, "memory": 1}
for point in sorted(grid, key=lambda p: (order.get(p[0], 9), p[1], p[2], p[3])):
    reps = list(grid[point].values())
    srv, op, rs, qd = point
    twin = ratio(reps, "A2", "A") if any("A2" in c for c in reps) else ratio(reps, "ref2", "ref")
    print(f"| {srv} | {op} | {SIZE.get(rs, rs)} | {qd} | {len(reps)} | {med(reps, 'A', gibs)} "
          f"| {med(reps, 'ref', gibs)} | {ratio(reps, 'A', 'ref')} | {twin} "
          f"| {med(reps, 'A', cpu_per_gib)} / {med(reps, 'ref', cpu_per_gib)} "
          f"| {med(reps, 'A', lambda r: r.get('allocs_per_req'), '{:.3f}')} |")

if sentinel:
    print()
    print("Sentinel (nbdkit null, read 256K, depth 16, 256 MiB), in time order:")
    print()
    print("| time (UTC) | nbd-rs GiB/s | nbd-rs-b GiB/s | libnbd GiB/s |")
    print("|---|---|---|---|")
    runs = collections.OrderedDict()
    for r in sentinel:
        runs.setdefault(r["seq"], {})[role(r)] = r
    for by_role in runs.values():
        t = min(r["t"] for r in by_role.values())
        cell = lambda who: f"{gibs(by_role[who]):.2f}" if who in by_role else "–"
        print(f"| {time.strftime('%H:%M:%S', time.gmtime(t))} | {cell('A')} | {cell('A2')} "
              f"| {cell('ref')} |")
