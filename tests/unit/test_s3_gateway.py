"""The S3 gateway app on the real HTTP server, over an in-memory client: routing, errors, GET path.

Real S3 clients (boto3, aws CLI, s3fs, pyarrow, obstore) run against a real worker in
tests/integration/test_s3_clients.py; this file covers what is easier to provoke with a fake:
every error path, the streaming path's block pipeline, overload, and a fuzz of the router.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import xml.etree.ElementTree as ET
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depot.core.config import S3Config
from depot.core.errors import NotADirectory, NotFound, StaleVersion, Unavailable
from depot.core.types import Attributes, FileStatus
from depot.s3.errors import protocol_error
from depot.s3.gateway import S3Gateway, decode_token, encode_token
from depot.s3.semantics import http_date
from depot.s3.sigv4 import Credentials, sign_headers
from depot.worker.http import HttpServer

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
MTIME = 1_700_000_000.0
BIG = os.urandom(1_000_003)


class FakeClient:
    """The namespace of ``files`` (path -> bytes), answering like ``CacheClient``."""

    endpoint = "http://fake"

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = dict(files)
        self.read_delay = 0.0
        self.fail_reads_after: int | None = None
        self.stale_once = False
        self.reads = 0
        self.stat_delay = 0.0
        self.events: list[tuple[str, str]] = []
        self.attributes: dict[str, Attributes] = {}  # what the store keeps, by path

    def _dirs(self) -> set[str]:
        dirs = {"/"}
        for path in self.files:
            parts = path.split("/")[1:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/" + "/".join(parts[:i]))
        return dirs

    def _status(self, path: str) -> FileStatus:
        data = self.files[path]
        return FileStatus(
            path, len(data), MTIME, etag=f'"{hashlib.md5(data).hexdigest()}"',
            attributes=self.attributes.get(path),
        )

    async def stat(self, path: str, *, attributes: bool = False) -> FileStatus:
        self.events.append(("stat", path))
        if self.stat_delay:
            await asyncio.sleep(self.stat_delay)
        self.events.append(("stat-done", path))
        if path in self.files:
            return self._status(path)
        if path in self._dirs():
            return FileStatus(path, 0, 0.0, is_dir=True)
        raise NotFound("no such file", path)

    async def list(self, path: str) -> list[FileStatus]:
        if path in self.files:
            raise NotADirectory("not a directory", path)
        if path not in self._dirs():
            raise NotFound("no such directory", path)
        base = path.rstrip("/") + "/"
        names: dict[str, FileStatus] = {}
        for file in self.files:
            if file.startswith(base):
                name, sep, _ = file[len(base):].partition("/")
                names[name] = (
                    FileStatus(base + name, 0, 0.0, is_dir=True) if sep else self._status(file)
                )
        return [names[n] for n in sorted(names)]

    async def read_range_into(
        self, path: str, start: int, end: int, out: memoryview, *, version: str | None = None
    ) -> int:
        self.reads += 1
        self.events.append(("read", path))
        if version is not None and path in self.files and version != self._status(path).entity_tag:
            raise StaleVersion("pinned version is gone", path)
        if self.read_delay:
            await asyncio.sleep(self.read_delay)
        if self.fail_reads_after is not None and self.reads > self.fail_reads_after:
            raise Unavailable("worker and under store are gone", path)
        if self.stale_once:
            self.stale_once = False
            raise StaleVersion("changed", path)
        if path not in self.files:
            raise NotFound("no such file", path)
        data = self.files[path][start:end]
        out[: len(data)] = data
        return len(data)


FILES = {
    "/data/hello.txt": b"hello world\n",
    "/data/empty": b"",
    "/data/dir/a.json": b'{"a": 1}',
    "/data/dir/sub/b.bin": b"b" * 10,
    "/data/a b+c&d.txt": b"odd name",
    "/data/big.bin": BIG,
    "/other/x": b"x",
    "/rootfile": b"not in a bucket",
}


class Raw:
    """A keep-alive raw HTTP/1.1 connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ")[1])
        hdrs: dict[str, str] = {}
        for line in header_lines:
            if line:
                k, _, v = line.partition(":")
                hdrs[k.strip().lower()] = v.strip()
        data = b""
        if method != "HEAD" and status != 304 and "content-length" in hdrs:
            data = await asyncio.wait_for(self.reader.readexactly(int(hdrs["content-length"])), 10)
        if hdrs.get("connection") == "close":
            await self.close()
        return status, hdrs, data

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def error_code(body: bytes) -> str:
    root = ET.fromstring(body)
    assert root.tag == "Error"
    return root.findtext("Code") or ""


async def start(
    client: FakeClient | None = None, *, anonymous: bool = True, **kw: Any
) -> tuple[HttpServer, int, S3Gateway, FakeClient]:
    client = client or FakeClient(FILES)
    extra = {k: kw.pop(k) for k in list(kw) if k in S3Config.model_fields}
    settings_ = S3Config(anonymous=anonymous, **extra)
    gateway = S3Gateway(client, settings_, credentials={"AK": "SK"}, **kw)  # type: ignore[arg-type]
    server = HttpServer(gateway, protocol_error=protocol_error, head_timeout=2, idle_timeout=5)
    port = await server.start("127.0.0.1", 0)
    return server, port, gateway, client


@pytest.fixture
async def gw() -> Any:
    server, port, gateway, client = await start(block_size=64 * 1024, window=3)
    raw = Raw(port)
    yield raw, gateway, client
    await raw.close()
    await server.stop()


# --- buckets -----------------------------------------------------------------------------------------


async def test_list_buckets_and_bucket_ops(gw: Any) -> None:
    raw, _, _ = gw
    status, headers, body = await raw.request("GET", "/")
    assert status == 200 and headers["content-type"] == "application/xml"
    assert "x-amz-request-id" in headers and "date" in headers
    root = ET.fromstring(body)
    assert [b.findtext(f"{NS}Name") for b in root.iter(f"{NS}Bucket")] == ["data", "other"]
    assert (await raw.request("HEAD", "/data"))[0] == 200
    status, headers, body = await raw.request("HEAD", "/nope")
    assert status == 404 and body == b""
    status, _, body = await raw.request("GET", "/data?location")
    assert status == 200 and ET.fromstring(body).tag == f"{NS}LocationConstraint"
    status, _, body = await raw.request("GET", "/nope?location")
    assert status == 404 and error_code(body) == "NoSuchBucket"
    status, _, body = await raw.request("GET", "/bad%20name/x")
    assert status == 400 and error_code(body) == "InvalidBucketName"
    status, _, body = await raw.request("GET", "/data?versioning")
    assert status == 200 and b"VersioningConfiguration" in body


async def test_mapped_buckets() -> None:
    server, port, _, _ = await start(bucket_mode="mapped", buckets={"all": "/", "d": "/data/dir"})
    raw = Raw(port)
    try:
        status, _, body = await raw.request("GET", "/")
        names = [b.findtext(f"{NS}Name") for b in ET.fromstring(body).iter(f"{NS}Bucket")]
        assert names == ["all", "d"]
        assert (await raw.request("GET", "/all/rootfile"))[2] == b"not in a bucket"
        assert (await raw.request("GET", "/d/a.json"))[2] == b'{"a": 1}'
        status, _, body = await raw.request("GET", "/data/hello.txt")
        assert status == 404 and error_code(body) == "NoSuchBucket"
    finally:
        await raw.close()
        await server.stop()


# --- GetObject / HeadObject ------------------------------------------------------------------------


async def test_get_object_headers_and_ranges(gw: Any) -> None:
    raw, _, _ = gw
    status, headers, body = await raw.request("GET", "/data/hello.txt")
    assert status == 200 and body == b"hello world\n"
    assert headers["etag"] == f'"{hashlib.md5(body).hexdigest()}"'
    assert headers["last-modified"] == http_date(MTIME)
    assert headers["content-type"] == "text/plain" and headers["accept-ranges"] == "bytes"
    status, headers, body = await raw.request("GET", "/data/hello.txt", {"Range": "bytes=0-4"})
    assert (status, body, headers["content-range"]) == (206, b"hello", "bytes 0-4/12")
    assert (await raw.request("GET", "/data/hello.txt", {"Range": "bytes=-3"}))[2] == b"ld\n"
    assert (await raw.request("GET", "/data/hello.txt", {"Range": "bytes=6-"}))[2] == b"world\n"
    status, _, body = await raw.request("GET", "/data/hello.txt", {"Range": "bytes=0-1,3-4"})
    assert status == 200 and body == b"hello world\n"
    status, headers, body = await raw.request("GET", "/data/hello.txt", {"Range": "bytes=12-"})
    assert status == 416 and error_code(body) == "InvalidRange"
    assert headers["content-range"] == "bytes */12"
    status, headers, body = await raw.request("GET", "/data/empty")
    assert status == 200 and body == b"" and headers["content-length"] == "0"
    status, headers, body = await raw.request("HEAD", "/data/big.bin")
    assert status == 200 and body == b"" and headers["content-length"] == str(len(BIG))
    status, headers, _ = await raw.request("HEAD", "/data/big.bin", {"Range": "bytes=10-19"})
    assert status == 206 and headers["content-length"] == "10"
    status, headers, body = await raw.request("GET", "/data/hello.txt?partNumber=1")
    assert status == 206 and body == b"hello world\n" and headers["x-amz-mp-parts-count"] == "1"
    status, _, body = await raw.request("GET", "/data/hello.txt?partNumber=2")
    assert status == 416 and error_code(body) == "InvalidPartNumber"


async def test_large_object_streams_in_blocks(gw: Any) -> None:
    raw, gateway, client = gw
    status, _, body = await raw.request("GET", "/data/big.bin")
    assert status == 200 and body == BIG
    assert client.reads == -(-len(BIG) // gateway.block_size)
    for start, end in [(1, 200_000), (65_535, 65_537), (999_000, 1_000_002), (0, 65_536)]:
        status, _, body = await raw.request("GET", "/data/big.bin", {"Range": f"bytes={start}-{end}"})
        assert status == 206 and body == BIG[start : end + 1]
    assert len(gateway.pool) > 0  # blocks came back to the pool


async def test_conditional_requests(gw: Any) -> None:
    raw, _, _ = gw
    etag = f'"{hashlib.md5(b"hello world").hexdigest()}"'
    _, headers, _ = await raw.request("GET", "/data/hello.txt")
    etag = headers["etag"]
    status, headers, body = await raw.request("GET", "/data/hello.txt", {"If-None-Match": etag})
    assert status == 304 and body == b"" and "content-length" not in headers
    assert headers["etag"] == etag
    # the connection is still in step after a 304 without a body
    assert (await raw.request("GET", "/data/hello.txt"))[2] == b"hello world\n"
    status, _, body = await raw.request("GET", "/data/hello.txt", {"If-Match": '"other"'})
    assert status == 412 and error_code(body) == "PreconditionFailed"
    status, _, _ = await raw.request("HEAD", "/data/hello.txt", {"If-Match": '"other"'})
    assert status == 412
    since = http_date(MTIME)
    assert (await raw.request("GET", "/data/hello.txt", {"If-Modified-Since": since}))[0] == 304
    assert (await raw.request("GET", "/data/hello.txt", {"If-Unmodified-Since": http_date(MTIME - 60)}))[0] == 412
    assert (await raw.request("GET", "/data/hello.txt", {"If-Match": etag, "Range": "bytes=0-0"}))[0] == 206


async def test_missing_objects_and_key_tricks(gw: Any) -> None:
    raw, _, _ = gw
    cases = {
        "/data/nope": (404, "NoSuchKey"),
        "/nobucket/x": (404, "NoSuchBucket"),
        "/data/dir": (404, "NoSuchKey"),
        "/data/hello.txt/x": (404, "NoSuchKey"),
        "/data/dir/": (404, "NoSuchKey"),
        "/data//hello.txt": (404, "NoSuchKey"),
        "/data/../other/x": (400, "InvalidArgument"),
        "/data/dir/%2e%2e/%2e%2e/other/x": (400, "InvalidArgument"),
        "/data/dir%2F..%2F..%2Frootfile": (400, "InvalidArgument"),
        "/data/%252e%252e/x": (400, "InvalidArgument"),
        "/data/a%00b": (400, "InvalidArgument"),
        "/data/" + "k" * 1100: (400, "KeyTooLongError"),
    }
    for target, (code, name) in cases.items():
        status, _, body = await raw.request("GET", target)
        assert (status, error_code(body)) == (code, name), target
    status, _, body = await raw.request("GET", "/data/" + quote("a b+c&d.txt"))
    assert status == 200 and body == b"odd name"


async def test_writes_and_unknown_operations(gw: Any) -> None:
    raw, _, _ = gw
    for method, target, body in [
        ("PUT", "/data/new.txt", b"data"),
        ("PUT", "/newbucket", b""),
        ("DELETE", "/data/hello.txt", b""),
        ("DELETE", "/data", b""),
        ("POST", "/data?delete", b"<Delete><Object><Key>a</Key></Object></Delete>"),
        ("POST", "/data/k?uploads", b""),
        ("PUT", "/data/k?partNumber=1&uploadId=x", b"xx"),
        ("GET", "/data?acl", b""),
        ("GET", "/data/hello.txt?tagging", b""),
        ("POST", "/", b""),
    ]:
        status, headers, data = await raw.request(method, target, body=body)
        assert (status, error_code(data)) == (501, "NotImplemented"), (method, target)
        assert headers["content-type"] == "application/xml"
    status, headers, data = await raw.request("PATCH", "/data/hello.txt")
    assert (status, error_code(data)) == (405, "MethodNotAllowed")
    assert "GET" in headers["allow"]
    # the file is untouched
    assert (await raw.request("GET", "/data/hello.txt"))[2] == b"hello world\n"


async def test_copy_object_named_in_not_implemented(gw: Any) -> None:
    raw, _, _ = gw
    _, _, body = await raw.request("PUT", "/data/c", {"x-amz-copy-source": "/data/hello.txt"})
    assert b"CopyObject" in body


async def test_register_plugs_in_a_write_handler(gw: Any) -> None:
    raw, gateway, _ = gw

    async def put(ctx: Any) -> None:
        ctx.writer.start(200, [("ETag", '"x"')], 0)

    gateway.register("PutObject", put)
    assert (await raw.request("PUT", "/data/new", body=b"x"))[0] == 200
    with pytest.raises(ValueError):
        gateway.register("NoSuchOperation", put)


async def test_protocol_errors_are_s3_xml(gw: Any) -> None:
    raw, _, _ = gw
    reader, writer = await asyncio.open_connection("127.0.0.1", raw.port)
    writer.write(b"GET /data/x HTTP/1.1\r\nBad Header\r\n\r\n")
    data = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 400") and b"<Code>InvalidRequest</Code>" in data
    reader, writer = await asyncio.open_connection("127.0.0.1", raw.port)
    writer.write(b"PUT /data/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    data = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 501") and b"<Code>NotImplemented</Code>" in data


# --- listings ------------------------------------------------------------------------------------------


def contents(body: bytes) -> tuple[list[str], list[str], ET.Element]:
    root = ET.fromstring(body)
    keys = [c.findtext(f"{NS}Key") or "" for c in root.iter(f"{NS}Contents")]
    prefixes = [p.findtext(f"{NS}Prefix") or "" for p in root.iter(f"{NS}CommonPrefixes")]
    return keys, prefixes, root


async def test_list_objects(gw: Any) -> None:
    raw, _, _ = gw
    status, _, body = await raw.request("GET", "/data?list-type=2")
    keys, prefixes, root = contents(body)
    assert status == 200 and prefixes == []
    assert keys == ["a b+c&d.txt", "big.bin", "dir/a.json", "dir/sub/b.bin", "empty", "hello.txt"]
    assert root.findtext(f"{NS}KeyCount") == "6" and root.findtext(f"{NS}IsTruncated") == "false"
    status, _, body = await raw.request("GET", "/data?list-type=2&delimiter=/&encoding-type=url")
    keys, prefixes, root = contents(body)
    assert keys == ["a%20b%2Bc%26d.txt", "big.bin", "empty", "hello.txt"] and prefixes == ["dir/"]
    assert root.findtext(f"{NS}EncodingType") == "url"
    # v1 paging with a delimiter: NextMarker
    _, _, body = await raw.request("GET", "/data?delimiter=/&max-keys=2&marker=big.bin")
    keys, prefixes, root = contents(body)
    assert keys == ["empty"] and prefixes == ["dir/"]
    assert root.findtext(f"{NS}IsTruncated") == "true"
    assert root.findtext(f"{NS}NextMarker") == "empty"
    _, _, body = await raw.request("GET", "/data?delimiter=/&max-keys=1&marker=big.bin")
    assert ET.fromstring(body).findtext(f"{NS}NextMarker") == "dir/"
    _, _, body = await raw.request("GET", "/data?delimiter=/&max-keys=1&marker=dir/")
    assert contents(body)[0] == ["empty"]
    _, _, body = await raw.request("GET", "/data?max-keys=1")
    assert ET.fromstring(body).find(f"{NS}NextMarker") is None  # only with a delimiter
    # v2 paging with tokens reaches every key once
    seen: list[str] = []
    token = None
    for _ in range(10):
        target = "/data?list-type=2&max-keys=2" + (f"&continuation-token={quote(token, safe='')}" if token else "")
        _, _, body = await raw.request("GET", target)
        keys, _, root = contents(body)
        seen += keys
        token = root.findtext(f"{NS}NextContinuationToken")
        if root.findtext(f"{NS}IsTruncated") == "false":
            assert token is None
            break
    assert seen == ["a b+c&d.txt", "big.bin", "dir/a.json", "dir/sub/b.bin", "empty", "hello.txt"]
    _, _, body = await raw.request("GET", "/data?list-type=2&prefix=dir/&start-after=dir/a.json")
    assert contents(body)[0] == ["dir/sub/b.bin"]
    _, _, body = await raw.request("GET", "/data?prefix=dir/s")
    assert contents(body)[0] == ["dir/sub/b.bin"]


async def test_list_objects_errors(gw: Any) -> None:
    raw, _, _ = gw
    for target, code in [
        ("/data?max-keys=-1", "InvalidArgument"),
        ("/data?max-keys=abc", "InvalidArgument"),
        ("/data?list-type=3", "InvalidArgument"),
        ("/data?encoding-type=base64", "InvalidArgument"),
        ("/data?list-type=2&continuation-token=%%%", "InvalidArgument"),
        ("/data?list-type=2&continuation-token=bm9wZQ", "InvalidArgument"),
        ("/nope?list-type=2", "NoSuchBucket"),
        ("/data?prefix=%ff", "InvalidArgument"),
    ]:
        status, _, body = await raw.request("GET", target)
        assert error_code(body) == code, target
        assert 400 <= status < 500
    _, _, body = await raw.request("GET", "/data?max-keys=5000")
    assert ET.fromstring(body).findtext(f"{NS}MaxKeys") == "1000"  # capped (s3.max_keys)
    assert decode_token(encode_token("a/é")) == "a/é"


# --- authentication ---------------------------------------------------------------------------------


async def test_signed_requests_and_overrides() -> None:
    server, port, _, _ = await start(anonymous=False)
    raw = Raw(port)
    creds = Credentials("AK", "SK")
    try:
        status, _, body = await raw.request("GET", "/data/hello.txt")
        assert (status, error_code(body)) == (403, "AccessDenied")
        host = {"host": f"127.0.0.1:{port}"}
        signed = sign_headers(creds, "GET", "/data/hello.txt", "response-content-type=x%2Fy", host)
        status, headers, body = await raw.request("GET", "/data/hello.txt?response-content-type=x%2Fy", signed)
        assert status == 200 and body == b"hello world\n" and headers["content-type"] == "x/y"
        wrong = sign_headers(Credentials("AK", "nope"), "GET", "/data/hello.txt", "", host)
        status, _, body = await raw.request("GET", "/data/hello.txt", wrong)
        assert (status, error_code(body)) == (403, "SignatureDoesNotMatch") and b"hello world" not in body
        unknown = sign_headers(Credentials("WHO", "SK"), "GET", "/data/hello.txt", "", host)
        status, _, body = await raw.request("GET", "/data/hello.txt", unknown)
        assert (status, error_code(body)) == (403, "InvalidAccessKeyId")
        old = sign_headers(creds, "GET", "/data/hello.txt", "", host, amz_date="20200101T000000Z")
        status, _, body = await raw.request("GET", "/data/hello.txt", old)
        assert (status, error_code(body)) == (403, "RequestTimeTooSkewed")
    finally:
        await raw.close()
        await server.stop()


async def test_stored_attributes_are_served_and_overrides_win() -> None:
    client = FakeClient(FILES)
    client.attributes["/data/hello.txt"] = Attributes.of(
        {"Content-Type": "text/x-stored", "Cache-Control": "max-age=9", "Content-Language": "fr"},
        {"owner": "team-a", "note": "=?UTF-8?B?w6k=?="},
    )
    client.attributes["/data/dir/a.json"] = Attributes()  # kept, but no content type
    server, port, _, _ = await start(client, anonymous=False)
    raw = Raw(port)
    host = {"host": f"127.0.0.1:{port}"}
    creds = Credentials("AK", "SK")
    try:
        for method in ("GET", "HEAD"):
            status, headers, _ = await raw.request(
                method, "/data/hello.txt", sign_headers(creds, method, "/data/hello.txt", "", host)
            )
            assert status == 200 and headers["content-type"] == "text/x-stored"
            assert headers["cache-control"] == "max-age=9" and headers["content-language"] == "fr"
            assert headers["x-amz-meta-owner"] == "team-a"
            assert headers["x-amz-meta-note"] == "=?UTF-8?B?w6k=?="
            assert "content-disposition" not in headers
        query = "response-cache-control=no-store&response-content-type=x%2Fy"
        signed = sign_headers(creds, "GET", "/data/hello.txt", query, host)
        status, headers, _ = await raw.request("GET", f"/data/hello.txt?{query}", signed)
        assert headers["content-type"] == "x/y" and headers["cache-control"] == "no-store"
        assert headers["content-language"] == "fr" and headers["x-amz-meta-owner"] == "team-a"
        # Nothing stored: the key's extension decides, as before.
        signed = sign_headers(creds, "HEAD", "/data/dir/a.json", "", host)
        status, headers, _ = await raw.request("HEAD", "/data/dir/a.json", signed)
        assert headers["content-type"] == "application/json"
        assert not [h for h in headers if h.startswith("x-amz-meta-")]
    finally:
        await raw.close()
        await server.stop()


async def test_anonymous_cannot_override_response_headers(gw: Any) -> None:
    raw, _, _ = gw
    status, _, body = await raw.request("GET", "/data/hello.txt?response-content-type=x")
    assert (status, error_code(body)) == (400, "InvalidRequest")


# --- failures on the read path --------------------------------------------------------------------


async def test_overload_is_slow_down() -> None:
    client = FakeClient(FILES)
    client.read_delay = 0.3
    server, port, _, _ = await start(client, max_inflight=1)
    raws = [Raw(port), Raw(port)]
    try:
        results = await asyncio.gather(*(r.request("GET", "/data/hello.txt") for r in raws))
        statuses = sorted(status for status, _, _ in results)
        assert statuses == [200, 503]
        slow = next(body for status, _, body in results if status == 503)
        assert error_code(slow) == "SlowDown"
    finally:
        for r in raws:
            await r.close()
        await server.stop()


async def test_failure_mid_stream_cuts_the_connection() -> None:
    client = FakeClient(FILES)
    server, port, _, _ = await start(client, block_size=64 * 1024, window=2)
    try:
        client.fail_reads_after = 0
        raw = Raw(port)
        status, headers, body = await raw.request("GET", "/data/big.bin")
        assert status == 503 and error_code(body) == "ServiceUnavailable"
        assert headers.get("retry-after") == "1"
        await raw.close()
        client.reads = 0
        client.fail_reads_after = 4
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /data/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await asyncio.wait_for(reader.read(-1), 5)
        writer.close()
        head, _, got = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and 0 < len(got) < len(BIG)
        assert BIG.startswith(got)  # short, never wrong
    finally:
        await server.stop()


async def test_object_changing_before_the_first_byte_is_retried() -> None:
    client = FakeClient(FILES)
    client.stale_once = True
    server, port, _, _ = await start(client)
    raw = Raw(port)
    try:
        status, _, body = await raw.request("GET", "/data/hello.txt")
        assert status == 200 and body == b"hello world\n"
    finally:
        await raw.close()
        await server.stop()


async def test_small_hot_get_reads_beside_its_stat(caplog: pytest.LogCaptureFixture) -> None:
    client = FakeClient(FILES)
    client.stat_delay = 0.02
    server, port, gateway, _ = await start(client)
    raw = Raw(port)
    path = "/data/hello.txt"
    try:
        assert (await raw.request("GET", "/data/hello.txt"))[2] == b"hello world\n"
        assert client.events == [("stat", path), ("stat-done", path), ("read", path)]
        client.events.clear()
        assert (await raw.request("GET", "/data/hello.txt", {"Range": "bytes=6-"}))[2] == b"world\n"
        # the second GET knows the version: its read starts before the stat has answered
        assert client.events == [("stat", path), ("read", path), ("stat-done", path)]
        # the object changes: the speculative read (old version) is dropped, the new bytes served
        client.files[path] = b"hello again, a new version\n"
        status, _, body = await raw.request("GET", "/data/hello.txt")
        assert status == 200 and body == b"hello again, a new version\n"
        # a precondition that fails, a range that does not match: the read is not used
        assert (await raw.request("GET", "/data/hello.txt", {"If-Match": '"nope"'}))[0] == 412
        status, _, body = await raw.request("GET", "/data/hello.txt", {"Range": "bytes=-5"})
        assert status == 206 and body == b"sion\n"
        client.files[path] = b"short"
        status, _, body = await raw.request("GET", "/data/hello.txt", {"Range": "bytes=-5"})
        assert status == 206 and body == b"short"
        await asyncio.sleep(0.05)
        assert len(gateway.pool) >= 1  # blocks of used and of dropped reads came back
        # the object disappears
        del client.files[path]
        status, _, body = await raw.request("GET", "/data/hello.txt")
        assert status == 404 and error_code(body) == "NoSuchKey"
    finally:
        await raw.close()
        await server.stop()
    assert "never retrieved" not in caplog.text


# --- fuzz ------------------------------------------------------------------------------------------------

methods = st.sampled_from(["GET", "HEAD", "PUT", "POST", "DELETE", "PATCH", "OPTIONS", "G3T"])
segments = st.sampled_from(["data", "other", "nope", "hello.txt", "dir", "..", "%2e%2e", "%2F", "a%00", "", "big.bin", "é", "%ff", "sub"])
query_keys = st.sampled_from(["list-type", "prefix", "delimiter", "max-keys", "marker", "continuation-token", "start-after", "encoding-type", "acl", "location", "uploads", "uploadId", "partNumber", "versionId", "X-Amz-Algorithm", "X-Amz-Signature", "response-expires", "%zz"])
query_values = st.sampled_from(["", "2", "/", "url", "-1", "99999999999", "a", "%ff", "AWS4-HMAC-SHA256", "1"])
header_items = st.sampled_from([
    ("Range", "bytes=0-3"), ("Range", "bytes=-1"), ("Range", "bytes=99999999-"), ("Range", "garbage"),
    ("If-Match", '"x"'), ("If-None-Match", "*"), ("If-Modified-Since", "yesterday"),
    ("Authorization", "AWS4-HMAC-SHA256 Credential=x"), ("Authorization", "AWS x:y"),
    ("x-amz-date", "20200101T000000Z"), ("x-amz-content-sha256", "zz"),
])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    method=methods,
    path=st.lists(segments, max_size=4).map(lambda parts: "/" + "/".join(parts)),
    query=st.lists(st.tuples(query_keys, query_values), max_size=4),
    headers=st.lists(header_items, max_size=3),
)
def test_router_fuzz(method: str, path: str, query: list[tuple[str, str]], headers: list[tuple[str, str]]) -> None:
    async def run() -> None:
        server, port, _, _ = await start(block_size=64 * 1024)
        raw = Raw(port)
        try:
            target = path + ("?" + "&".join(f"{k}={v}" for k, v in query) if query else "")
            hdrs: dict[str, str] = {}
            for name, value in headers:
                hdrs.setdefault(name, value)
            status, resp_headers, body = await raw.request(method, target, hdrs)
            assert status in (200, 206, 304, 400, 403, 404, 405, 412, 416, 501), (status, body)
            assert "x-amz-request-id" in resp_headers
            if status >= 400 and method != "HEAD":
                assert error_code(body)
            # the server is still healthy and in step
            assert (await raw.request("GET", "/data/hello.txt"))[2] == b"hello world\n"
        finally:
            await raw.close()
            await server.stop()

    asyncio.run(run())
