"""Hot lanes on and off, with the client's read-ahead blocks received in threads or on its loop.

A hot sequential read over loopback is bound by the worker's event loop (one core sends every
response) and by the client's event loop (one core receives every block). Hot lanes
(worker/lanes.py) send a connection's large cached reads from a thread of its own; the fsspec
client receives read-ahead blocks on blocking connections in two threads (client/fs.py). This
runs the 2 x 2 of those, and the same blocking two-connection client against the bare threaded
server of ``hot_ceiling.py``, each row right after that round's loopback stream, in alternating
order, and prints medians and ratios to the same round's loopback:

    .venv/bin/python bench/hot_lanes_ab.py --size-mib 1024 --rounds 4
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import fsspec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hot_ceiling import alternate_rounds, bare_server, blocking_client
from read_bench import MiB, gbps, read_loop, worker_process, write_file

from depot.core.config import load_config


def depot_fs(endpoint: str, block_threads: bool) -> Any:
    """The fsspec client over HTTP; ``block_threads`` False keeps every read on its loop."""
    config = load_config(environ={}, overrides={
        "client": {"short_circuit": False, "caller_thread_reads": block_threads}
    })  # fmt: skip
    return fsspec.filesystem("depot", endpoint=endpoint, config=config, skip_instance_cache=True,
                             ufs_fallback=False)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2, help="best of N transfers per row and round")
    parser.add_argument("--tmp", default=None, help="parent of the run's temp dir")
    args = parser.parse_args()
    size = args.size_mib * MiB
    target = f"/api/v1/read?path={quote('/big.bin', safe='')}"
    with tempfile.TemporaryDirectory(prefix="depot-lanes-", dir=args.tmp) as tmp_name, \
            contextlib.ExitStack() as stack:  # fmt: skip
        tmp = Path(tmp_name)
        data = tmp / "data"
        data.mkdir()
        write_file(data / "big.bin", size)
        bare = stack.enter_context(bare_server(data / "big.bin", "pread+xxh3"))
        mounts = [{"path": "/", "ufs": data.as_uri(), "metadata": "max-age=600s"}]
        on = stack.enter_context(worker_process(tmp, "on", mounts, worker={"hot_lanes": 4}))
        off = stack.enter_context(worker_process(tmp, "off", mounts, worker={"hot_lanes": 0}))
        clients = {(e, t): depot_fs(e, t) for e in (on, off) for t in (True, False)}
        for endpoint in (on, off):
            read_loop(clients[endpoint, False], "/big.bin")  # fills the worker's cache
        rows: dict[str, Callable[[], float]] = {
            "bare server (hot_ceiling.py), blocking client, 2 conn":
                lambda: blocking_client(bare, "/big.bin", size, 2),
        }  # fmt: skip
        for label, endpoint in (("on", on), ("off", off)):
            rows[f"lanes {label}, blocking client, 2 conn"] = lambda e=endpoint: blocking_client(
                e, target, size, 2
            )
            for threads in (True, False):
                where = "in threads" if threads else "on its loop"
                rows[f"lanes {label}, fsspec read(8 MiB) loop, blocks {where}"] = (
                    lambda c=clients[endpoint, threads]: gbps(*read_loop(c, "/big.bin"))
                )
        alternate_rounds(rows, args.size_mib, args.rounds, args.runs)

if __name__ == "__main__":
    main()
