"""The client transport and ``CacheClient`` against a scripted in-test HTTP server.

The server is raw asyncio so that each test can misbehave exactly as it needs: cut a body, send
garbage, stall, close a kept-alive connection. Real-worker behaviour is covered by the
integration tests.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import pytest

from depot.client import CacheClient, WorkerTimeout, WorkerUnreachable, resolve_endpoint
from depot.core.config import ClientConfig, DepotConfig, MountConfig
from depot.core.errors import (
    InvalidArgument,
    IsADirectory,
    NotFound,
    StaleVersion,
    Throttled,
    Unavailable,
)
from depot.core.transport import (
    BlockingPool,
    ConnectionPool,
    error_from_response,
    parse_endpoint,
    path_query,
)
from depot.core.types import FileStatus


@dataclass
class Req:
    method: str
    target: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]


Respond = Callable[[Req, asyncio.StreamWriter], Awaitable[bool]]


def http(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if not headers or "Content-Length" not in headers:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def error(status: int, code: str, message: str, path: str | None = None) -> bytes:
    err: dict[str, object] = {"code": code, "message": message, "errno": 0}
    if path is not None:
        err["path"] = path
    return http(status, json.dumps({"error": err}).encode(), {"Content-Type": "application/json"})


@dataclass
class FakeServer:
    respond: Respond
    port: int = 0
    connections: int = 0
    active: int = 0
    max_active: int = 0
    requests: list[Req] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ")
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.lower()] = value.strip()
                route, _, query = target.partition("?")
                params = {k: v[0] for k, v in parse_qs(query).items()}
                req = Req(method, target, route, params, headers)
                self.requests.append(req)
                self.active += 1
                self.max_active = max(self.max_active, self.active)
                try:
                    keep = await self.respond(req, writer)
                    await writer.drain()
                finally:
                    self.active -= 1
                if not keep:
                    return
        finally:
            self._writers.discard(writer)
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Respond], Awaitable[FakeServer]]]:
    servers: list[FakeServer] = []

    async def start(respond: Respond) -> FakeServer:
        server = await FakeServer(respond).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


def pool_for(server: FakeServer, **kwargs: float) -> ConnectionPool:
    return ConnectionPool(parse_endpoint(server.endpoint), **kwargs)


def config(**client: object) -> DepotConfig:
    return DepotConfig(client=ClientConfig(**client))


# -- endpoints and encoding ------------------------------------------------------------------------


def test_parse_endpoint_forms() -> None:
    assert parse_endpoint("http://127.0.0.1:7070").url == "http://127.0.0.1:7070"
    assert parse_endpoint("localhost:81").url == "http://localhost:81"
    assert parse_endpoint("https://w.example").port == 443
    assert parse_endpoint("http://[::1]:7070").host_header == "[::1]:7070"
    for bad in ("ftp://x:1", "http://:80", "http://h:1/path", "http://h:99999"):
        with pytest.raises(InvalidArgument):
            parse_endpoint(bad)


def test_path_query_encodes_everything() -> None:
    assert path_query("/r", "/a b/c?d&e#f%") == "/r?path=%2Fa%20b%2Fc%3Fd%26e%23f%25"


def test_endpoint_discovery_order(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config(endpoint="http://from-config:1")
    assert resolve_endpoint("http://explicit:1", cfg, {"DEPOT_ENDPOINT": "http://env:1"}) == (
        "http://explicit:1"
    )
    assert resolve_endpoint(None, cfg, {"DEPOT_ENDPOINT": "http://env:1"}) == "http://env:1"
    assert resolve_endpoint(None, cfg, {}) == "http://from-config:1"
    assert resolve_endpoint(None, config(), {}) == "http://127.0.0.1:7070"
    monkeypatch.setenv("DEPOT_ENDPOINT", "http://env-var:2")
    assert CacheClient(config=cfg).endpoint == "http://env-var:2"


# -- the transport ---------------------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(serve) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        w.write(http(200, req.params["path"].encode()))
        return True

    server = await serve(respond)
    pool = pool_for(server)
    for name in ("/a", "/b", "/ü x"):
        response = await pool.request(path_query("/api/v1/stat", name))
        assert (response.status, bytes(response.body)) == (200, name.encode())
    assert server.connections == 1 and pool.connects == 1
    assert server.requests[0].headers["host"] == f"127.0.0.1:{server.port}"
    pool.close()


async def test_body_lands_in_destination_buffer(serve) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, written in pieces after the head

    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        w.write(http(206, b"", {"Content-Length": str(len(payload))}) + payload[:1000])
        await w.drain()
        for i in range(1000, len(payload), 300_000):
            w.write(payload[i : i + 300_000])
            await w.drain()
            await asyncio.sleep(0)
        return True

    server = await serve(respond)
    pool = pool_for(server)
    dest = bytearray(len(payload) + 10)
    response = await pool.request("/x", dest=memoryview(dest))
    assert response.length == len(payload) and response.body == b""
    assert dest[: len(payload)] == payload and dest[len(payload) :] == bytes(10)
    pool.close()


async def test_large_body_wakes_the_client_for_its_last_bytes(serve) -> None:
    """A large body is received with a low-water mark on the socket; the tail of the body, below
    that mark and sent after a pause, must still wake the client, and the next response (a head,
    then a tiny body) must not wait for the mark either."""
    payload = bytes(range(256)) * 8192  # 2 MiB
    pieces = (0, 1_500_000, 1_800_000, len(payload) - 1, len(payload))

    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        if req.path == "/small":
            w.write(http(200, b"", {"Content-Length": "10"}))
            await w.drain()
            await asyncio.sleep(0.1)
            w.write(b"0123456789")
            return True
        w.write(http(206, b"", {"Content-Length": str(len(payload))}))
        for lo, hi in itertools.pairwise(pieces):
            w.write(payload[lo:hi])
            await w.drain()
            await asyncio.sleep(0.1)
        return True

    server = await serve(respond)
    pool = pool_for(server, timeout=2.0)
    dest = bytearray(len(payload))
    async with asyncio.timeout(5):
        response = await pool.request("/large", dest=memoryview(dest))
    assert response.length == len(payload) and dest == payload
    (conn,) = pool._idle
    if conn._sock is not None:  # where SO_RCVLOWAT exists: back to 1 byte between responses
        assert conn._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    async with asyncio.timeout(5):
        small = await pool.request("/small")
    assert bytes(small.body) == b"0123456789" and pool.connects == 1
    pool.close()


async def test_body_trickling_below_the_low_water_mark_does_not_time_out(serve) -> None:
    """Bytes that keep coming, too few to reach the low-water mark within the timeout, are
    progress: the request must not time out."""
    payload = bytes(range(256)) * 8192  # 2 MiB: the mark is 1 MiB
    trickle = 64 * 1024 * 10  # 640 KiB over 0.6 s, longer than the timeout

    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        w.write(http(206, b"", {"Content-Length": str(len(payload))}))
        for lo in range(0, trickle, 64 * 1024):
            w.write(payload[lo : lo + 64 * 1024])
            await w.drain()
            await asyncio.sleep(0.06)
        w.write(payload[trickle:])
        return True

    server = await serve(respond)
    pool = pool_for(server, timeout=0.4)
    dest = bytearray(len(payload))
    async with asyncio.timeout(5):
        response = await pool.request("/x", dest=memoryview(dest))
    assert response.length == len(payload) and dest == payload
    pool.close()


async def test_stale_keep_alive_connection_is_replaced_once(serve) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        w.write(http(200, b"ok"))
        return False  # close after each response, without saying so

    server = await serve(respond)
    pool = pool_for(server)
    assert bytes((await pool.request("/1")).body) == b"ok"
    await asyncio.sleep(0.05)  # the server's FIN arrives while the connection is idle
    assert bytes((await pool.request("/2")).body) == b"ok"
    assert server.connections == 2
    pool.close()


async def test_server_closing_a_fresh_connection_is_an_error(serve) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        return False  # close without answering

    server = await serve(respond)
    pool = pool_for(server)
    with pytest.raises(WorkerUnreachable, match="closed the connection"):
        await pool.request("/x")
    assert server.connections == 1  # no retry loop on a connection that never answered
    pool.close()


async def test_reset_mid_body_is_unavailable_and_connection_dropped(serve) -> None:
    calls = 0

    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            w.write(http(200, b"", {"Content-Length": "100"}) + b"y" * 10)
            await w.drain()
            w.transport.abort()
            return False
        w.write(http(200, b"fine"))
        return True

    server = await serve(respond)
    pool = pool_for(server)
    with pytest.raises(WorkerUnreachable, match="after 10 of 100 body bytes"):
        await pool.request("/x", dest=memoryview(bytearray(100)))
    assert bytes((await pool.request("/y")).body) == b"fine"
    assert pool.connects == 2
    pool.close()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"HTTX/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\n\r\nxyz", "without Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", "chunked"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "malformed Content-Length"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 0\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabcdef", "past the end"),
        (b"HTTP/1.1 100 Continue\r\n\r\n", "unexpected HTTP 100"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", "head over"),
    ],
)
async def test_malformed_responses_are_unavailable(serve, raw: bytes, message: str) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        w.write(raw)
        await asyncio.sleep(0.5)
        return False

    server = await serve(respond)
    pool = pool_for(server)
    with pytest.raises(WorkerUnreachable, match=message):
        await pool.request("/x")
    assert pool.idle_connections == 0
    pool.close()


async def test_body_larger_than_destination_is_refused(serve) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        w.write(http(206, b"x" * 64))
        return True

    server = await serve(respond)
    pool = pool_for(server)
    dest = bytearray(16)
    with pytest.raises(WorkerUnreachable, match="64 bytes for a request of 16"):
        await pool.request("/x", dest=memoryview(dest))
    assert dest == bytes(16)
    pool.close()


async def test_silent_server_times_out(serve) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(5)
        return False

    server = await serve(respond)
    pool = pool_for(server, timeout=0.2)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(WorkerTimeout, match=r"sent nothing for 0\.2s"):
        await pool.request("/x")
    assert loop.time() - began < 1.5
    pool.close()


async def test_silence_mid_body_times_out_after_one_timeout(serve) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        w.write(http(200, b"", {"Content-Length": "100"}) + b"abc")
        await w.drain()
        await asyncio.sleep(5)  # a hung worker: the connection stays open, nothing comes
        return False

    server = await serve(respond)
    pool = pool_for(server, timeout=0.4)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(WorkerTimeout, match=r"sent nothing for 0\.4s"):
        await pool.request("/x")
    # About one timeout of silence, not up to two (a check per whole timeout).
    assert loop.time() - began < 0.7
    pool.close()


async def test_trickling_body_does_not_time_out(serve) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        w.write(http(200, b"", {"Content-Length": "6"}))
        for ch in b"abcdef":
            await w.drain()
            await asyncio.sleep(0.08)
            w.write(bytes([ch]))
        return True

    server = await serve(respond)
    pool = pool_for(server, timeout=0.15)
    assert bytes((await pool.request("/x")).body) == b"abcdef"  # 0.5 s total, never idle 0.15 s
    pool.close()


async def test_connection_refused_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        pool = ConnectionPool(parse_endpoint(f"127.0.0.1:{port}"))
        with pytest.raises(WorkerUnreachable, match="refused"):
            await pool.request("/x")


async def test_connect_timeout() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        port = sock.getsockname()[1]
        # Fill the accept queue so that further SYNs are dropped and connect() hangs.
        fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(filler)
        await asyncio.sleep(0.05)
        pool = ConnectionPool(parse_endpoint(f"127.0.0.1:{port}"), connect_timeout=0.2)
        try:
            with pytest.raises(WorkerTimeout, match=r"did not accept a connection within 0\.2s"):
                await pool.request("/x")
        finally:
            for filler in fillers:
                filler.close()


async def test_pool_bounds_concurrent_connections(serve) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.02)
        w.write(http(200, b"ok"))
        return True

    server = await serve(respond)
    pool = pool_for(server, max_connections=2)
    results = await asyncio.gather(*(pool.request(f"/{i}") for i in range(8)))
    assert all(r.status == 200 for r in results)
    assert server.max_active == 2 and pool.connects == 2
    pool.close()


async def test_cancelled_request_drops_its_connection(serve) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        if req.path == "/slow":
            w.write(http(200, b"", {"Content-Length": "8"}) + b"1234")
            await w.drain()
            await asyncio.sleep(0.3)
            w.write(b"5678")
            return True
        w.write(http(200, b"fast"))
        return True

    server = await serve(respond)
    pool = pool_for(server)
    dest = bytearray(8)
    task = asyncio.ensure_future(pool.request("/slow", dest=memoryview(dest)))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert bytes((await pool.request("/fast")).body) == b"fast"
    await asyncio.sleep(0.3)
    assert dest[4:] == bytes(4)  # nothing was written after the cancellation
    assert pool.connects == 2
    pool.close()


async def test_connection_close_header_is_honoured(serve) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        w.write(http(200, b"ok", {"Connection": "close", "Content-Length": "2"}))
        return True

    server = await serve(respond)
    pool = pool_for(server)
    await pool.request("/1")
    assert pool.idle_connections == 0
    await pool.request("/2")
    assert pool.connects == 2
    pool.close()


async def test_header_injection_is_refused(serve) -> None:
    server = await serve(lambda req, w: asyncio.sleep(0, True))
    pool = pool_for(server)
    with pytest.raises(InvalidArgument):
        await pool.request("/x", [("If-Match", '"a"\r\nX-Evil: 1')])
    assert server.connections == 0
    pool.close()


# -- CacheClient over a scripted worker --------------------------------------------------------------

PAGE = 64 * 1024
DATA = bytes(i * 7 % 251 for i in range(1_000_000))


class ScriptedWorker:
    """Enough of the worker API to exercise the client: one file, ranges, versions, errors."""

    def __init__(self) -> None:
        self.data = DATA
        self.tag = '"e:v1"'
        self.changed_once: dict[int, str] = {}  # range start -> version served to one request
        self.delay = 0.0

    async def __call__(self, req: Req, w: asyncio.StreamWriter) -> bool:
        path = req.params.get("path")
        if req.path == "/api/v1/info":
            w.write(http(200, json.dumps({"page_size": PAGE, "mounts": []}).encode()))
        elif req.path == "/api/v1/stat":
            if path == "/f":
                status = FileStatus("/f", len(self.data), 1.0, etag="v1")
                w.write(http(200, json.dumps(status.to_dict()).encode()))
            elif path == "/d":
                w.write(http(200, json.dumps(FileStatus("/d", 0, 0, True).to_dict()).encode()))
            else:
                w.write(error(404, "NotFound", "no such file", path))
        elif req.path == "/api/v1/list":
            entries = [
                FileStatus("/d/a", 1, 2.0).to_dict(),
                FileStatus("/d/s", 0, 0, True).to_dict(),
            ]
            w.write(http(200, json.dumps({"path": path, "entries": entries}).encode()))
        elif req.path == "/api/v1/read":
            await asyncio.sleep(self.delay)
            if path == "/d":
                w.write(error(400, "IsADirectory", "is a directory", path))
                return True
            if path == "/busy":
                w.write(error(503, "Throttled", "slow down", path))
                return True
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", req.headers.get("range", ""))
            first_byte = int(match.group(1)) if match and match.group(1) else 0
            tag = self.changed_once.pop(first_byte, self.tag)
            if "if-match" in req.headers and req.headers["if-match"] != tag:
                w.write(error(412, "StaleVersion", "the file changed", path))
                return True
            size = len(self.data)
            if match is None:
                start, end = 0, size
                status = 200
            else:
                first, last = match.groups()
                if first == "":
                    start, end = max(0, size - int(last)), size
                else:
                    start, end = int(first), min(size, int(last) + 1 if last else size)
                status = 206
                if start >= size:
                    w.write(error(416, "InvalidRange", "unsatisfiable", path))
                    return True
            headers = {"ETag": tag, "X-Depot-Size": str(size)}
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
            w.write(http(status, self.data[start:end], headers))
        else:
            w.write(error(404, "NotFound", "no such endpoint", req.path))
        return True


@pytest.fixture
async def worker(serve) -> tuple[ScriptedWorker, FakeServer]:
    script = ScriptedWorker()
    return script, await serve(script)


async def test_stat_list_and_typed_errors(worker) -> None:
    _, server = worker
    async with CacheClient(server.endpoint, config=config()) as client:
        status = await client.stat("/f")
        assert (status.size, status.etag, status.is_dir) == (len(DATA), "v1", False)
        assert (await client.stat("/d")).is_dir
        assert [e.path for e in await client.list("/d")] == ["/d/a", "/d/s"]
        with pytest.raises(NotFound) as info:
            await client.stat("/nope")
        assert isinstance(info.value, FileNotFoundError) and info.value.path == "/nope"
        with pytest.raises(IsADirectory):
            await client.read_range("/d", 0, 10)
        with pytest.raises(Throttled):
            await client.read_range("/busy", 0, 10)
        assert (await client.info())["page_size"] == PAGE


async def test_small_and_open_ended_reads(worker) -> None:
    _, server = worker
    async with CacheClient(server.endpoint, config=config()) as client:
        assert await client.read_range("/f", 10, 4106) == DATA[10:4106]
        assert await client.read_range("/f", 999_990, 2_000_000) == DATA[999_990:]
        assert await client.read_range("/f", 2_000_000, 2_000_010) == b""
        assert await client.read_range("/f", -100) == DATA[-100:]
        assert await client.read_range("/f", 5) == DATA[5:]
        assert await client.read_range("/f", 0) == DATA


async def test_reads_up_to_1mib_are_one_request(worker) -> None:
    _, server = worker
    async with CacheClient(server.endpoint, config=config(parallelism=4)) as client:
        out = bytearray(len(DATA))
        count = await client.read_range_into("/f", 1000, len(DATA), memoryview(out))
        assert count == len(DATA) - 1000 and out[:count] == DATA[1000:]
    # no /info round trip either: small reads never wait for the page size (the cluster view
    # is asked for once per client, to route by)
    assert [(r.path, r.headers.get("range")) for r in server.requests] == [
        ("/api/v1/cluster", None),
        ("/api/v1/read", f"bytes=1000-{len(DATA) - 1}"),
    ]


async def test_large_read_uses_up_to_parallelism_connections(worker) -> None:
    script, server = worker
    script.data = bytes(range(256)) * 40_000  # ~10 MiB: ten 1 MiB chunks
    script.delay = 0.01
    async with CacheClient(server.endpoint, config=config(parallelism=3)) as client:
        assert await client.read_range("/f", 0, len(script.data), size=len(script.data)) == (
            script.data
        )
    reads = [r for r in server.requests if r.path == "/api/v1/read"]
    assert len(reads) == 10
    assert all(int(r.headers["range"][6:].split("-")[0]) % (1 << 20) == 0 for r in reads)
    assert server.max_active == 3


async def test_pinned_version_raises_stale(worker) -> None:
    script, server = worker
    async with CacheClient(server.endpoint, config=config()) as client:
        assert await client.read_range("/f", 0, 10, version='"e:v1"') == DATA[:10]
        script.tag = '"e:v2"'
        with pytest.raises(StaleVersion):
            await client.read_range("/f", 0, 10, version='"e:v1"')
    assert server.requests[-1].headers["if-match"] == '"e:v1"'


async def test_unpinned_large_read_never_mixes_versions(worker) -> None:
    script, server = worker
    script.data = bytes(range(256)) * 12_288  # 3 MiB: three chunks
    script.changed_once = {1 << 20: '"e:v2"'}  # the middle chunk sees another version once
    async with CacheClient(server.endpoint, config=config(parallelism=3)) as client:
        out = bytearray(len(script.data))
        await client.read_range_into("/f", 0, len(out), memoryview(out))
    reads = [r for r in server.requests if r.path == "/api/v1/read"]
    assert len(reads) == 6
    assert {r.headers.get("if-match") for r in reads[3:]} == {'"e:v1"'}


async def test_open_ended_large_read_pins_to_first_response(worker) -> None:
    script, server = worker
    script.data = bytes(range(256)) * 12_288
    async with CacheClient(server.endpoint, config=config()) as client:
        assert await client.read_range("/f", 0) == script.data
    reads = [r for r in server.requests if r.path == "/api/v1/read"]
    assert "if-match" not in reads[0].headers
    assert {r.headers["if-match"] for r in reads[1:]} == {'"e:v1"'}


async def test_wrong_content_range_is_refused(serve) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        w.write(http(206, b"abcd", {"Content-Range": "bytes 0-3/100"}))
        return True

    server = await serve(respond)
    async with CacheClient(server.endpoint, config=config(), ufs_fallback=False) as client:
        with pytest.raises(WorkerUnreachable, match="range other than"):
            await client.read_range("/f", 50, 54)


async def test_unreachable_worker_without_mounts_says_so() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with CacheClient(endpoint, config=config()) as client:
            with pytest.raises(Unavailable, match="no mounts are configured"):
                await client.stat("/x")
        async with CacheClient(endpoint, config=config(), ufs_fallback=False) as client:
            with pytest.raises(WorkerUnreachable) as info:
                await client.stat("/x")
            assert "no mounts" not in str(info.value)


async def test_unreachable_worker_falls_back_to_ufs(tmp_path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "f.bin").write_bytes(DATA)
    cfg = DepotConfig(mounts=[MountConfig(path="/", ufs=tmp_path.as_uri())])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with CacheClient(endpoint, config=cfg) as client:
            status = await client.stat("/dir/f.bin")
            assert status.size == len(DATA)
            assert (await client.stat("/dir")).is_dir
            assert [e.path for e in await client.list("/dir")] == ["/dir/f.bin"]
            assert await client.read_range("/dir/f.bin", 100, 200) == DATA[100:200]
            assert await client.read_range("/dir/f.bin", 0) == DATA
            assert await client.read_range("/dir/f.bin", -10) == DATA[-10:]
            with pytest.raises(NotFound):
                await client.stat("/dir/missing")


async def test_a_cut_response_falls_back_once_but_keeps_the_worker(serve, tmp_path) -> None:
    (tmp_path / "f").write_bytes(DATA)
    cfg = DepotConfig(mounts=[MountConfig(path="/", ufs=tmp_path.as_uri())])
    cuts = 1

    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        nonlocal cuts
        if req.path == "/api/v1/cluster":  # a worker without a cluster view
            w.write(http(404, b'{"error":{"code":"not_found","message":"no"}}'))
            return True
        if cuts:
            cuts -= 1
            w.write(http(206, b"", {"Content-Length": "100", "Content-Range": "bytes 0-99/9"}))
            w.write(b"z" * 10)
            await w.drain()
            w.transport.abort()
            return False
        w.write(http(206, b"w" * 100, {"Content-Range": "bytes 0-99/1000000"}))
        return True

    server = await serve(respond)
    async with CacheClient(server.endpoint, config=cfg) as client:
        assert await client.read_range("/f", 0, 100) == DATA[:100]  # from the under store
        assert await client.read_range("/f", 0, 100) == b"w" * 100  # the worker again
    assert [r.path for r in server.requests] == ["/api/v1/cluster", *["/api/v1/read"] * 2]


# -- blocking connections (reads from the caller's thread) -----------------------------------------


def blocking_for(server: FakeServer, **kwargs: float) -> BlockingPool:
    return BlockingPool(parse_endpoint(server.endpoint), **kwargs)


async def test_blocking_pool_fills_the_buffer_and_keeps_the_connection(serve) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        body = DATA[: int(req.params["n"])]
        w.write(http(206, body, {"Content-Range": f"bytes 0-{len(body) - 1}/{len(DATA)}"}))
        return True

    server = await serve(respond)
    pool = blocking_for(server)
    out = bytearray(300_000)
    for n in (10, 300_000, 4096):  # a body with the head, one in many segments, a small one
        response = await asyncio.to_thread(
            pool.get_into, f"/r?n={n}", [("Range", f"bytes=0-{n - 1}")], memoryview(out)
        )
        assert (response.status, response.length) == (206, n)
        assert bytes(out[:n]) == DATA[:n]
    assert (server.connections, pool.connects, pool.idle_connections) == (1, 1, 1)
    assert [r.headers["range"] for r in server.requests] == [
        "bytes=0-9", "bytes=0-299999", "bytes=0-4095"
    ]
    pool.close()
    assert pool.idle_connections == 0
    with pytest.raises(Unavailable, match="closed"):
        pool.get_into("/r?n=1", [], memoryview(out))


async def test_blocking_pool_replaces_a_stale_connection_once(serve) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        w.write(http(200, b"ok"))
        return False  # close after each response, without saying so

    server = await serve(respond)
    pool = blocking_for(server)
    out = memoryview(bytearray(10))
    assert (await asyncio.to_thread(pool.get_into, "/1", [], out)).length == 2
    await asyncio.sleep(0.05)  # the server's FIN arrives while the connection is idle
    assert (await asyncio.to_thread(pool.get_into, "/2", [], out)).length == 2
    assert bytes(out[:2]) == b"ok" and server.connections == 2


async def test_blocking_pool_does_not_retry_a_fresh_connection(serve) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        return False  # close without answering

    server = await serve(respond)
    pool = blocking_for(server)
    with pytest.raises(WorkerUnreachable, match="closed the connection"):
        await asyncio.to_thread(pool.get_into, "/x", [], memoryview(bytearray(10)))
    assert server.connections == 1


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"HTTX/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 2\r\n\r\nok", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", "chunked"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "malformed Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n" + b"x" * 11, "11 bytes for a request of 10"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", "past the end of a response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nabc", "after 3 of 8 body bytes"),
        (b"HTTP/1.1 500 X\r\nContent-Length: 100000\r\n\r\n", "error body"),
        (b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * 70_000, "response head over"),
    ],
)
async def test_blocking_pool_refuses_bad_responses(serve, raw: bytes, message: str) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        w.write(raw)
        return False  # and close: a cut body or head ends there

    server = await serve(respond)
    pool = blocking_for(server)
    out = bytearray(10)
    with pytest.raises(WorkerUnreachable, match=message):
        await asyncio.to_thread(pool.get_into, "/x", [], memoryview(out))
    assert pool.idle_connections == 0  # a connection in an unknown state is never reused


async def test_blocking_pool_reads_error_bodies_and_keeps_the_connection(serve) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        w.write(error(404, "NotFound", "no such file", "/f"))
        return True

    server = await serve(respond)
    pool = blocking_for(server)
    out = bytearray(10)
    response = await asyncio.to_thread(pool.get_into, "/x", [], memoryview(out))
    assert response.status == 404 and bytes(out) == bytes(10)  # not into the caller's buffer
    assert isinstance(error_from_response(response, "/f"), NotFound)
    assert pool.idle_connections == 1


@pytest.mark.parametrize(
    "sent",
    [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000],
    ids=["before the head", "mid-body"],
)
async def test_blocking_pool_times_out_on_silence(serve, sent: bytes) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        w.write(sent)
        await w.drain()
        await asyncio.sleep(5)
        return False

    server = await serve(respond)
    pool = blocking_for(server, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(WorkerTimeout, match=r"sent nothing for 0\.2s"):
        await asyncio.to_thread(pool.get_into, "/x", [], memoryview(bytearray(100_000)))
    assert time.monotonic() - started < 2
    assert pool.idle_connections == 0


def test_blocking_pool_connection_refused_and_plain_http_only() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        pool = BlockingPool(parse_endpoint(f"127.0.0.1:{sock.getsockname()[1]}"))
        with pytest.raises(WorkerUnreachable, match="refused") as info:
            pool.get_into("/x", [], memoryview(bytearray(1)))
        assert info.value.connect_failed
    with pytest.raises(InvalidArgument, match="plain HTTP only"):
        BlockingPool(parse_endpoint("https://127.0.0.1:1"))


async def test_blocking_pool_in_a_forked_child_opens_its_own_connection(serve, monkeypatch) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        w.write(http(200, b"ok"))
        return True

    server = await serve(respond)
    pool = blocking_for(server)
    out = memoryview(bytearray(2))
    await asyncio.to_thread(pool.get_into, "/1", [], out)
    parent = os.getpid()
    monkeypatch.setattr("depot.core.transport.os.getpid", lambda: parent + 1)  # "after fork"
    await asyncio.to_thread(pool.get_into, "/2", [], out)
    assert (pool.connects, server.connections) == (2, 2)


async def test_blocking_pool_get_holds_bodies_in_memory_within_a_bound(serve) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        if req.path == "/big":
            w.write(http(200, b"x" * 2000))
        elif req.path == "/missing":
            w.write(error(404, "NotFound", "no such file", "/f"))
        else:
            w.write(http(200, b'{"a": 1}' + b" " * 70_000))  # a body in many segments
        return True

    server = await serve(respond)
    pool = blocking_for(server)
    response = await asyncio.to_thread(pool.get, "/doc", [], 100_000)
    assert (response.status, response.length, response.json()) == (200, 70_008, {"a": 1})
    missing = await asyncio.to_thread(pool.get, "/missing")
    assert isinstance(error_from_response(missing, "/f"), NotFound)
    assert pool.idle_connections == 1  # both answers read whole: the connection is kept
    with pytest.raises(WorkerUnreachable, match="2000-byte body"):
        await asyncio.to_thread(pool.get, "/big", [], 1000)
    assert pool.idle_connections == 0  # its body was not read: never reused


# -- CacheClient.read_now --------------------------------------------------------------------------


async def test_read_now_serves_small_reads_in_the_calling_thread(worker) -> None:
    _, server = worker
    async with CacheClient(server.endpoint, config=config()) as client:
        assert await client.read_range("/f", 0, 10) == DATA[:10]  # the loop learns the routes
        out = bytearray(5000)
        assert await asyncio.to_thread(client.read_now, "/f", 100, 4196, memoryview(out), None) == 4096
        assert bytes(out[:4096]) == DATA[100:4196]
        tail = await asyncio.to_thread(client.read_now, "/f", 999_000, 1_004_000, memoryview(out), '"e:v1"')
        assert tail == 1000 and bytes(out[:1000]) == DATA[999_000:]
        assert await asyncio.to_thread(client.read_now, "/f", 2_000_000, 2_000_010, memoryview(out), None) == 0
        assert client.read_now_stats == {"served": 3, "handed_back": 0}
        assert server.requests[-2].headers["if-match"] == '"e:v1"'
        # Errors the worker reports are raised as on the loop path.
        with pytest.raises(StaleVersion):
            await asyncio.to_thread(client.read_now, "/f", 0, 10, memoryview(out), '"e:v0"')
        with pytest.raises(IsADirectory):
            await asyncio.to_thread(client.read_now, "/d", 0, 10, memoryview(out), None)
        with pytest.raises(Throttled):
            await asyncio.to_thread(client.read_now, "/busy", 0, 10, memoryview(out), None)
        # Never on an event loop's own thread.
        assert client.read_now("/f", 0, 10, memoryview(out), None) is None


async def test_read_now_hands_back_what_the_loop_must_do(serve) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        if req.path == "/api/v1/cluster":
            w.write(http(404, b'{"error":{"code":"not_found","message":"no"}}'))
            return True
        w.write(http(206, b"x" * 10, {"Content-Range": "bytes 5-14/100"}))  # not what was asked
        return True

    server = await serve(respond)
    out = memoryview(bytearray(10))
    async with CacheClient(server.endpoint, config=config()) as client:
        # No routes known yet: the loop must fetch them first.
        assert await asyncio.to_thread(client.read_now, "/f", 0, 10, out, None) is None
        await client.router.current_view()
        assert await asyncio.to_thread(client.read_now, "/f", 0, 10, out, None) is None
        assert client.read_now_stats == {"served": 0, "handed_back": 1}
    async with CacheClient(server.endpoint, config=config(caller_thread_reads=False)) as client:
        await client.router.current_view()
        assert await asyncio.to_thread(client.read_now, "/f", 0, 10, out, None) is None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # a dead worker: handed back, the loop path fails over
        async with CacheClient(f"http://127.0.0.1:{sock.getsockname()[1]}", config=config()) as client:
            client.router._no_cluster = True
            assert await asyncio.to_thread(client.read_now, "/f", 0, 10, out, None) is None
            assert client.read_now_stats == {"served": 0, "handed_back": 1}


# -- CacheClient.stat_now and listings -----------------------------------------------------------


async def test_stat_now_asks_in_the_calling_thread(worker) -> None:
    _, server = worker
    async with CacheClient(server.endpoint, config=config()) as client:
        # No routes known yet: the loop must fetch them first.
        assert await asyncio.to_thread(client.stat_now, "/f") is None
        await client.router.current_view()
        sent = len(server.requests)
        status = await asyncio.to_thread(client.stat_now, "/f")
        assert status == await client.stat("/f")
        assert len(server.requests) == sent + 2  # this one, then the loop's own
        assert (await asyncio.to_thread(client.stat_now, "/d")).is_dir
        with pytest.raises(NotFound):  # errors the worker reports are raised as on the loop
            await asyncio.to_thread(client.stat_now, "/nope")
        assert client.stat_now_stats == {"served": 2, "handed_back": 0}
        assert client.stat_now("/f") is None  # never on an event loop's own thread
    async with CacheClient(server.endpoint, config=config(caller_thread_reads=False)) as client:
        await client.router.current_view()
        assert await asyncio.to_thread(client.stat_now, "/f") is None


@pytest.mark.parametrize(
    "body",
    [b"not json", b'{"path": "/f"}', b'{"path": "/f", "size": "big", "mtime": 1.0}', b"[1, 2]"],
    ids=["not json", "no size", "a string size", "not an object"],
)
async def test_stat_now_hands_malformed_answers_to_the_loop(serve, body: bytes) -> None:
    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        if req.path == "/api/v1/cluster":
            w.write(http(404, b'{"error":{"code":"not_found","message":"no"}}'))
        else:
            w.write(http(200, body, {"Content-Type": "application/json"}))
        return True

    server = await serve(respond)
    async with CacheClient(server.endpoint, config=config()) as client:
        await client.router.current_view()
        assert await asyncio.to_thread(client.stat_now, "/f") is None
        assert client.stat_now_stats == {"served": 0, "handed_back": 1}
        with pytest.raises(WorkerUnreachable, match="malformed"):
            await client.stat("/f")  # the loop path reports it


@pytest.mark.parametrize(
    "entry",
    [
        {"path": "/d/a", "size": True, "mtime": 1.0, "type": "file"},
        {"path": "/d/a", "size": 1, "mtime": "1", "type": "file"},
        {"path": 5, "size": 1, "mtime": 1.0, "type": "file"},
        {"path": "/d/a", "size": 1, "mtime": 1.0, "type": "link"},
        {"path": "/d/a", "size": 1, "mtime": 1.0},
        {"path": "/d/a", "size": 1, "mtime": 1.0, "type": "file", "etag": 7},
        {"path": "/d/a", "size": 1, "mtime": 1.0, "type": "file", "version": []},
        ["/d/a", 1],
        None,
    ],
)
async def test_malformed_listing_entries_are_refused(serve, entry: object) -> None:
    good = {"path": "/d/b", "size": 2, "mtime": 3, "type": "file", "etag": None}

    async def respond(req: Req, w: asyncio.StreamWriter) -> bool:
        w.write(http(200, json.dumps({"path": "/d", "entries": [good, entry]}).encode()))
        return True

    server = await serve(respond)
    async with CacheClient(server.endpoint, config=config()) as client:
        client.router._no_cluster = True
        with pytest.raises(WorkerUnreachable, match="malformed listing"):
            await client.list_entries("/d")


async def test_listing_entries_and_statuses_agree(worker) -> None:
    _, server = worker
    async with CacheClient(server.endpoint, config=config()) as client:
        entries = await client.list_entries("/d")
        assert entries == [s.to_dict() for s in await client.list("/d")]
        assert [e["type"] for e in entries] == ["file", "directory"]
