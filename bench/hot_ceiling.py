"""How close any server on this machine gets to a loopback stream when it serves a hot file.

The hot-read figure compares depot with one loopback TCP stream (Python ``sendall`` ->
``recv_into``). A server of cached pages does more per byte than that stream's sender: it copies
each page out of the page cache and checks its block sums before sending. This measures what
that costs with no framework at all, so that depot's figure can be read against what is possible
here:

- ``bare server``: one thread per connection, blocking sockets, keep-alive HTTP/1.1 range GETs
  of one file, in ``memory`` (send one buffer again and again: loopback plus HTTP), ``pread``
  (page cache -> buffer -> socket) and ``pread+xxh3`` (the same plus xxh3 of every 64 KiB, as
  depot checks every page it serves) modes;
- ``depot``: a worker serving the same file from its cache, read by the fsspec client's
  ``read(8 MiB)`` loop and by the same blocking client as the bare server.

The blocking client fetches 8 MiB ranges into a reused buffer over 1 or 2 keep-alive
connections (2: each takes the next range) with depot's blocking transport, the least a client
can do. Every row of a round runs
right after that round's loopback stream, in alternating order; the summary gives medians and
the ratio to the same round's loopback, because this VM's loopback rate swings by a third between
minutes.

    .venv/bin/python bench/hot_ceiling.py --size-mib 1024 --rounds 4
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

sys.path.insert(0, str(Path(__file__).resolve().parent))

from read_bench import MiB, depot_fs, gbps, loopback_tcp, read_loop, worker_process, write_file

from depot.core.transport import BlockingPool, parse_endpoint

CHUNK = 8 * MiB
PAGE = 4 * MiB
BLOCK = 64 * 1024
MODES = ("memory", "pread", "pread+xxh3")


def serve(path: str, mode: str) -> None:
    """The bare server: prints its port, then serves range GETs of ``path`` until killed."""
    import xxhash

    digest = xxhash.xxh3_64_intdigest
    fd = os.open(path, os.O_RDONLY)
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)

    def answer(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        view = memoryview(bytearray(PAGE))
        head = conn.makefile("rb")
        with conn:
            while head.readline():
                start = end = 0
                while (line := head.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"range:"):
                        first, last = line.split(b"=", 1)[1].strip().split(b"-")
                        start, end = int(first), int(last) + 1
                conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: %d\r\n\r\n"
                             % (end - start))  # fmt: skip
                for pos in range(start, end, PAGE):
                    n = min(PAGE, end - pos)
                    if mode != "memory":
                        os.preadv(fd, [view[:n]], pos)
                        if mode == "pread+xxh3":
                            for block in range(0, n, BLOCK):
                                digest(view[block : min(n, block + BLOCK)])
                    conn.sendall(view[:n])

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=answer, args=(conn,), daemon=True).start()


def blocking_client(endpoint: str, target: str, size: int, lanes: int) -> float:
    """Fetch ``size`` bytes in 8 MiB ranges over ``lanes`` connections; GB/s.

    Each lane is a thread on depot's blocking keep-alive transport (``BlockingPool``, as the
    client's caller-thread reads use), receiving into one reused buffer.
    """
    pool = BlockingPool(parse_endpoint(endpoint), max_idle=lanes)
    positions = iter(range(0, size, CHUNK))
    lock = threading.Lock()

    def lane() -> None:
        view = memoryview(bytearray(CHUNK))
        while True:
            with lock:
                pos = next(positions, None)
            if pos is None:
                return
            end = min(size, pos + CHUNK)
            response = pool.get_into(target, [("Range", f"bytes={pos}-{end - 1}")], view)
            if response.status != 206 or response.length != end - pos:
                raise ConnectionError(f"{response.status}, {response.length} bytes at {pos}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=lane) for _ in range(lanes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    pool.close()
    return gbps(size, elapsed)


@contextlib.contextmanager
def bare_server(path: Path, mode: str) -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, __file__, "--serve", mode, str(path)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None
        yield f"http://127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        proc.kill()
        proc.wait(30)


def alternate_rounds(rows: dict[str, Callable[[], float]], size_mib: int, rounds: int,
                     runs: int) -> None:  # fmt: skip
    """Run every row (best of ``runs``) right after each round's loopback stream, in alternating
    order, and print medians and ratios to the same round's loopback: this VM's loopback rate
    swings by a third between minutes."""
    loopback: list[float] = []
    results: dict[str, list[float]] = {name: [] for name in rows}
    for round_no in range(rounds):
        loopback.append(max(loopback_tcp() for _ in range(runs)))
        order = list(rows) if round_no % 2 == 0 else list(rows)[::-1]
        for name in order:
            results[name].append(max(rows[name]() for _ in range(runs)))
        print(
            f"round {round_no + 1}: loopback {loopback[-1]:.2f} GB/s, "
            + ", ".join(f"{name} {values[-1]:.2f}" for name, values in results.items()),
            flush=True,
        )
    print()
    print(f"| {size_mib} MiB, best of {runs} per round, {rounds} rounds | "
          "median GB/s | x same round's loopback: median (range) |")  # fmt: skip
    print("|---|---|---|")
    print(
        f"| loopback TCP, 1 stream (Python sendall -> recv_into) | "
        f"{statistics.median(loopback):.2f} ({min(loopback):.2f}-{max(loopback):.2f}) | 1.00 |"
    )
    for name, values in results.items():
        ratios = [v / lb for v, lb in zip(values, loopback, strict=True)]
        print(
            f"| {name} | {statistics.median(values):.2f} | {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}-{max(ratios):.2f}) |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=2, help="best of N transfers per row and round")
    parser.add_argument("--tmp", default=None, help="parent of the run's temp dir")
    parser.add_argument("--serve", nargs=2, metavar=("MODE", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[1], args.serve[0])
        return
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="depot-ceiling-", dir=args.tmp) as tmp, \
            contextlib.ExitStack() as stack:  # fmt: skip
        data = Path(tmp) / "data"
        data.mkdir()
        write_file(data / "big.bin", size)
        file = data / "big.bin"
        rows: dict[str, Callable[[], float]] = {}
        for mode in MODES:
            endpoint = stack.enter_context(bare_server(file, mode))
            for lanes in (1, 2):
                rows[f"bare server, {mode}, {lanes} conn"] = lambda e=endpoint, n=lanes: (
                    blocking_client(e, "/big.bin", size, n)
                )
        mounts = [{"path": "/", "ufs": data.as_uri(), "metadata": "max-age=600s"}]
        worker = stack.enter_context(worker_process(Path(tmp), "w", mounts))
        fs = depot_fs(worker)
        read_loop(fs, "/big.bin")  # fills the worker's cache
        target = f"/api/v1/read?path={quote('/big.bin', safe='')}"
        rows["depot worker, fsspec read(8 MiB) loop"] = lambda: gbps(*read_loop(fs, "/big.bin"))
        for lanes in (1, 2):
            rows[f"depot worker, blocking client, {lanes} conn"] = lambda n=lanes: blocking_client(
                worker, target, size, n
            )
        alternate_rounds(rows, args.size_mib, args.rounds, args.runs)

if __name__ == "__main__":
    main()
