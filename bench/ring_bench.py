"""Placement-ring benchmark: build time, balance, movement on join/leave, lookup cost.

Builds the Alluxio-compatible ring (``depot.placement.HashRing``) over 100 workers with 2000
virtual nodes, places 1,000,000 file keys, and prints one table (markdown):

- ring build time;
- load balance: keys per worker, max/mean and min/mean (target max/mean <= 1.10);
- keys moved when one worker joins and when one leaves, as a fraction of all keys and as a multiple
  of the ideal 1/N (target <= 1.5/N);
- lookup cost per key (count=1 and count=3), next to the cost of the machine's own primitives
  measured in the same run (one MurmurHash3 call, one bisect over the ring's points), so the
  figure also reads as a ratio.

CPU only, single thread, no I/O. Run: ``.venv/bin/python bench/ring_bench.py [--keys 1000000]``
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from array import array
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable

from depot.placement import HashRing, WorkerIdentity, murmur3_32


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def best_of(n: int, fn: Callable[[], float]) -> float:
    """Best of n runs (a time): these shared machines drift, the best run is the capability."""
    return min(fn() for _ in range(n))


def owners(ring: HashRing[int], keys: list[str]) -> list[int]:
    lookup = ring.lookup
    return [lookup(k, 1)[0] for k in keys]


def main() -> None:
    parser = argparse.ArgumentParser(description="depot placement-ring benchmark")
    parser.add_argument("--keys", type=int, default=1_000_000, help="file keys to place")
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--virtual-nodes", type=int, default=2000)
    parser.add_argument("--timed-keys", type=int, default=200_000,
                        help="keys in each timed lookup loop (capped at --keys)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    rows: list[tuple[str, str, str]] = []

    def row(name: str, value: str, note: str = "") -> None:
        rows.append((name, value, note))
        print(f"  {name}: {value} {note}", file=sys.stderr, flush=True)

    n_workers, vnodes = args.workers, args.virtual_nodes
    identities = [WorkerIdentity.from_host(f"bench-worker-{i:03d}.depot") for i in range(n_workers)]
    workers = {ident: i for i, ident in enumerate(identities)}
    keys = [f"s3://bench-bucket/datasets/train/part-{i:07d}.parquet" for i in range(args.keys)]
    timed = keys[: min(args.timed_keys, len(keys))]

    row("machine", f"Python {platform.python_version()} ({platform.python_implementation()})",
        f"{cpu_model()}, {usable_cores()} usable cores of {os.cpu_count()}")

    # build
    def build() -> float:
        t0 = time.perf_counter()
        HashRing(workers, vnodes)
        return time.perf_counter() - t0

    build_s = best_of(args.runs, build)
    ring = HashRing(workers, vnodes)
    n_points = len(ring.points())
    row(f"ring build ({n_workers} workers x {vnodes} virtual nodes)", f"{build_s * 1e3:.0f} ms",
        f"{n_points:,} points ({n_workers * vnodes - n_points} lost to collisions)")

    # machine primitives, same run: the two operations a lookup is made of, on the same keys
    encoded = [k.encode() + b"\x01\x00\x00\x00" for k in timed]
    hashes = [murmur3_32(b) for b in encoded]
    points = array("i", [p for p, _ in ring.points()])

    def hash_loop() -> float:
        t0 = time.perf_counter()
        for b in encoded:
            murmur3_32(b)
        return (time.perf_counter() - t0) / len(encoded)

    def bisect_loop() -> float:
        t0 = time.perf_counter()
        for h in hashes:
            bisect_left(points, h)
        return (time.perf_counter() - t0) / len(hashes)

    hash_ns = best_of(args.runs, hash_loop) * 1e9
    bisect_ns = best_of(args.runs, bisect_loop) * 1e9
    row("machine: one murmur3_32 call (mmh3, ~60-byte key, in a Python loop)", f"{hash_ns:.0f} ns")
    row(f"machine: one bisect over {n_points:,} int32 points (random probes, in a Python loop)",
        f"{bisect_ns:.0f} ns")

    # lookup cost
    def lookup_loop(count: int) -> Callable[[], float]:
        def run() -> float:
            lookup = ring.lookup
            t0 = time.perf_counter()
            for k in timed:
                lookup(k, count)
            return (time.perf_counter() - t0) / len(timed)
        return run

    floor_ns = hash_ns + bisect_ns
    for count in (1, 3):
        us = best_of(args.runs, lookup_loop(count)) * 1e6
        row(f"lookup cost per key, count={count}", f"{us:.2f} µs",
            f"{us * 1e3 / (count * floor_ns):.1f}x the floor of {count} hash + bisect; "
            f"{len(timed):,} keys, best of {args.runs}")

    # balance
    t0 = time.perf_counter()
    before = owners(ring, keys)
    place_s = time.perf_counter() - t0
    load = Counter(before)
    mean = len(keys) / n_workers
    max_mean = max(load.values()) / mean
    row(f"place {len(keys):,} keys (primary worker)", f"{place_s:.2f} s",
        f"{len(keys) / place_s / 1e6:.2f} M keys/s")
    row("load balance: max/mean", f"{max_mean:.3f}",
        f"min/mean {min(load.values()) / mean:.3f}; mean {mean:,.0f} keys/worker; "
        f"target <= 1.10: {'met' if max_mean <= 1.10 else 'NOT met'}")

    # movement
    newcomer = WorkerIdentity.from_host("bench-worker-new.depot")
    joined = ring.with_worker(newcomer, n_workers)
    after = owners(joined, keys)
    moved = sum(1 for a, b in zip(before, after, strict=True) if a != b)
    stray = sum(1 for a, b in zip(before, after, strict=True) if a != b and b != n_workers)
    frac = moved / len(keys)
    ideal = 1 / (n_workers + 1)
    row(f"keys moved when 1 worker joins ({n_workers} -> {n_workers + 1})", f"{frac:.4%}",
        f"{frac / ideal:.2f} x 1/N (N={n_workers + 1}); {stray} moved elsewhere than the newcomer; "
        f"target <= 1.5/N: {'met' if frac <= 1.5 * ideal else 'NOT met'}")

    leaver = identities[n_workers // 2]
    left = ring.without_worker(leaver)
    after = owners(left, keys)
    moved = sum(1 for a, b in zip(before, after, strict=True) if a != b)
    stray = sum(1 for a, b in zip(before, after, strict=True) if a != b and a != workers[leaver])
    frac = moved / len(keys)
    ideal = 1 / n_workers
    row(f"keys moved when 1 worker leaves ({n_workers} -> {n_workers - 1})", f"{frac:.4%}",
        f"{frac / ideal:.2f} x 1/N (N={n_workers}); {stray} moved from other workers than the leaver; "
        f"target <= 1.5/N: {'met' if frac <= 1.5 * ideal else 'NOT met'}")

    print("\n| measurement | result | notes |\n|---|---|---|")
    for name, value, note in rows:
        print(f"| {name} | {value} | {note} |")


if __name__ == "__main__":
    main()
