"""Hot lanes (worker/lanes.py): large cached reads sent from a thread per connection, against a
real worker over real sockets. Each test checks the bytes, the connection's state and the
worker's counters, so a lane that served wrong bytes, lost a request or kept a connection it
should have given back fails here."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from depot.client.fs import DepotFileSystem
from depot.core.config import load_config
from depot.testing.damage import flip_byte
from depot.testing.local import LocalWorker

PAGE = 256 * 1024
SIZE = 12 * PAGE + 1000  # 3 MiB and a partial last page


class Conn:
    """One keep-alive connection, requests answered in order (no client library in between)."""

    def __init__(self, endpoint: str) -> None:
        host, port = endpoint.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.pending = b""

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def request(self, target: str, headers: dict[str, str] | None = None) -> None:
        lines = [f"GET {target} HTTP/1.1", "Host: test"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode())

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before a response head")
            self.pending += chunk
        head, _, rest = self.pending.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        body = bytearray(rest)
        while len(body) < length:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError(f"closed after {len(body)} of {length} body bytes")
            body += chunk
        self.pending = bytes(body[length:])
        return status, headers, bytes(body[:length])

    def read(self, path: str, rng: tuple[int, int] | None = None, **headers: str) -> tuple[
        int, dict[str, str], bytes
    ]:
        h = dict(headers)
        if rng is not None:
            h["Range"] = f"bytes={rng[0]}-{rng[1] - 1}"
        self.request(f"/api/v1/read?path={quote(path, safe='')}", h)
        return self.response()

    def closed(self, timeout: float = 5.0) -> bool:
        """Whether the worker closed this connection (within ``timeout``)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (TimeoutError, BlockingIOError):
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def data(tmp_path: Path) -> bytes:
    root = tmp_path / "ufs"
    root.mkdir()
    payload = os.urandom(SIZE)
    (root / "big.bin").write_bytes(payload)
    (root / "small.txt").write_text("small")
    return payload


def _worker(tmp_path: Path, memory_size: int | str = "auto", **worker: Any) -> LocalWorker:
    extra: dict[str, Any] = {"cache": {"memory_size": memory_size}}
    if worker:
        extra["worker"] = worker
    return LocalWorker((tmp_path / "ufs").as_uri(), tmp_path / "cache", page_size=PAGE,
                       cache_size="64MiB", metadata="max-age=600s", extra=extra)  # fmt: skip


@pytest.fixture
def worker(tmp_path: Path, data: bytes) -> Iterator[LocalWorker]:
    with _worker(tmp_path) as w:
        _warm(w)
        yield w


@pytest.fixture
def files_only_worker(tmp_path: Path, data: bytes) -> Iterator[LocalWorker]:
    """A worker without a memory tier: every lane read reads and checks the page files."""
    with _worker(tmp_path, memory_size=0) as w:
        _warm(w)
        yield w


def _stats(worker: LocalWorker) -> dict[str, Any]:
    conn = Conn(worker.endpoint)
    try:
        conn.request("/api/v1/cache/stats")
        status, _, body = conn.response()
    finally:
        conn.close()
    assert status == 200, body
    return dict(json.loads(body))


def _lanes(worker: LocalWorker) -> dict[str, int]:
    return dict(_stats(worker)["hot_lanes"])


def _warm(worker: LocalWorker) -> None:
    """Read the file once (misses), then wait until every page is stored."""
    conn = Conn(worker.endpoint)
    assert conn.read("/big.bin")[0] == 200
    conn.close()
    deadline = time.monotonic() + 10
    while _stats(worker)["pages"] < 13:
        assert time.monotonic() < deadline, "pages were not stored"
        time.sleep(0.02)


def _load(worker: LocalWorker) -> None:
    """Store every page with a load (``POST /api/v1/cache/load``): stored, not held in memory."""
    conn = Conn(worker.endpoint)
    conn.send(b"POST /api/v1/cache/load?path=%2Fbig.bin HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    status, _, body = conn.response()
    conn.close()
    assert status == 200, body
    assert json.loads(body)["cached"] == 13


def _wait(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_large_hot_read_moves_its_connection_to_a_lane_that_serves_what_follows(
    worker: LocalWorker, data: bytes
) -> None:
    loop_answer = Conn(worker.endpoint)
    # Under the lane size: the loop answers, and its head is what a lane must send too.
    status, loop_headers, body = loop_answer.read("/big.bin", (5, 1000))
    assert status == 206 and body == data[5:1000]
    assert _lanes(worker)["connections"] == 0
    conn = Conn(worker.endpoint)
    hits = _stats(worker)["hits"]
    ranges = [
        (0, 2 * 1024 * 1024),  # planned by the loop, sent by a lane
        (PAGE + 7, SIZE - 3),  # unaligned at both ends, across every page
        (SIZE - 1024 * 1024 - 1, SIZE),  # up to the short last page
        (3 * PAGE, 7 * PAGE),
    ]
    for start, end in ranges:
        status, headers, body = conn.read("/big.bin", (start, end))
        assert status == 206
        assert body == data[start:end], (start, end)
        assert headers["content-range"] == f"bytes {start}-{end - 1}/{SIZE}"
        assert headers["x-depot-cache"] == "hit"
        for name in ("etag", "x-depot-size", "content-type", "accept-ranges"):
            assert headers[name] == loop_headers[name], name
    status, headers, body = conn.read("/big.bin")  # no Range: the whole file, 200
    assert status == 200 and body == data and "content-range" not in headers
    lanes = _lanes(worker)
    assert lanes["connections"] == 1 and lanes["active"] == 1
    assert lanes["requests"] == 5 and lanes["handed_back"] == 0
    assert lanes["bytes"] == sum(e - s for s, e in ranges) + SIZE
    stats = _stats(worker)
    pages_read = sum((e - 1) // PAGE - s // PAGE + 1 for s, e in ranges) + 13
    assert stats["hits"] - hits == pages_read  # every page a lane read counts as a hit
    assert stats["misses"] == 13  # (the warm-up's)
    conn.close()
    loop_answer.close()


def test_requests_a_lane_does_not_serve_go_back_to_the_loop_on_the_same_connection(
    worker: LocalWorker, data: bytes
) -> None:
    conn = Conn(worker.endpoint)
    assert conn.read("/big.bin", (0, 2 * 1024 * 1024))[2] == data[: 2 * 1024 * 1024]
    handed = 0

    def back_on_loop() -> None:
        nonlocal handed
        handed += 1
        assert _lanes(worker)["handed_back"] == handed

    conn.request(f"/api/v1/stat?path={quote('/big.bin', safe='')}")  # not a read
    status, _, body = conn.response()
    assert status == 200 and json.loads(body)["size"] == SIZE
    back_on_loop()
    assert conn.read("/big.bin", (0, SIZE))[2] == data  # to a lane again
    status, _, body = conn.read("/big.bin", (SIZE + 10, SIZE + 20))  # unsatisfiable range
    assert status == 416 and json.loads(body)["error"]["code"] == "InvalidRange"
    back_on_loop()
    conn.read("/big.bin", (0, SIZE))
    status, _, body = conn.read("/big.bin", (0, SIZE), **{"If-Match": '"not-the-version"'})
    assert status == 412 and json.loads(body)["error"]["code"] == "StaleVersion"
    back_on_loop()
    conn.read("/big.bin", (0, SIZE))
    status, _, body = conn.read("/missing.bin", (0, SIZE))
    assert status == 404
    back_on_loop()
    conn.read("/big.bin", (0, SIZE))
    status, _, body = conn.read("/small.txt")  # cached nowhere yet: a miss, on the loop
    assert status == 200 and body == b"small"
    back_on_loop()
    conn.read("/big.bin", (0, SIZE))
    conn.send(b"GET /api/v1/read?path=%2Fbig.bin HTTP/1.1\r\nRange: bytes=0-1\r\nBad header\r\n\r\n")
    status, _, body = conn.response()
    assert status == 400  # the loop's answer to a malformed head
    back_on_loop()
    assert conn.closed()
    conn.close()


def test_pipelined_requests_and_connection_close_on_a_lane(
    worker: LocalWorker, data: bytes
) -> None:
    conn = Conn(worker.endpoint)
    target = f"/api/v1/read?path={quote('/big.bin', safe='')}"
    one = f"GET {target} HTTP/1.1\r\nRange: bytes=0-{SIZE - 1}\r\n\r\n"
    two = f"GET {target} HTTP/1.1\r\nRange: bytes=100-{SIZE - 101}\r\n\r\n"
    last = f"GET {target} HTTP/1.1\r\nRange: bytes=1-{SIZE - 2}\r\nConnection: close\r\n\r\n"
    conn.send((one + two + last).encode())  # the second and third wait in the handed bytes
    assert conn.response()[2] == data
    assert conn.response()[2] == data[100 : SIZE - 100]
    status, headers, body = conn.response()
    assert status == 206 and body == data[1 : SIZE - 1]
    assert headers["connection"] == "close"
    assert conn.closed()
    lanes = _lanes(worker)
    assert lanes["requests"] == 3 and lanes["active"] == 0
    conn.close()


def _page_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "cache" / "pages").rglob("*") if p.is_file()]


def test_a_damaged_or_evicted_page_under_a_lane_is_read_through_the_loop(
    tmp_path: Path, files_only_worker: LocalWorker, data: bytes
) -> None:
    worker = files_only_worker
    conn = Conn(worker.endpoint)
    assert conn.read("/big.bin", (0, SIZE))[2] == data  # now on a lane
    files = sorted(_page_files(tmp_path))
    assert len(files) == 13
    flip_byte(files[3], 100, 0xFF)  # one flipped byte in the data of a page
    files[5].unlink()  # and a page gone behind the worker's back
    status, _, body = conn.read("/big.bin", (0, SIZE))
    assert status == 206 and body == data
    lanes = _lanes(worker)
    assert lanes["parts_from_loop"] == 2 and lanes["active"] == 1
    stats = _stats(worker)
    assert stats["ufs_reads"] >= 13 + 2  # the two pages fetched again
    assert conn.read("/big.bin", (0, SIZE))[2] == data
    conn.close()


def test_a_cold_read_fills_no_memory_and_the_next_whole_read_does(
    tmp_path: Path, data: bytes
) -> None:
    """A page goes into the memory tier on a whole read after its first use: a cold read (its
    pages stored by the worker's read-ahead before they are asked for) holds none; the read
    after it holds every page, and the one after that is answered from memory."""
    with _worker(tmp_path) as worker:
        _warm(worker)  # a cold read over HTTP
        assert _stats(worker)["memory_pages"] == 0
        conn = Conn(worker.endpoint)
        assert conn.read("/big.bin", (0, SIZE))[2] == data
        _wait(lambda: _stats(worker)["memory_pages"] == 13, "the pages were not held")
        for path in _page_files(tmp_path):
            flip_byte(path, 100, 0xFF)  # answered from memory: the files are not read
        hits = _stats(worker)["memory_hits"]
        assert conn.read("/big.bin", (0, SIZE))[2] == data
        stats = _stats(worker)
        assert stats["memory_hits"] - hits == 13 and stats["corrupt_dropped"] == 0
        conn.close()


def test_hot_pages_are_sent_from_the_memory_tier_once_a_lane_read_them_whole(
    tmp_path: Path, data: bytes
) -> None:
    with _worker(tmp_path) as worker:
        _load(worker)  # stored, not held
        conn = Conn(worker.endpoint)
        assert conn.read("/big.bin", (0, SIZE))[2] == data  # every page's first use
        conn.close()
        assert _stats(worker)["memory_pages"] == 0
        _lane_admission(tmp_path, worker, data)


def _lane_admission(tmp_path: Path, worker: LocalWorker, data: bytes) -> None:
    conn = Conn(worker.endpoint)
    assert conn.read("/big.bin", (PAGE + 1, 3 * PAGE))[2] == data[PAGE + 1 : 3 * PAGE]
    assert _lanes(worker)["parts_from_memory"] == 0
    _wait(lambda: _stats(worker)["memory_pages"] == 1, "the one whole page was not held")
    assert conn.read("/big.bin", (0, SIZE))[2] == data  # reads the other 12 whole
    _wait(lambda: _stats(worker)["memory_pages"] == 13, "the pages were not held")
    assert _lanes(worker)["parts_from_memory"] == 1
    stats = _stats(worker)
    assert stats["memory_bytes"] == SIZE and stats["memory_capacity_bytes"] > SIZE
    # Damage every page file: what follows is answered from memory, without opening them.
    for path in _page_files(tmp_path):
        flip_byte(path, 100, 0xFF)
    hits = stats["memory_hits"]
    ranges = [(0, SIZE), (PAGE + 7, SIZE - 3), (3 * PAGE, 7 * PAGE)]
    for start, end in ranges:
        status, _, body = conn.read("/big.bin", (start, end))
        assert status == 206 and body == data[start:end], (start, end)
    lanes = _lanes(worker)
    parts = sum((e - 1) // PAGE - s // PAGE + 1 for s, e in ranges)
    assert lanes["parts_from_memory"] == 1 + parts and lanes["parts_from_loop"] == 0
    stats = _stats(worker)
    assert stats["memory_hits"] - hits == parts and stats["corrupt_dropped"] == 0
    # A read under the lane size, answered on the loop: from memory too.
    loop_conn = Conn(worker.endpoint)
    assert loop_conn.read("/big.bin", (PAGE - 5, PAGE + 5))[2] == data[PAGE - 5 : PAGE + 5]
    assert _stats(worker)["memory_hits"] - hits == parts + 2
    # Freed: the pages leave memory with their files, and the next read is a miss again
    # (the damaged files are gone, so its bytes come from the under store).
    conn.close()
    loop_conn.close()
    free = Conn(worker.endpoint)
    free.send(b"POST /api/v1/cache/free?path=%2Fbig.bin HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    status, _, body = free.response()
    assert status == 200, body
    free.close()
    stats = _stats(worker)
    assert (stats["memory_pages"], stats["memory_bytes"]) == (0, 0)
    misses = _stats(worker)["misses"]
    conn = Conn(worker.endpoint)
    assert conn.read("/big.bin", (0, SIZE))[2] == data
    assert _stats(worker)["misses"] - misses == 13
    conn.close()


def test_a_worker_without_a_memory_tier_reads_every_page_file(
    files_only_worker: LocalWorker, data: bytes
) -> None:
    conn = Conn(files_only_worker.endpoint)
    for _ in range(3):
        assert conn.read("/big.bin", (0, SIZE))[2] == data
    stats = _stats(files_only_worker)
    assert (stats["memory_capacity_bytes"], stats["memory_pages"], stats["memory_hits"]) == (
        0, 0, 0,
    )
    assert _lanes(files_only_worker)["parts_from_memory"] == 0
    conn.close()


def test_an_idle_lane_connection_goes_back_to_the_loop_and_stays_open(
    worker: LocalWorker, data: bytes
) -> None:
    lanes = worker.worker.lanes
    assert lanes is not None
    lanes.lane_idle = 0.2
    conn = Conn(worker.endpoint)
    assert conn.read("/big.bin", (0, SIZE))[2] == data
    _wait(lambda: _lanes(worker)["handed_back"] == 1, "the idle connection was not given back")
    assert _lanes(worker)["active"] == 0
    status, _, body = conn.read("/big.bin", (7, SIZE))  # the loop answers and hands it again
    assert status == 206 and body == data[7:]
    assert _lanes(worker)["connections"] == 2
    conn.close()


def test_a_client_gone_mid_response_frees_its_lane(worker: LocalWorker, data: bytes) -> None:
    conn = Conn(worker.endpoint)
    assert conn.read("/big.bin", (0, SIZE))[2] == data
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.request(f"/api/v1/read?path={quote('/big.bin', safe='')}")
    conn.sock.recv(1000)
    conn.close()  # reset, with most of the body unsent
    _wait(lambda: _lanes(worker)["active"] == 0, "the lane did not end")
    fresh = Conn(worker.endpoint)
    assert fresh.read("/big.bin", (0, SIZE))[2] == data
    fresh.close()


def test_stopping_the_worker_closes_lane_connections(tmp_path: Path, data: bytes) -> None:
    worker = _worker(tmp_path).start()
    try:
        _warm(worker)
        conn = Conn(worker.endpoint)
        assert conn.read("/big.bin", (0, SIZE))[2] == data
        assert _lanes(worker)["active"] == 1
    finally:
        worker.stop()
    assert conn.closed()
    conn.close()


def test_hot_lanes_off_serves_every_read_from_the_loop(tmp_path: Path, data: bytes) -> None:
    with _worker(tmp_path, hot_lanes=0) as worker:
        _warm(worker)
        assert worker.worker.lanes is None
        conn = Conn(worker.endpoint)
        for _ in range(2):
            assert conn.read("/big.bin", (0, SIZE))[2] == data
        assert "hot_lanes" not in _stats(worker)
        conn.close()


def test_fsspec_read_ahead_blocks_arrive_on_blocking_connections(
    worker: LocalWorker, data: bytes
) -> None:
    config = load_config(environ={}, overrides={"client": {"short_circuit": False}})
    fs = DepotFileSystem(endpoint=worker.endpoint, config=config, skip_instance_cache=True)
    try:
        chunk = 1024 * 1024
        with fs.open("/big.bin", "rb") as f:
            got = b"".join(iter(lambda: f.read(chunk), b""))
        assert got == data
        client = fs.client_now()
        assert client is not None
        assert client.read_now_stats["served"] >= 1  # read-ahead blocks, from its threads
        assert _lanes(worker)["requests"] >= 1
    finally:
        fs.close()


def test_lane_reads_run_beside_loop_reads_of_the_same_file(
    worker: LocalWorker, data: bytes
) -> None:
    """Lanes and the loop read the same pages at once; every answer is whole and right."""

    async def small_reads() -> None:
        reader, writer = await asyncio.open_connection(*worker.endpoint[7:].rsplit(":", 1))
        target = f"/api/v1/read?path={quote('/big.bin', safe='')}"
        for i in range(40):
            start = (i * 7919) % (SIZE - 100)
            writer.write(f"GET {target} HTTP/1.1\r\nRange: bytes={start}-{start + 99}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            assert b" 206 " in head.split(b"\r\n")[0]
            assert await reader.readexactly(100) == data[start : start + 100]
        writer.close()

    conns = [Conn(worker.endpoint) for _ in range(3)]
    for conn in conns:
        conn.request(f"/api/v1/read?path={quote('/big.bin', safe='')}")
    asyncio.run(small_reads())
    for round_ in range(3):
        for conn in conns:
            assert conn.response()[2] == data
            if round_ < 2:
                conn.request(f"/api/v1/read?path={quote('/big.bin', safe='')}")
    assert _lanes(worker)["requests"] == 9  # the first of each was planned by the loop
    for conn in conns:
        conn.close()
