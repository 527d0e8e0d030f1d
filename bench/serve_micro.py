"""How a worker could send a cached page file over loopback TCP, measured side by side.

The worker's hot read path reads each page (``pread`` into a reused buffer), checks its xxh3
block sums, and sends the buffer. "Zero-copy" alternatives sound faster; this measures them on
this machine instead of assuming, one 1-stream transfer of the same file per strategy:

- ``memory``: send from a buffer already in memory (the loopback limit; no file at all);
- ``pread+send``: the worker's path without the checksum;
- ``pread+xxh3+send``: the worker's path;
- ``mmap+xxh3+send``: a long-lived mapping of the file, checksummed and sent from in place;
- ``sendfile``: the kernel sends page-cache pages (nothing can be verified on the way);
- ``mmap+xxh3+sendfile``: verify through a mapping, then ``sendfile`` the same pages;
- ``asyncio: pread+xxh3+write``: the worker's path through an asyncio transport (non-blocking
  sends, woken by epoll), as the worker's event loop does it.

The receiver is a separate process doing ``recv_into`` a reused 8 MiB buffer, as the client does.

    .venv/bin/python bench/serve_micro.py --size-mib 1024 --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import xxhash

PAGE = 4 * 1024 * 1024
BLOCK = 64 * 1024
_hash = xxhash.xxh3_64_intdigest

RECEIVER = """
import socket, sys, time
port, size, runs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port))
view = memoryview(bytearray(8 << 20))
best = 0.0
for _ in range(runs):
    t = time.perf_counter()
    s.sendall(b"g")
    got = 0
    while got < size:
        got += s.recv_into(view)
    best = max(best, size / (time.perf_counter() - t))
print(best)
"""


def _verify(view: memoryview, start: int, end: int) -> None:
    for block in range(start, end, BLOCK):
        _hash(view[block : min(end, block + BLOCK)])


def strategies(fd: int, size: int) -> dict[str, Callable[[socket.socket], None]]:
    buf = bytearray(PAGE)
    bview = memoryview(buf)
    mapping = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    mview = memoryview(mapping)
    memory = memoryview(bytearray(os.urandom(PAGE)))

    def from_memory(sock: socket.socket) -> None:
        for off in range(0, size, PAGE):
            sock.sendall(memory[: min(PAGE, size - off)])

    def pread_send(sock: socket.socket, verify: bool = False) -> None:
        for off in range(0, size, PAGE):
            n = os.preadv(fd, [bview], off)
            if verify:
                _verify(bview, 0, n)
            sock.sendall(bview[:n])

    def mmap_send(sock: socket.socket) -> None:
        for off in range(0, size, PAGE):
            end = min(size, off + PAGE)
            _verify(mview, off, end)
            sock.sendall(mview[off:end])

    def sendfile(sock: socket.socket, verify: bool = False) -> None:
        for off in range(0, size, PAGE):
            end = min(size, off + PAGE)
            if verify:
                _verify(mview, off, end)
            pos = off
            while pos < end:
                pos += os.sendfile(sock.fileno(), fd, pos, end - pos)

    def asyncio_write(sock: socket.socket) -> None:
        asyncio.run(_asyncio_send(sock, fd, size, bview))
        sock.setblocking(True)  # the transport made the shared socket non-blocking

    return {
        "memory (loopback limit)": from_memory,
        "pread+send": pread_send,
        "pread+xxh3+send (depot's path)": lambda s: pread_send(s, verify=True),
        "mmap+xxh3+send": mmap_send,
        "sendfile (unverified)": sendfile,
        "mmap+xxh3+sendfile": lambda s: sendfile(s, verify=True),
        "asyncio: pread+xxh3+write": asyncio_write,
    }


class _Sender(asyncio.Protocol):
    """Writes through the transport and waits, as the worker does, until it may reuse its buffer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def resume_writing(self) -> None:
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    async def flush(self) -> None:
        assert self.transport is not None
        if self.transport.get_write_buffer_size():
            self.transport.set_write_buffer_limits(high=0)
            self.drained = asyncio.get_running_loop().create_future()
            await self.drained
            self.transport.set_write_buffer_limits(high=1024 * 1024)


async def _asyncio_send(sock: socket.socket, fd: int, size: int, view: memoryview) -> None:
    loop = asyncio.get_running_loop()
    dup = socket.socket(fileno=os.dup(sock.fileno()))  # the caller closes its own
    transport, proto = await loop.connect_accepted_socket(_Sender, dup)
    try:
        for off in range(0, size, PAGE):
            n = os.preadv(fd, [view], off)
            _verify(view, 0, n)
            transport.write(view[:n])
            await proto.flush()
    finally:
        transport.abort()


def measure(send: Callable[[socket.socket], None], size: int, runs: int) -> float:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while conn.recv(1):
                send(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    out = subprocess.run(
        [sys.executable, "-c", RECEIVER, str(port), str(size), str(runs)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    thread.join(10)
    listener.close()
    return float(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=5, help="best of N transfers")
    parser.add_argument("--tmp", default=None, help="where the test file goes")
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="depot-serve-", dir=args.tmp) as tmp:
        path = Path(tmp) / "page-file"
        with path.open("wb") as f:
            for _ in range(0, size, PAGE):
                f.write(os.urandom(PAGE))
        fd = os.open(path, os.O_RDONLY)
        try:
            # Written just now, so the file is in the page cache.
            rows = [(name, measure(send, size, args.runs)) for name, send in
                    strategies(fd, size).items()]  # fmt: skip
        finally:
            os.close(fd)
    limit = rows[0][1]
    print(f"| strategy ({args.size_mib} MiB, 1 stream, best of {args.runs}) | GB/s | x loopback |")
    print("|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate / 1e9:.2f} | {rate / limit:.2f} |")


if __name__ == "__main__":
    main()
