"""A local S3-compatible object server with settable bandwidth and first-byte latency.

Benchmarks need an under store whose speed is known: moto is far too slow, and a plain local
directory is faster than any real object store. This serves the subdirectories of a directory
as buckets, path-style (``GET/HEAD /<bucket>/<key>``, one ``Range``; ``GET /<bucket>?list-type=2``
lists), waits ``first_byte_ms`` before each response (the
object store's time to first byte) and paces each connection at ``rate_per_conn`` bytes/s (S3
serves roughly 50-100 MB/s per connection), optionally under a shared ``rate_total`` cap.
Signatures are not checked: clients use ``skip_signature``.

``GET /__stats`` answers ``{"requests": N, "gets": N, "bytes_sent": N}`` (body bytes sent so
far), so a benchmark can count what its readers cost the object store.

Run: ``python bench/ufs_server.py DIR --port 9000 --first-byte-ms 20 --rate-per-conn 100MB``
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import hashlib
import json
import os
import time
from pathlib import Path
from urllib.parse import parse_qs, unquote
from xml.sax.saxutils import escape

CHUNK = 256 * 1024


def _size(text: str) -> float:
    text = text.strip().upper().removesuffix("/S")
    for suffix, mult in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * mult
    return float(text)


class Pacer:
    """A token bucket: ``take(n)`` sleeps so the average rate stays at ``rate`` bytes/s."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.next_free = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        start = max(now, self.next_free)
        self.next_free = start + n / self.rate
        delay = self.next_free - now - 0.002
        if delay > 0:
            await asyncio.sleep(delay)


class ObjectServer:
    def __init__(self, root: Path, first_byte_ms: float, rate_per_conn: float, rate_total: float) -> None:
        self.root = root.resolve()
        self.first_byte = first_byte_ms / 1000
        self.rate_per_conn = rate_per_conn
        self.total = Pacer(rate_total)
        self.requests = 0
        self.gets = 0
        self.bytes_sent = 0

    def _file(self, target: str) -> Path | None:
        path = unquote(target.split("?", 1)[0])
        parts = path.lstrip("/").split("/", 1)
        if len(parts) != 2 or ".." in parts[1].split("/"):
            return None
        file = (self.root / parts[0] / parts[1]).resolve()
        if not file.is_relative_to(self.root) or not file.is_file():
            return None
        return file

    def _list(self, target: str) -> bytes | None:
        """ListObjectsV2 (``GET /<bucket>?list-type=2&prefix=&delimiter=``), or None."""
        path, _, query = target.partition("?")
        bucket = unquote(path).strip("/")
        params = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
        if "list-type" not in params or not bucket or "/" in bucket:
            return None
        base = (self.root / bucket).resolve()
        if not base.is_relative_to(self.root) or not base.is_dir():
            return None
        prefix, delimiter = params.get("prefix", ""), params.get("delimiter", "")
        after = params.get("continuation-token") or params.get("start-after", "")
        max_keys = int(params.get("max-keys", "1000"))
        keys: dict[str, os.stat_result | None] = {}
        for dirpath, _, files in os.walk(base):
            for name in files:
                key = Path(dirpath, name).relative_to(base).as_posix()
                if not key.startswith(prefix):
                    continue
                rest = key[len(prefix):]
                if delimiter and delimiter in rest:
                    keys[prefix + rest[: rest.index(delimiter) + len(delimiter)]] = None
                else:
                    keys[key] = Path(dirpath, name).stat()
        chosen = [k for k in sorted(keys) if k > after][:max_keys]
        truncated = len([k for k in keys if k > after]) > len(chosen)
        parts = [f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>"
                 f"<KeyCount>{len(chosen)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>"
                 f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"]
        if delimiter:
            parts.append(f"<Delimiter>{escape(delimiter)}</Delimiter>")
        if truncated:
            parts.append(f"<NextContinuationToken>{escape(chosen[-1])}</NextContinuationToken>")
        for key in chosen:
            st = keys[key]
            if st is None:
                parts.append(f"<CommonPrefixes><Prefix>{escape(key)}</Prefix></CommonPrefixes>")
                continue
            etag = hashlib.md5(f"{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest()
            modified = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(st.st_mtime))
            parts.append(f"<Contents><Key>{escape(key)}</Key><LastModified>{modified}"
                         f"</LastModified><ETag>&quot;{etag}&quot;</ETag><Size>{st.st_size}</Size>"
                         f"<StorageClass>STANDARD</StorageClass></Contents>")
        return ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
                'xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                + "".join(parts) + "</ListBucketResult>").encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pacer = Pacer(self.rate_per_conn)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                self.requests += 1
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
                if target == "/__stats":
                    body = json.dumps({"requests": self.requests, "gets": self.gets,
                                       "bytes_sent": self.bytes_sent}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    await writer.drain()
                    continue
                listing = self._list(target) if method == "GET" else None
                if listing is not None:
                    await asyncio.sleep(self.first_byte)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(listing), listing))
                    await writer.drain()
                    continue
                file = self._file(target)
                if file is None or method not in ("GET", "HEAD"):
                    body = b"<Error><Code>NoSuchKey</Code></Error>"
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Type: application/xml\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body if method != "HEAD" else b""))
                    await writer.drain()
                    continue
                st = file.stat()
                etag = '"' + hashlib.md5(f"{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest() + '"'
                if headers.get("if-match") and headers["if-match"] != etag:
                    writer.write(b"HTTP/1.1 412 Precondition Failed\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    continue
                start, end, status = 0, st.st_size, "200 OK"
                rng = headers.get("range")
                extra = ""
                if rng and rng.startswith("bytes="):
                    a, _, b = rng[6:].partition("-")
                    if a:
                        start, end = int(a), min(int(b) + 1 if b else st.st_size, st.st_size)
                    else:
                        start, end = max(0, st.st_size - int(b)), st.st_size
                    status = "206 Partial Content"
                    extra = f"Content-Range: bytes {start}-{end - 1}/{st.st_size}\r\n"
                await asyncio.sleep(self.first_byte)
                length = end - start if method == "GET" else 0
                writer.write(
                    (f"HTTP/1.1 {status}\r\nContent-Length: {end - start}\r\nETag: {etag}\r\n"
                     f"Last-Modified: {email.utils.formatdate(st.st_mtime, usegmt=True)}\r\n"
                     f"Accept-Ranges: bytes\r\n{extra}\r\n").encode()
                )
                if length:
                    self.gets += 1
                    fd = os.open(file, os.O_RDONLY)
                    try:
                        pos = start
                        while pos < end:
                            n = min(CHUNK, end - pos)
                            await pacer.take(n)
                            await self.total.take(n)
                            writer.write(os.pread(fd, n, pos))
                            await writer.drain()
                            self.bytes_sent += n
                            pos += n
                    finally:
                        os.close(fd)
                else:
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def serve(args: argparse.Namespace) -> None:
    server = ObjectServer(Path(args.root), args.first_byte_ms, _size(args.rate_per_conn), _size(args.rate_total))
    srv = await asyncio.start_server(server.handle, "127.0.0.1", args.port)
    port = srv.sockets[0].getsockname()[1]
    print(f"listening on http://127.0.0.1:{port}", flush=True)
    async with srv:
        await srv.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--first-byte-ms", type=float, default=20.0)
    parser.add_argument("--rate-per-conn", default="100MB")
    parser.add_argument("--rate-total", default="0")
    args = parser.parse_args()
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
