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
connections (2: each takes the next range), the least a client can do. Every row of a round runs
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


def _get_into(sock: socket.socket, request: bytes, view: memoryview, head: bytearray) -> None:
    sock.sendall(request)
    got = 0
    while (end := head.find(b"\r\n\r\n", 0, got)) < 0:
        n = sock.recv_into(memoryview(head)[got:])
        if not n:
            raise ConnectionError("server closed the connection")
        got += n
    lines = bytes(head[:end]).lower().split(b"\r\n")
    if b" 206 " not in lines[0] + b" ":
        raise ConnectionError(f"unexpected answer {lines[0]!r}")
    length = next(int(v.split(b":", 1)[1]) for v in lines if v.startswith(b"content-length:"))
    if length > len(view):
        raise ConnectionError(f"body of {length} bytes for a buffer of {len(view)}")
    have = got - end - 4
    view[:have] = head[end + 4 : got]
    while have < length:
        n = sock.recv_into(view[have:length])
        if not n:
            raise ConnectionError("body cut short")
        have += n


def blocking_client(endpoint: str, target: str, size: int, lanes: int) -> float:
    """Fetch ``size`` bytes in 8 MiB ranges over ``lanes`` connections; GB/s."""
    host, port = endpoint.split("//", 1)[1].rsplit(":", 1)
    socks = [socket.create_connection((host, int(port))) for _ in range(lanes)]
    for sock in socks:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    positions = iter(range(0, size, CHUNK))
    lock = threading.Lock()

    def lane(sock: socket.socket) -> None:
        view, head = memoryview(bytearray(CHUNK)), bytearray(64 * 1024)
        while True:
            with lock:
                pos = next(positions, None)
            if pos is None:
                return
            end = min(size, pos + CHUNK)
            request = (f"GET {target} HTTP/1.1\r\nHost: {host}\r\n"
                       f"Range: bytes={pos}-{end - 1}\r\n\r\n").encode()  # fmt: skip
            _get_into(sock, request, view, head)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=lane, args=(s,)) for s in socks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    for sock in socks:
        sock.close()
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
        loopback: list[float] = []
        results: dict[str, list[float]] = {name: [] for name in rows}
        for round_no in range(args.rounds):
            loopback.append(max(loopback_tcp() for _ in range(args.runs)))
            order = list(rows) if round_no % 2 == 0 else list(rows)[::-1]
            for name in order:
                results[name].append(max(rows[name]() for _ in range(args.runs)))
            print(
                f"round {round_no + 1}: loopback {loopback[-1]:.2f} GB/s, "
                + ", ".join(f"{name} {values[-1]:.2f}" for name, values in results.items()),
                flush=True,
            )
    print()
    print(f"| {args.size_mib} MiB, best of {args.runs} per round, {args.rounds} rounds | "
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


if __name__ == "__main__":
    main()
