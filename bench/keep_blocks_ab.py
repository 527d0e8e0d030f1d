"""The fsspec client with and without ``client.keep_freed_blocks``, alternated.

A ``read(8 MiB)`` loop gets a new result object per read (over HTTP: per read-ahead block).
With glibc's default thresholds the heap grows by the results alive at the start of each file
and is trimmed at its end, so every file faults that memory in again; ``keep_freed_blocks``
(docs/fsspec.md) sets the thresholds so that the freed memory is reused. The setting is per
process, so each row of a round runs in a process of its own, right after that round's
reference (a loopback stream; with ``--short-circuit``, reads of the worker's page files, a
page-cache read of the file); rows alternate in order between rounds. Printed per row: the read
rate (best of ``--runs`` files), its ratio to that round's reference, the client's minor page
faults and CPU time per file.

    .venv/bin/python bench/keep_blocks_ab.py --size-mib 1024 --rounds 4
    .venv/bin/python bench/keep_blocks_ab.py --size-mib 1024 --rounds 4 --short-circuit
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from read_bench import (
    MiB,
    depot_fs,
    gbps,
    loopback_tcp,
    page_cache_read,
    read_loop,
    worker_process,
    write_file,
)

ROWS = {"keep_freed_blocks: true (the default)": True, "keep_freed_blocks: false": False}


def minor_faults() -> int:
    with open("/proc/self/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


def child(endpoint: str, keep: bool, runs: int, short_circuit: bool) -> None:
    """One row of one round: prints a JSON line."""
    import fsspec

    from depot.core.config import load_config

    config = load_config(environ={}, overrides={
        "client": {"short_circuit": short_circuit, "keep_freed_blocks": keep}
    })  # fmt: skip
    fs = fsspec.filesystem("depot", endpoint=endpoint, config=config, skip_instance_cache=True,
                           ufs_fallback=False)  # fmt: skip
    read_loop(fs, "/big.bin")  # connections, routes, the first growth of the heap
    best = (0.0, 0, 0.0)
    for _ in range(runs):
        faults, cpu = minor_faults(), time.process_time()
        rate = gbps(*read_loop(fs, "/big.bin"))
        if rate > best[0]:
            best = (rate, minor_faults() - faults, time.process_time() - cpu)
    print(json.dumps({"rate": best[0], "faults": best[1], "cpu": best[2]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2, help="best of N files per row and round")
    parser.add_argument("--tmp", default=None, help="parent of the run's temp dir")
    parser.add_argument("--short-circuit", action="store_true",
                        help="read the worker's page files (a local client), not over HTTP")
    parser.add_argument("--child", nargs=2, metavar=("ENDPOINT", "KEEP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1] == "1", args.runs, args.short_circuit)
        return
    with tempfile.TemporaryDirectory(prefix="depot-keep-", dir=args.tmp) as tmp_name, \
            contextlib.ExitStack() as stack:  # fmt: skip
        tmp = Path(tmp_name)
        data = tmp / "data"
        data.mkdir()
        write_file(data / "big.bin", args.size_mib * MiB)
        mounts = [{"path": "/", "ufs": data.as_uri(), "metadata": "max-age=600s"}]
        worker = stack.enter_context(worker_process(tmp, "w", mounts))
        read_loop(depot_fs(worker), "/big.bin")  # fills the worker's cache
        results: dict[str, list[dict[str, float]]] = {name: [] for name in ROWS}
        for round_no in range(args.rounds):
            if args.short_circuit:
                reference_rate = max(page_cache_read(data / "big.bin") for _ in range(args.runs))
            else:
                reference_rate = max(loopback_tcp() for _ in range(args.runs))
            order = list(ROWS) if round_no % 2 == 0 else list(ROWS)[::-1]
            for name in order:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", worker, "1" if ROWS[name] else "0",
                     "--runs", str(args.runs), *(["--short-circuit"] if args.short_circuit else [])],
                    check=True, capture_output=True, text=True, env={**os.environ},
                )  # fmt: skip
                row = json.loads(out.stdout.strip().splitlines()[-1])
                results[name].append({**row, "reference": reference_rate})
            print(f"round {round_no + 1}: reference {reference_rate:.2f} GB/s, " + ", ".join(
                f"{name.split(':')[1].strip().split()[0]} {values[-1]['rate']:.2f} GB/s"
                for name, values in results.items()
            ), flush=True)  # fmt: skip
        gib = args.size_mib * MiB / 2**30
        if args.short_circuit:
            reference, over = "page-cache read", " (short-circuit)"
            reference_row = "page-cache read of the file (pread, 8 MiB buffer)"
        else:
            reference, over = "loopback", " (HTTP)"
            reference_row = "loopback TCP, 1 stream (Python sendall -> recv_into)"
        print()
        print(f"| {args.size_mib} MiB file, best of {args.runs} per round, {args.rounds} rounds | "
              f"median GB/s | x same round's {reference}: median (range) | minor faults per file | "
              "client CPU-s per GiB |")  # fmt: skip
        print("|---|---|---|---|---|")
        references = [r["reference"] for r in next(iter(results.values()))]
        print(f"| {reference_row} | "
              f"{statistics.median(references):.2f} ({min(references):.2f}-{max(references):.2f}) "
              "| 1.00 | - | - |")  # fmt: skip
        for name, values in results.items():
            ratios = [r["rate"] / r["reference"] for r in values]
            print(
                f"| fsspec read(8 MiB) loop{over}, {name} | "
                f"{statistics.median(r['rate'] for r in values):.2f} | "
                f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
                f"{statistics.median(r['faults'] for r in values):.0f} | "
                f"{statistics.median(r['cpu'] for r in values) / gib:.3f} |"
            )


if __name__ == "__main__":
    main()
