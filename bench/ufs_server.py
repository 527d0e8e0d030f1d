"""A local S3-compatible object server with settable bandwidth and first-byte latency.

Benchmarks need an under store whose speed is known: moto is far too slow, and a plain local
directory is faster than any real object store. This serves the subdirectories of a directory
as buckets, path-style, and waits ``first_byte_ms`` before each answer (the object store's time
to first byte). Each connection moves bodies, sent or received, at most at ``rate_per_conn``
bytes/s (S3 serves roughly 50-100 MB/s per connection), optionally under a ``rate_total`` cap
shared by every connection and both directions. Signatures are not checked: clients use
``skip_signature``.

Operations (what obstore's ``S3Store`` sends):

- ``GET``/``HEAD /<bucket>/<key>`` (one ``Range``; ``If-Match``); ``GET /<bucket>?list-type=2``
  lists (ListObjectsV2);
- ``PUT /<bucket>/<key>`` (PutObject; ``If-None-Match: *`` and ``If-Match`` as conditions,
  ``Content-MD5`` checked); ``PUT`` with ``x-amz-copy-source`` (CopyObject);
- multipart: ``POST ?uploads`` (create), ``PUT ?partNumber=N&uploadId=U`` (part),
  ``POST ?uploadId=U`` (complete: the parts are joined into a temp file that is renamed into
  place, so no partial object is ever visible), ``DELETE ?uploadId=U`` (abort);
- ``DELETE /<bucket>/<key>`` and ``POST /<bucket>?delete`` (DeleteObjects, which obstore uses).

Bodies may be sent with ``Content-Length``, ``Transfer-Encoding: chunked`` or aws-chunked
framing; ``Expect: 100-continue`` is answered. ETags are S3's: the MD5 of the body of a single
PUT, ``md5(part md5s)-N`` after a multipart upload (``--etag xxh3``: the same with xxh3-128, for
benchmarks where MD5 at ~1 CPU-second per GB would take this machine's cores from what is
measured; a real store hashes on its own machines). They are kept in memory for the objects
written through this server; other files (and every file after a restart) get an ETag derived
from their size and mtime. Objects are not fsync'd: the emulated store's durability is not what
is measured, its speed is.

Uploads in progress and temp files live in ``<root>/.ufs-server/<pid>-<id>`` (same file system,
so the final rename is atomic), made at the first write and removed when the server stops;
names starting with ``.`` are not buckets.

``GET /__stats`` answers ``{"requests", "gets", "bytes_sent", "active_gets", "puts",
"bytes_received", "multipart_completed", "multipart_aborted", "deletes"}`` (counters since start:
``gets`` and ``bytes_sent`` are body-carrying GETs and their bytes, ``puts`` and
``bytes_received`` are PutObject/UploadPart requests and their body bytes; ``active_gets`` is a
gauge, the body-carrying GETs under way now, first-byte wait included), so a benchmark can count
what its clients cost the object store and how many reads they keep in flight.

Run: ``python bench/ufs_server.py DIR --port 9000 --first-byte-ms 20 --rate-per-conn 100MB``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import contextlib
import email.utils
import hashlib
import json
import os
import shutil
import signal
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote
from xml.sax.saxutils import escape

CHUNK = 256 * 1024  # pacing step of response bodies
RECV_CHUNK = 1024 * 1024  # pacing step of request bodies (hashed and written off the loop)
MIN_PART = 5 * 1024 * 1024  # S3's smallest part, except the last
MAX_XML = 8 * 1024 * 1024  # largest XML request body accepted (10000 parts fit)
DRAIN_LIMIT = 1024 * 1024  # unread body bytes discarded to keep a connection; more: close it
RESERVED = ".ufs-server"
XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"


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


class S3Error(Exception):
    """An S3 error answer: HTTP status, S3 code, message."""

    def __init__(self, status: str, code: str, message: str = "") -> None:
        super().__init__(message or code)
        self.status, self.code, self.message = status, code, message or code


def _xml(root: str, inner: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><{root} xmlns="{XMLNS}">{inner}</{root}>').encode()


def _parse_xml(data: bytes) -> ET.Element:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise S3Error("400 Bad Request", "MalformedXML", str(exc)) from None
    for el in root.iter():  # drop namespaces: clients send them or not
        el.tag = el.tag.rsplit("}", 1)[-1]
    return root


class Body:
    """The request body, read at most at the connection's (and the server's) rate.

    ``Content-Length`` bodies, ``Transfer-Encoding: chunked`` and aws-chunked framing (the same
    hex-size lines, with a signature after ``;``) are decoded; ``chunks()`` yields the payload.
    """

    def __init__(self, reader: asyncio.StreamReader, headers: dict[str, str], pacers: tuple[Pacer, Pacer]) -> None:
        self.reader = reader
        self.pacers = pacers
        encoding = headers.get("content-encoding", "").lower()
        self.chunked = ("chunked" in headers.get("transfer-encoding", "").lower()
                        or "aws-chunked" in encoding)
        self.left = 0 if self.chunked else int(headers.get("content-length") or 0)
        self.done = not self.chunked and self.left == 0

    @property
    def present(self) -> bool:
        return self.chunked or self.left > 0

    async def _read(self, n: int) -> bytes:
        for pacer in self.pacers:
            await pacer.take(n)
        return await self.reader.readexactly(n)

    async def chunks(self, step: int = RECV_CHUNK) -> AsyncIterator[bytes]:
        if self.done:
            return
        if not self.chunked:
            while self.left:
                n = min(step, self.left)
                data = await self._read(n)
                self.left -= n
                yield data
            self.done = True
            return
        while True:
            line = await self.reader.readuntil(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise S3Error("400 Bad Request", "IncompleteBody", "bad chunk size line") from None
            if size == 0:
                while (await self.reader.readuntil(b"\r\n")) != b"\r\n":
                    pass  # trailers (aws-chunked checksums): not checked
                self.done = True
                return
            while size:
                n = min(step, size)
                yield await self._read(n)
                size -= n
            if await self.reader.readexactly(2) != b"\r\n":
                raise S3Error("400 Bad Request", "IncompleteBody", "chunk not followed by CRLF")

    async def read_all(self, limit: int = MAX_XML) -> bytes:
        out = bytearray()
        async for chunk in self.chunks():
            out += chunk
            if len(out) > limit:
                raise S3Error("400 Bad Request", "MalformedXML", "request body too large")
        return bytes(out)

    async def discard(self) -> bool:
        """Drop what is left unread; False when that is too much and the connection must close."""
        if self.done:
            return True
        if not self.chunked and self.left > DRAIN_LIMIT:
            return False
        self.pacers = (Pacer(0), Pacer(0))
        try:
            async for _ in self.chunks():
                pass
        except S3Error:
            return False
        return True


@dataclass
class Part:
    size: int
    etag: str  # hex digest, unquoted
    file: Path  # where its bytes are: its own file, or the upload's assembly file
    offset: int


@dataclass
class Upload:
    """A multipart upload in progress.

    Clients cut an object into parts of one size (the last may be shorter), so a part whose
    length is the upload's ``part_size`` (the length of the first part that arrived) is written
    straight into ``assembly`` at ``(number - 1) * part_size``: completing the usual upload is a
    truncate and a rename, not a copy of the whole object. Other parts get files of their own
    and are copied in at completion.
    """

    bucket: str
    key: str
    folder: Path
    part_size: int | None = None
    parts: dict[int, Part] = field(default_factory=dict)
    writers: int = 0  # part bodies being written now
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    completing: bool = False

    @property
    def assembly(self) -> Path:
        return self.folder / "assembly"


def _absorb(hashers: list[Any], fd: int, data: bytes, offset: int) -> None:
    for hasher in hashers:
        hasher.update(data)
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _copy_range(src: Path, src_offset: int, size: int, out: int, out_offset: int) -> None:
    """``size`` bytes of ``src`` from ``src_offset`` into the open file ``out`` at ``out_offset``
    (in the kernel where it can)."""
    with open(src, "rb") as f:
        done = 0
        try:
            while done < size:
                n = os.copy_file_range(f.fileno(), out, size - done, src_offset + done, out_offset + done)
                if n == 0:
                    break
                done += n
        except OSError:
            while done < size:
                block = os.pread(f.fileno(), min(8 * 1024 * 1024, size - done), src_offset + done)
                if not block:
                    break
                os.pwrite(out, block, out_offset + done)
                done += len(block)
    if done != size:
        raise OSError(f"short copy of {src}")


def _assemble(parts: list[Part], dest: Path, in_place: bool) -> None:
    """Lay ``parts`` end to end in ``dest``: in place (``dest`` is the assembly file and holds
    every part but maybe the last one at its offset), or as a new file copied from the parts."""
    fd = os.open(dest, os.O_WRONLY | (0 if in_place else os.O_CREAT | os.O_EXCL), 0o644)
    try:
        pos = 0
        for part in parts:
            if not (in_place and part.file == dest):
                _copy_range(part.file, part.offset, part.size, fd, pos)
            pos += part.size
        os.ftruncate(fd, pos)  # parts uploaded but not listed go
    finally:
        os.close(fd)


def _copy_hashed(src: Path, dest: Path, hasher: Any) -> str:
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        while block := fin.read(8 * 1024 * 1024):
            hasher.update(block)
            fout.write(block)
    return hasher.hexdigest()


class ObjectServer:
    def __init__(self, root: Path, first_byte_ms: float, rate_per_conn: float, rate_total: float,
                 etag_hash: str = "md5") -> None:
        self.root = root.resolve()
        self.etag_hash = etag_hash
        self.first_byte = first_byte_ms / 1000
        self.rate_per_conn = rate_per_conn
        self.total = Pacer(rate_total)
        # Made at the first write, so that serving reads leaves the directory as it was.
        self.work = self.root / RESERVED / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = self.work / "tmp"
        self.uploads: dict[str, Upload] = {}
        # (st_dev, st_ino) -> (size, mtime_ns, etag) of the objects written here
        self.etags: dict[tuple[int, int], tuple[int, int, str]] = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="ufs-io")
        self.requests = 0
        self.gets = 0
        self.bytes_sent = 0
        self.active_gets = 0  # body-carrying GETs begun and not yet ended
        self.puts = 0
        self.bytes_received = 0
        self.multipart_completed = 0
        self.multipart_aborted = 0
        self.deletes = 0

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        shutil.rmtree(self.work, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.root / RESERVED).rmdir()  # only when no other server uses it

    def stats(self) -> dict[str, int]:
        return {"requests": self.requests, "gets": self.gets, "bytes_sent": self.bytes_sent,
                "active_gets": self.active_gets,
                "puts": self.puts, "bytes_received": self.bytes_received,
                "multipart_completed": self.multipart_completed,
                "multipart_aborted": self.multipart_aborted, "deletes": self.deletes}

    # names and metadata ---------------------------------------------------------------------------

    def _bucket_dir(self, bucket: str) -> Path:
        if not bucket or bucket.startswith(".") or "/" in bucket:
            raise S3Error("400 Bad Request", "InvalidBucketName", bucket)
        base = self.root / bucket
        if not base.is_dir():
            raise S3Error("404 Not Found", "NoSuchBucket", bucket)
        return base

    def _object_path(self, bucket: str, key: str) -> Path:
        """Where ``key`` lives (for writes: keys must be canonical relative paths)."""
        base = self._bucket_dir(bucket)
        segments = key.split("/")
        if not key or any(s in ("", ".", "..") for s in segments):
            raise S3Error("400 Bad Request", "InvalidArgument",
                          f"key {key!r} cannot be stored as a file (empty, '.' or '..' segment)")
        return base.joinpath(*segments)

    def _file(self, target: str) -> Path | None:
        path = unquote(target.split("?", 1)[0])
        parts = path.lstrip("/").split("/", 1)
        if len(parts) != 2 or parts[0].startswith(".") or ".." in parts[1].split("/"):
            return None
        file = (self.root / parts[0] / parts[1]).resolve()
        if not file.is_relative_to(self.root) or not file.is_file():
            return None
        return file

    def _etag(self, st: os.stat_result) -> str:
        known = self.etags.get((st.st_dev, st.st_ino))
        if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
            return known[2]
        return '"' + hashlib.md5(f"{st.st_size}-{st.st_mtime_ns}".encode()).hexdigest() + '"'

    def _check_conditions(self, dest: Path, headers: dict[str, str]) -> None:
        none_match, match = headers.get("if-none-match"), headers.get("if-match")
        if not none_match and not match:
            return
        try:
            st = dest.stat()
        except FileNotFoundError:
            st = None
        if st is not None and not dest.is_file():
            st = None
        if none_match == "*" and st is not None:
            raise S3Error("412 Precondition Failed", "PreconditionFailed", "the object exists")
        if match:
            if st is None:
                raise S3Error("404 Not Found", "NoSuchKey", "no object to match")
            if match != "*" and match.strip('"') != self._etag(st).strip('"'):
                raise S3Error("412 Precondition Failed", "PreconditionFailed", "ETag does not match")

    def _commit(self, tmp: Path, dest: Path, etag: str, headers: dict[str, str]) -> os.stat_result:
        """Rename ``tmp`` onto ``dest`` (on the loop: conditions and rename are one step)."""
        try:
            self._check_conditions(dest, headers)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        except (NotADirectoryError, IsADirectoryError, FileExistsError):
            raise S3Error("409 Conflict", "InvalidArgument",
                          "key collides with a directory or a file of this store's tree") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        st = dest.stat()
        self.etags[(st.st_dev, st.st_ino)] = (st.st_size, st.st_mtime_ns, etag)
        return st

    def _new_tmp(self) -> Path:
        self.tmp.mkdir(parents=True, exist_ok=True)
        return self.tmp / uuid.uuid4().hex

    def _hasher(self) -> Any:
        if self.etag_hash == "xxh3":
            import xxhash

            return xxhash.xxh3_128()
        return hashlib.md5()

    async def _receive(self, body: Body, headers: dict[str, str], dest: Path,
                       offset: int | None = None) -> tuple[int, str]:
        """Stream the body into the new file ``dest`` (or at ``offset`` of the existing file
        ``dest``); hashing and writes run off the loop. Returns its size and its ETag's hex
        digest; a ``Content-MD5`` that does not match is refused."""
        loop = asyncio.get_running_loop()
        hasher = self._hasher()
        hashers = [hasher]
        check = headers.get("content-md5")
        if check and self.etag_hash != "md5":
            hashers.append(hashlib.md5())
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if offset is None else 0)
        fd = os.open(dest, flags, 0o644)
        size = 0
        try:
            async for chunk in body.chunks():
                self.bytes_received += len(chunk)
                await loop.run_in_executor(self.pool, _absorb, hashers, fd, chunk, (offset or 0) + size)
                size += len(chunk)
        finally:
            os.close(fd)
        if check and check != base64.b64encode(hashers[-1].digest()).decode():
            raise S3Error("400 Bad Request", "BadDigest", "Content-MD5 does not match the body")
        return size, hasher.hexdigest()

    # listing --------------------------------------------------------------------------------------

    def _list(self, target: str) -> bytes | None:
        """ListObjectsV2 (``GET /<bucket>?list-type=2&prefix=&delimiter=``), or None."""
        path, _, query = target.partition("?")
        bucket = unquote(path).strip("/")
        params = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
        if "list-type" not in params or not bucket or "/" in bucket or bucket.startswith("."):
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
                    try:
                        keys[key] = Path(dirpath, name).stat()
                    except FileNotFoundError:
                        continue  # deleted while listing
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
            etag = escape(self._etag(st), {'"': "&quot;"})
            modified = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(st.st_mtime))
            parts.append(f"<Contents><Key>{escape(key)}</Key><LastModified>{modified}"
                         f"</LastModified><ETag>{etag}</ETag><Size>{st.st_size}</Size>"
                         f"<StorageClass>STANDARD</StorageClass></Contents>")
        return ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
                'xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                + "".join(parts) + "</ListBucketResult>").encode()

    # writes ---------------------------------------------------------------------------------------

    async def put_object(self, bucket: str, key: str, headers: dict[str, str], body: Body) -> list[str]:
        dest = self._object_path(bucket, key)
        tmp = self._new_tmp()
        try:
            _, digest = await self._receive(body, headers, tmp)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        self.puts += 1
        etag = f'"{digest}"'
        self._commit(tmp, dest, etag, headers)
        return [f"ETag: {etag}"]

    async def copy_object(self, bucket: str, key: str, headers: dict[str, str]) -> bytes:
        source = unquote(headers["x-amz-copy-source"].split("?", 1)[0]).lstrip("/")
        src_bucket, _, src_key = source.partition("/")
        src = self._object_path(src_bucket, src_key)
        dest = self._object_path(bucket, key)
        if not src.is_file():
            raise S3Error("404 Not Found", "NoSuchKey", source)
        self._check_conditions(dest, headers)
        tmp = self._new_tmp()
        loop = asyncio.get_running_loop()
        try:
            digest = await loop.run_in_executor(self.pool, _copy_hashed, src, tmp, self._hasher())
        except FileNotFoundError:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise S3Error("404 Not Found", "NoSuchKey", source) from None
        etag = f'"{digest}"'
        st = self._commit(tmp, dest, etag, headers)
        modified = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(st.st_mtime))
        quoted = escape(etag, {'"': "&quot;"})
        return _xml("CopyObjectResult", f"<LastModified>{modified}</LastModified><ETag>{quoted}</ETag>")

    def create_upload(self, bucket: str, key: str) -> bytes:
        self._object_path(bucket, key)
        upload_id = uuid.uuid4().hex
        folder = self.work / "uploads" / upload_id
        folder.mkdir(parents=True)
        self.uploads[upload_id] = Upload(bucket, key, folder)
        return _xml("InitiateMultipartUploadResult",
                    f"<Bucket>{escape(bucket)}</Bucket><Key>{escape(key)}</Key>"
                    f"<UploadId>{upload_id}</UploadId>")

    def _upload(self, bucket: str, key: str, upload_id: str) -> Upload:
        upload = self.uploads.get(upload_id)
        if upload is None or (upload.bucket, upload.key) != (bucket, key):
            raise S3Error("404 Not Found", "NoSuchUpload", upload_id)
        return upload

    async def upload_part(self, bucket: str, key: str, params: dict[str, str], headers: dict[str, str],
                          body: Body) -> list[str]:
        upload = self._upload(bucket, key, params["uploadId"])
        try:
            number = int(params["partNumber"])
        except ValueError:
            number = 0
        if not 1 <= number <= 10000:
            raise S3Error("400 Bad Request", "InvalidArgument", "partNumber must be 1-10000")
        if upload.completing:
            raise S3Error("409 Conflict", "OperationAborted", "the upload is being completed")
        length = None if body.chunked else body.left
        if length and upload.part_size is None:
            upload.part_size = length
        # A part being uploaded again is not usable until its new bytes are in.
        upload.parts.pop(number, None)
        upload.writers += 1
        upload.idle.clear()
        try:
            if length and length == upload.part_size:
                target, offset = upload.assembly, (number - 1) * length
                size, digest = await self._receive(body, headers, target, offset)
            else:
                tmp = self._new_tmp()
                try:
                    size, digest = await self._receive(body, headers, tmp)
                    target, offset = upload.folder / f"{number:05d}", 0
                    os.replace(tmp, target)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
            if self.uploads.get(params["uploadId"]) is not upload:
                raise S3Error("404 Not Found", "NoSuchUpload", params["uploadId"])  # aborted meanwhile
        except FileNotFoundError:
            raise S3Error("404 Not Found", "NoSuchUpload", params["uploadId"]) from None
        finally:
            upload.writers -= 1
            if not upload.writers:
                upload.idle.set()
        upload.parts[number] = Part(size, digest, target, offset)
        self.puts += 1
        return [f'ETag: "{digest}"']

    async def complete_upload(self, bucket: str, key: str, upload_id: str, headers: dict[str, str],
                              body: Body) -> bytes:
        upload = self._upload(bucket, key, upload_id)
        listed: list[tuple[int, str]] = []
        for part in _parse_xml(await body.read_all()).iter("Part"):
            try:
                listed.append((int(part.findtext("PartNumber") or ""),
                               (part.findtext("ETag") or "").strip().strip('"')))
            except ValueError:
                raise S3Error("400 Bad Request", "MalformedXML", "bad PartNumber") from None
        if not listed:
            raise S3Error("400 Bad Request", "MalformedXML", "no parts")
        numbers = [n for n, _ in listed]
        if numbers != sorted(set(numbers)):
            raise S3Error("400 Bad Request", "InvalidPartOrder", "parts must be in ascending order")
        upload = self._upload(bucket, key, upload_id)  # reading the body awaited: look again
        if upload.completing:
            raise S3Error("409 Conflict", "OperationAborted", "the upload is being completed")
        # No part may change while it is checked and laid out: new ones are refused, and those
        # being written are waited for.
        upload.completing = True
        try:
            while upload.writers:
                await upload.idle.wait()
            for number, etag in listed:
                have = upload.parts.get(number)
                if have is None or have.etag != etag:
                    raise S3Error("400 Bad Request", "InvalidPart", f"part {number} not uploaded with ETag {etag}")
            for number in numbers[:-1]:
                if upload.parts[number].size < MIN_PART:
                    raise S3Error("400 Bad Request", "EntityTooSmall", f"part {number} is under 5 MiB")
            dest = self._object_path(bucket, key)
            self._check_conditions(dest, headers)
        except BaseException:
            upload.completing = False  # the upload stays open, as on S3
            raise
        del self.uploads[upload_id]
        parts = [upload.parts[n] for n in numbers]
        combined = self._hasher()
        combined.update(b"".join(bytes.fromhex(p.etag) for p in parts))
        etag = f'"{combined.hexdigest()}-{len(numbers)}"'
        # In place when parts 1..K-1 are all in the assembly file (the last may be elsewhere).
        in_place = numbers == list(range(1, len(numbers) + 1)) and all(
            p.file == upload.assembly for p in parts[:-1]) and upload.assembly.exists()
        tmp = upload.assembly if in_place else self._new_tmp()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.pool, _assemble, parts, tmp, in_place)
            self._commit(tmp, dest, etag, headers)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            await loop.run_in_executor(self.pool, shutil.rmtree, upload.folder, True)
        self.multipart_completed += 1
        quoted = escape(etag, {'"': "&quot;"})
        return _xml("CompleteMultipartUploadResult",
                    f"<Location>/{escape(bucket)}/{escape(key)}</Location><Bucket>{escape(bucket)}"
                    f"</Bucket><Key>{escape(key)}</Key><ETag>{quoted}</ETag>")

    async def abort_upload(self, bucket: str, key: str, upload_id: str) -> None:
        upload = self._upload(bucket, key, upload_id)
        if upload.completing:
            raise S3Error("409 Conflict", "OperationAborted", "the upload is being completed")
        del self.uploads[upload_id]  # a part still being written is refused when it ends
        await asyncio.get_running_loop().run_in_executor(self.pool, shutil.rmtree, upload.folder, True)
        self.multipart_aborted += 1

    def _delete(self, bucket: str, key: str) -> None:
        """Remove the object (absent is fine, as on S3) and the directories it leaves empty."""
        base = self._bucket_dir(bucket)
        dest = self._object_path(bucket, key)
        try:
            st = dest.stat()
            if not dest.is_file():
                return
            dest.unlink()
        except FileNotFoundError:
            return
        self.etags.pop((st.st_dev, st.st_ino), None)
        self.deletes += 1
        parent = dest.parent
        while parent != base:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    async def delete_objects(self, bucket: str, body: Body) -> bytes:
        self._bucket_dir(bucket)
        request = _parse_xml(await body.read_all())
        quiet = (request.findtext("Quiet") or "").strip().lower() == "true"
        out = []
        for obj in request.iter("Object"):
            key = obj.findtext("Key") or ""
            try:
                self._delete(bucket, key)
            except S3Error as err:
                out.append(f"<Error><Key>{escape(key)}</Key><Code>{err.code}</Code>"
                           f"<Message>{escape(err.message)}</Message></Error>")
                continue
            if not quiet:
                out.append(f"<Deleted><Key>{escape(key)}</Key></Deleted>")
        return _xml("DeleteResult", "".join(out))

    # connection -----------------------------------------------------------------------------------

    async def _send(self, writer: asyncio.StreamWriter, status: str, body: bytes = b"",
                    headers: list[str] | None = None, head_only: bool = False,
                    content_type: str | None = None) -> None:
        lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *(headers or [])]
        if content_type:
            lines.append(f"Content-Type: {content_type}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body))
        await writer.drain()

    async def _error(self, writer: asyncio.StreamWriter, err: S3Error, head_only: bool) -> None:
        body = (f"<Error><Code>{err.code}</Code><Message>{escape(err.message)}</Message></Error>").encode()
        await self._send(writer, err.status, body, head_only=head_only, content_type="application/xml")

    async def _write_op(self, writer: asyncio.StreamWriter, method: str, path: str, params: dict[str, str],
                        headers: dict[str, str], body: Body) -> bool:
        """A write (or multipart/delete) request; False when it is not one."""
        bucket, _, key = unquote(path).lstrip("/").partition("/")
        if method == "PUT" and key:
            if "uploadId" in params and "partNumber" in params:
                extra = await self.upload_part(bucket, key, params, headers, body)
                answer, ctype = b"", None
            elif "x-amz-copy-source" in headers:
                answer, extra, ctype = await self.copy_object(bucket, key, headers), [], "application/xml"
            else:
                extra = await self.put_object(bucket, key, headers, body)
                answer, ctype = b"", None
            await asyncio.sleep(self.first_byte)
            await self._send(writer, "200 OK", answer, extra, content_type=ctype)
        elif method == "POST" and key and "uploads" in params:
            answer = self.create_upload(bucket, key)
            await asyncio.sleep(self.first_byte)
            await self._send(writer, "200 OK", answer, content_type="application/xml")
        elif method == "POST" and key and "uploadId" in params:
            answer = await self.complete_upload(bucket, key, params["uploadId"], headers, body)
            await asyncio.sleep(self.first_byte)
            await self._send(writer, "200 OK", answer, content_type="application/xml")
        elif method == "POST" and not key and "delete" in params:
            answer = await self.delete_objects(bucket, body)
            await asyncio.sleep(self.first_byte)
            await self._send(writer, "200 OK", answer, content_type="application/xml")
        elif method == "DELETE" and key and "uploadId" in params:
            await self.abort_upload(bucket, key, params["uploadId"])
            await asyncio.sleep(self.first_byte)
            await self._send(writer, "204 No Content")
        elif method == "DELETE" and key:
            self._delete(bucket, key)
            await asyncio.sleep(self.first_byte)
            await self._send(writer, "204 No Content")
        else:
            return False
        return True

    async def _read_op(self, writer: asyncio.StreamWriter, method: str, target: str, headers: dict[str, str],
                       pacer: Pacer) -> None:
        listing = self._list(target) if method == "GET" else None
        if listing is not None:
            await asyncio.sleep(self.first_byte)
            await self._send(writer, "200 OK", listing, content_type="application/xml")
            return
        file = self._file(target)
        if file is None or method not in ("GET", "HEAD"):
            raise S3Error("404 Not Found", "NoSuchKey")
        st = file.stat()
        etag = self._etag(st)
        if headers.get("if-match") and headers["if-match"] != etag:
            await self._send(writer, "412 Precondition Failed")
            return
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
        length = end - start if method == "GET" else 0
        if length:
            self.active_gets += 1
        try:
            await asyncio.sleep(self.first_byte)
            await self._send_range(writer, file, status, etag, st, extra, start, end, length, pacer)
        finally:
            if length:
                self.active_gets -= 1

    async def _send_range(self, writer: asyncio.StreamWriter, file: Path, status: str, etag: str,
                          st: os.stat_result, extra: str, start: int, end: int, length: int,
                          pacer: Pacer) -> None:
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

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pacer = Pacer(self.rate_per_conn)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                self.requests += 1
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                if "://" in target.split("?", 1)[0]:
                    # Absolute form (``GET http://host:port/bucket/key``), which HTTP/1.1 servers
                    # must accept and some S3 clients send: keep the path and query.
                    target = "/" + target.split("://", 1)[1].partition("/")[2]
                headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:] if x)}
                if target == "/__stats":
                    await self._send(writer, "200 OK", json.dumps(self.stats()).encode(),
                                     content_type="application/json")
                    continue
                body = Body(reader, headers, (pacer, self.total))
                if body.present and headers.get("expect", "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                path, _, query = target.partition("?")
                params = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
                try:
                    if not await self._write_op(writer, method, path, params, headers, body):
                        await self._read_op(writer, method, target, headers, pacer)
                except S3Error as err:
                    await self._error(writer, err, method == "HEAD")
                except (ConnectionError, asyncio.IncompleteReadError):
                    raise
                except Exception as exc:  # a fault of this server: answer it, then hang up
                    await self._error(writer, S3Error("500 Internal Server Error", "InternalError",
                                                      f"{type(exc).__name__}: {exc}"), method == "HEAD")
                    return
                keep = await body.discard()
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def serve(args: argparse.Namespace) -> None:
    server = ObjectServer(Path(args.root), args.first_byte_ms, _size(args.rate_per_conn), _size(args.rate_total),
                          args.etag)
    try:
        srv = await asyncio.start_server(server.handle, "127.0.0.1", args.port, limit=RECV_CHUNK)
        port = srv.sockets[0].getsockname()[1]
        print(f"listening on http://127.0.0.1:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        srv.close()  # open connections are cancelled with the loop, not waited for
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--first-byte-ms", type=float, default=20.0)
    parser.add_argument("--rate-per-conn", default="100MB")
    parser.add_argument("--rate-total", default="0")
    parser.add_argument("--etag", choices=("md5", "xxh3"), default="md5",
                        help="hash of written objects' ETags: S3's md5, or xxh3-128 (same shape, "
                             "a fraction of the CPU: for benchmarks where this server shares cores)")
    args = parser.parse_args()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
