"""The worker's HTTP/1.1 server: keep-alive, bad input, limits, streaming and aborts."""

from __future__ import annotations

import asyncio
import json

import pytest

from depot.core.errors import NotFound
from depot.worker.http import HttpServer, Request, ResponseWriter


async def handler(request: Request, writer: ResponseWriter) -> None:
    if request.path == "/echo":
        body = json.dumps({"path": request.path, "query": request.query, "body": request.body.decode()}).encode()
        writer.send(200, body, (("Content-Type", "application/json"),))
    elif request.path == "/missing":
        raise NotFound("no such thing", "/missing")
    elif request.path == "/boom":
        raise RuntimeError("bug")
    elif request.path == "/big":
        chunk = b"x" * (1 << 20)
        writer.start(200, (), 8 * len(chunk))
        for _ in range(8):
            writer.write(chunk)
            await writer.drain()
    elif request.path == "/cut":
        writer.start(200, (), 100)
        writer.write(b"y" * 10)
        await writer.drain()
        raise RuntimeError("failed mid-stream")
    elif request.path == "/slow":
        await asyncio.sleep(0.2)
        writer.send(200, b"late")
    else:
        writer.send(200, b"ok")


@pytest.fixture
async def server() -> tuple[HttpServer, int]:
    srv = HttpServer(handler, max_body_bytes=1024, head_timeout=0.5, idle_timeout=2)
    port = await srv.start("127.0.0.1", 0)
    yield srv, port
    await srv.stop()


async def roundtrip(port: int, raw: bytes, read_all: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(-1) if read_all else reader.read(65536), 5)
    writer.close()
    return data


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def test_keep_alive_and_pipelining(server: tuple[HttpServer, int]) -> None:
    _, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /echo?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await read_response(reader)
    assert (status, body) == (200, b"ok")
    status, _, body = await read_response(reader)
    assert status == 200 and json.loads(body)["query"] == "q=1"
    writer.write(b"GET /a HTTP/1.1\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    writer.close()


async def test_typed_error_is_json(server: tuple[HttpServer, int]) -> None:
    data = await roundtrip(server[1], b"GET /missing HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 404 ")
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "NotFound"


async def test_bug_is_500_and_connection_survives(server: tuple[HttpServer, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server[1])
    writer.write(b"GET /boom HTTP/1.1\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 500 and b"bug" not in body
    writer.write(b"GET /a HTTP/1.1\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    writer.close()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /a HTTP/2.0\r\n\r\n", 505),
        (b"GET /a FTP/1.0\r\n\r\n", 400),
        (b"GET a HTTP/1.1\r\n\r\n", 400),
        (b"G(T /a HTTP/1.1\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nBad Header\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nContent-Length: 99999\r\n\r\n", 413),
        (b"GET /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
        (b"GET /%ff%fe HTTP/1.1\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nX: \x01\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(150)) + b"\r\n", 431),
        (b"GET /a HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431),
    ],
)
async def test_malformed_requests_get_4xx(server: tuple[HttpServer, int], raw: bytes, status: int) -> None:
    data = await roundtrip(server[1], raw)
    assert data.startswith(f"HTTP/1.1 {status} ".encode()), data[:80]
    assert b"Connection: close" in data


async def test_body_with_content_length(server: tuple[HttpServer, int]) -> None:
    data = await roundtrip(server[1], b"POST /echo HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["body"] == "hello"


async def test_large_streamed_response(server: tuple[HttpServer, int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server[1])
    writer.write(b"GET /big HTTP/1.1\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == 200 and len(body) == 8 << 20 and set(body) == {ord("x")}
    writer.close()


async def test_failure_mid_stream_cuts_connection(server: tuple[HttpServer, int]) -> None:
    data = await roundtrip(server[1], b"GET /cut HTTP/1.1\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Length: 100" in head
    assert len(body) < 100  # short body: the client can tell, never wrong bytes


async def test_head_request_has_no_body(server: tuple[HttpServer, int]) -> None:
    data = await roundtrip(server[1], b"HEAD /a HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert data.endswith(b"\r\n\r\n") and b"Content-Length: 2" in data


async def test_slow_head_times_out(server: tuple[HttpServer, int]) -> None:
    data = await roundtrip(server[1], b"GET /a HTTP/1.1\r\nHost: x\r\n")
    assert data.startswith(b"HTTP/1.1 408 ")


async def test_http10_closes(server: tuple[HttpServer, int]) -> None:
    data = await roundtrip(server[1], b"GET /a HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"ok")


async def test_client_disconnect_mid_request_is_harmless(server: tuple[HttpServer, int]) -> None:
    _srv, port = server
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow HTTP/1.1\r\n\r\n")
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.3)
    data = await roundtrip(port, b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ")
