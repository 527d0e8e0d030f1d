"""The S3 gateway: an app for ``depot.worker.http.HttpServer`` that serves S3 over the client.

Every request goes: parse (path-style ``/bucket/key``, query) -> authenticate (SigV4 header or
presigned URL, or anonymous when allowed) -> route on (method, level, sub-resource) to an
operation -> operation reads through ``CacheClient`` (same failover as every client: next
worker, then the under store) -> S3 headers and XML. Every failure is an S3 XML error with the
right code and status; nothing but an ``InternalError`` leaves for an unexpected exception.

Routing: the operation table names every S3 operation the gateway knows, reads and writes.
Read operations have handlers here; write operations (PutObject, CopyObject, DeleteObject(s),
multipart, CreateBucket/DeleteBucket) are plugged in by ``depot.s3.writes.install_writes``
(``register(op, handler)``) when the client can write, and answer ``NotImplemented`` (501)
otherwise.

With ``s3.redirect_reads``, a GetObject whose bytes another live worker owns is answered with a
307 to that worker's gateway instead (``depot.s3.redirects``).

The GET path is lean: bytes are received from the worker straight into pooled, pre-touched
blocks and written from those blocks to the socket (no copy in between), several blocks ahead
in flight; a block goes back to the pool only once the transport has handed its bytes to the
kernel (from Python 3.12 the transport keeps a reference to unsent data).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Protocol

from depot.client.buffers import BufferPool
from depot.client.client import version_of
from depot.client.routing import WorkerRouter
from depot.core.config import S3Config
from depot.core.errors import DepotError, NotFound, StaleVersion
from depot.core.types import FileStatus
from depot.placement.membership import WorkerInfo
from depot.s3.buckets import BucketMap, check_key, valid_bucket_name
from depot.s3.errors import S3Error, from_depot_error
from depot.s3.listing import list_keys
from depot.s3.redirects import SERVED_BY, Redirector, follows_redirects
from depot.s3.responses import (
    XML_CONTENT_TYPE,
    ListingXml,
    ObjectEntry,
    list_buckets_xml,
    location_xml,
    versioning_xml,
)
from depot.s3.semantics import (
    check_preconditions,
    http_date,
    object_headers,
    parse_range,
    s3_etag,
)
from depot.s3.sigv4 import REDIRECT_PARAM, SignedRequest, SigV4Verifier, parse_query
from depot.worker.http import Request, ResponseWriter

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_BLOCK = 4 * MiB
DEFAULT_WINDOW = 4
KNOWN_METHODS = ("GET", "HEAD", "PUT", "POST", "DELETE")
# Versions of recently read objects remembered for speculative small reads (see _speculate).
RECENT_VERSIONS = 4096

# Query parameters that name a sub-resource: a request with one is a different operation.
SUBRESOURCES = frozenset({
    "accelerate", "acl", "analytics", "attributes", "cors", "delete", "encryption",
    "intelligent-tiering", "inventory", "legal-hold", "lifecycle", "location", "logging",
    "metrics", "notification", "object-lock", "ownershipControls", "policy", "policyStatus",
    "publicAccessBlock", "replication", "requestPayment", "restore", "retention", "select",
    "session", "tagging", "torrent", "uploadId", "uploads", "versioning", "versions", "website",
})

# (method, level, sub-resource) -> operation. Level: "service" (no bucket), "bucket", "object".
OPERATIONS: dict[tuple[str, str, str | None], str] = {
    ("GET", "service", None): "ListBuckets",
    ("GET", "bucket", None): "ListObjects",
    ("HEAD", "bucket", None): "HeadBucket",
    ("GET", "bucket", "location"): "GetBucketLocation",
    ("GET", "bucket", "versioning"): "GetBucketVersioning",
    ("GET", "object", None): "GetObject",
    ("HEAD", "object", None): "HeadObject",
    # write operations: handled once depot.s3.writes registers them (a client that can write)
    ("PUT", "bucket", None): "CreateBucket",
    ("DELETE", "bucket", None): "DeleteBucket",
    ("POST", "bucket", "delete"): "DeleteObjects",
    ("GET", "bucket", "uploads"): "ListMultipartUploads",
    ("PUT", "object", None): "PutObject",  # CopyObject with x-amz-copy-source
    ("DELETE", "object", None): "DeleteObject",
    ("POST", "object", "uploads"): "CreateMultipartUpload",
    ("PUT", "object", "uploadId"): "UploadPart",  # UploadPartCopy with x-amz-copy-source
    ("POST", "object", "uploadId"): "CompleteMultipartUpload",
    ("DELETE", "object", "uploadId"): "AbortMultipartUpload",
    ("GET", "object", "uploadId"): "ListParts",
}
# What PutObject and UploadPart are when they carry x-amz-copy-source (for metrics and errors).
COPY_OPERATIONS = {"PutObject": "CopyObject", "UploadPart": "UploadPartCopy"}

RESPONSE_OVERRIDES = {
    "response-content-type": "Content-Type",
    "response-content-language": "Content-Language",
    "response-expires": "Expires",
    "response-cache-control": "Cache-Control",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
}


class ObjectReader(Protocol):
    """What the gateway reads through: ``CacheClient`` (any worker, with its failover).

    A worker that runs the gateway in its own process may pass a reader that short-circuits
    the HTTP hop to itself (same calls, same errors).
    """

    @property
    def endpoint(self) -> str: ...

    async def stat(self, path: str, *, attributes: bool = False) -> FileStatus: ...

    async def list(self, path: str) -> list[FileStatus]: ...

    async def read_range_into(
        self, path: str, start: int, end: int, out: memoryview, *, version: str | None = None
    ) -> int: ...


# A streamed write body up to this size may come without x-amz-content-sha256 (read first).
SMALL_SIGNED_BODY = 1024 * 1024


class BodyReader(Protocol):
    async def read(self) -> bytes: ...


class Replay:
    """A body already read, served again to a handler that reads a ``RequestBody``."""

    def __init__(self, body: bytes) -> None:
        self.length = len(body)
        self._body: bytes | None = body

    async def read(self) -> bytes:
        body, self._body = self._body, None
        return body or b""



@dataclass(slots=True)
class _Read:
    """A block read in flight: into ``buf``, bytes ``[lo, hi)`` of one version."""

    fut: asyncio.Future[int]
    buf: bytearray
    lo: int
    hi: int
    version: str
    used: bool = False


@dataclass(slots=True)
class S3Request:
    """One request, parsed once."""

    http: Request
    writer: ResponseWriter
    request_id: str
    bucket: str
    key: str
    params: dict[str, str]
    principal: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    # What the signature check learnt (aws-chunked bodies chain their chunk signatures from it).
    signed: SignedRequest | None = None
    # A streamed body read before its signature could be checked (see _parse).
    replay: bytes | None = None

    def body_reader(self) -> BodyReader | None:
        """The request body, read chunk by chunk (``RequestBody`` or a replay of it)."""
        if self.replay is not None:
            return Replay(self.replay)
        return self.http.stream

    @property
    def resource(self) -> str:
        return self.http.path


Operation = Callable[[S3Request], Awaitable[None]]


def encode_token(last: str) -> str:
    return base64.urlsafe_b64encode(b"1\x00" + last.encode("utf-8")).decode("ascii")


def decode_token(token: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii") + b"=" * (-len(token) % 4))
        if not raw.startswith(b"1\x00"):
            raise ValueError
        return raw[2:].decode("utf-8")
    except (ValueError, binascii.Error, UnicodeError):
        raise S3Error(
            "InvalidArgument",
            "The continuation token provided is incorrect",
            ArgumentName="continuation-token",
        ) from None


def _max_keys(params: Mapping[str, str], cap: int) -> int:
    text = params.get("max-keys")
    if text is None:
        return cap
    if not text.isdigit() or len(text) > 10:
        raise S3Error(
            "InvalidArgument",
            "Provided max-keys not an integer or within integer range",
            ArgumentName="max-keys",
            ArgumentValue=text[:40],
        )
    return min(int(text), cap)


class S3Gateway:
    """The S3 app: ``HttpServer(S3Gateway(client, settings))``."""

    def __init__(
        self,
        client: ObjectReader,
        settings: S3Config,
        *,
        credentials: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        block_size: int = DEFAULT_BLOCK,
        window: int = DEFAULT_WINDOW,
        max_buffers: int = 64,
    ) -> None:
        self.client = client
        self.settings = settings
        self.buckets = BucketMap(settings.bucket_mode, settings.buckets)
        self.verifier = SigV4Verifier(
            credentials or {},
            anonymous=settings.anonymous,
            clock_skew=settings.clock_skew,
            clock=clock,
        )
        self.region = settings.region
        self.block_size = block_size
        self.window = max(1, window)
        self.pool = BufferPool(block_size, max_buffers)
        self.handlers: dict[str, Operation] = {
            "ListBuckets": self.list_buckets,
            "ListObjects": self.list_objects,
            "HeadBucket": self.head_bucket,
            "GetBucketLocation": self.get_bucket_location,
            "GetBucketVersioning": self.get_bucket_versioning,
            "GetObject": self.get_object,
            "HeadObject": self.get_object,
        }
        self._recent: dict[str, FileStatus] = {}
        self.inflight = 0
        self.max_inflight = settings.max_inflight
        # For metrics (``stats``): requests by operation, error answers by S3 code. Both are
        # keyed by fixed names (OPERATIONS, S3Error codes), never by anything a client chose.
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.started_at = time.time()
        self.host_id = base64.b64encode(os.urandom(24)).decode("ascii")
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "big") << 24)
        self._date_sec = -1
        self._date = ""
        # s3.redirect_reads: GETs owned by another worker are answered 307 (depot.s3.redirects).
        self.redirector: Redirector | None = None
        self.served_by: str | None = None
        if settings.redirect_reads:
            router = getattr(client, "router", None)
            if isinstance(router, WorkerRouter):
                self.redirector = Redirector(
                    router, credentials or {}, settings.region, clock=clock
                )
                self.served_by = client.endpoint
            else:
                log.warning("s3.redirect_reads: this gateway's reader routes nothing; "
                            "reads are served here")

    def stats(self) -> dict[str, Any]:
        """Counters of this gateway (the worker's metrics export them)."""
        return {
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "redirects": self.redirector.sent if self.redirector is not None else 0,
            "inflight": self.inflight,
        }

    def advertise(self, endpoint: str) -> None:
        """This gateway's own URL (as other workers' gateways see it in membership)."""
        if self.redirector is not None:
            self.redirector.endpoint = endpoint
            self.served_by = endpoint

    def register(self, operation: str, handler: Operation) -> None:
        """Serve ``operation`` (a name of ``OPERATIONS``) with ``handler``."""
        if operation not in OPERATIONS.values():
            raise ValueError(f"unknown S3 operation {operation!r}")
        self.handlers[operation] = handler

    # request entry --------------------------------------------------------------------------------
    def _date_header(self) -> str:
        now = int(time.time())
        if now != self._date_sec:
            self._date_sec = now
            self._date = formatdate(now, usegmt=True)
        return self._date

    def _base_headers(self, request_id: str) -> list[tuple[str, str]]:
        return [
            ("x-amz-request-id", request_id),
            ("x-amz-id-2", self.host_id),
            ("Date", self._date_header()),
            ("Server", "depot"),
        ]

    async def __call__(self, request: Request, writer: ResponseWriter) -> None:
        request_id = f"{next(self._ids) & 0xFFFFFFFFFFFFFFFF:016X}"
        self.inflight += 1
        ctx: S3Request | None = None
        try:
            if self.inflight > self.max_inflight:
                raise S3Error("SlowDown", headers=[("Retry-After", "1")])
            ctx = await self._parse(request, writer, request_id)
            await self._dispatch(ctx)
        except S3Error as err:
            self._send_error(request, writer, request_id, err)
        except DepotError as exc:
            bucket = ctx.bucket if ctx is not None else None
            key = ctx.key if ctx is not None else None
            mapped = from_depot_error(exc, bucket, key)
            if mapped.code == "InternalError":
                log.warning("S3 %s %s failed: %s", request.method, request.path, exc)
            self._send_error(request, writer, request_id, mapped)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("S3 %s %s: unexpected error", request.method, request.target)
            self._send_error(request, writer, request_id, S3Error("InternalError"))
        finally:
            self.inflight -= 1

    async def _parse(self, request: Request, writer: ResponseWriter, request_id: str) -> S3Request:
        pairs = parse_query(request.query)
        stream = request.stream
        replay: bytes | None = None
        if (
            stream is not None
            and "authorization" in request.headers
            and "x-amz-content-sha256" not in request.headers
            and stream.length <= SMALL_SIGNED_BODY
        ):
            # A signed write without x-amz-content-sha256 is signed over its body's hash: read
            # the (small) body first. Larger ones must send the header (MissingSecurityHeader).
            replay = request.body = await stream.read_all()
        params: dict[str, str] = {}
        for name, value in pairs:
            params.setdefault(name, value)
        path = request.path
        bucket, _, key = path[1:].partition("/")
        ctx = S3Request(request, writer, request_id, bucket, key, params)
        raw_path = request.target.partition("?")[0]
        signed = SignedRequest(
            request.method, raw_path, path, request.query, pairs, request.headers, request.body,
            streamed=stream is not None and replay is None,
        )
        ctx.principal = self.verifier.verify(signed)
        ctx.signed = signed
        ctx.replay = replay
        return ctx

    async def _dispatch(self, ctx: S3Request) -> None:
        method = ctx.http.method
        if method not in KNOWN_METHODS:
            raise S3Error(
                "MethodNotAllowed",
                headers=[("Allow", ", ".join(KNOWN_METHODS))],
                Method=method,
                ResourceType="OBJECT" if ctx.key else ("BUCKET" if ctx.bucket else "SERVICE"),
            )
        level = "object" if ctx.key else ("bucket" if ctx.bucket else "service")
        sub = next((name for name in ctx.params if name in SUBRESOURCES), None)
        operation = OPERATIONS.get((method, level, sub))
        if operation is None:
            what = f"?{sub}" if sub else ""
            raise S3Error(
                "NotImplemented",
                f"{method} on a {level}{what} is not implemented by depot's S3 gateway",
            )
        handler = self.handlers.get(operation)
        if "x-amz-copy-source" in ctx.http.headers:
            operation = COPY_OPERATIONS.get(operation, operation)
        self.requests[operation] += 1
        if handler is None:
            raise S3Error(
                "NotImplemented",
                f"{operation} is not implemented: this gateway's client cannot write",
            )
        await handler(ctx)

    def _send_error(
        self, request: Request, writer: ResponseWriter, request_id: str, err: S3Error
    ) -> None:
        if err.status >= 400:  # not 304 Not Modified, not a 307 redirect
            self.errors[err.code] += 1
        if writer.started:
            # Headers are out: the only honest signal left is a cut connection.
            log.warning("S3 %s %s failed mid-response: %s", request.method, request.path, err)
            writer.abort()
            return
        headers = self._base_headers(request_id)
        headers.extend(err.headers)
        if err.status == 304:
            writer.start(304, headers, None)
            return
        headers.append(XML_CONTENT_TYPE)
        body = err.to_xml(request.path, request_id, self.host_id)
        with contextlib.suppress(ConnectionError):
            writer.send(err.status, body, headers)

    def _send_xml(self, ctx: S3Request, body: bytes) -> None:
        headers = self._base_headers(ctx.request_id)
        headers.append(XML_CONTENT_TYPE)
        ctx.writer.send(200, body, headers)

    # buckets ------------------------------------------------------------------------------------------
    async def _bucket_root(self, bucket: str) -> str:
        """The namespace path of an existing bucket, else ``NoSuchBucket``."""
        root = self.buckets.root(bucket)
        try:
            status = await self.client.stat(root)
        except NotFound:
            raise S3Error("NoSuchBucket", BucketName=bucket) from None
        if not status.is_dir:
            raise S3Error("NoSuchBucket", BucketName=bucket)
        return root

    async def list_buckets(self, ctx: S3Request) -> None:
        found: list[tuple[str, float]] = []
        if self.buckets.mode == "mapped":
            for name in sorted(self.buckets.mapped):
                found.append((name, self.started_at))
        else:
            for entry in await self.client.list("/"):
                name = entry.path.rsplit("/", 1)[-1]
                if entry.is_dir and valid_bucket_name(name):
                    found.append((name, entry.mtime or self.started_at))
        self._send_xml(ctx, list_buckets_xml(found, ctx.principal or "anonymous"))

    async def head_bucket(self, ctx: S3Request) -> None:
        await self._bucket_root(ctx.bucket)
        headers = self._base_headers(ctx.request_id)
        headers.append(("x-amz-bucket-region", self.region))
        ctx.writer.start(200, headers, 0)

    async def get_bucket_location(self, ctx: S3Request) -> None:
        await self._bucket_root(ctx.bucket)
        self._send_xml(ctx, location_xml(self.region))

    async def get_bucket_versioning(self, ctx: S3Request) -> None:
        await self._bucket_root(ctx.bucket)
        self._send_xml(ctx, versioning_xml())

    # listings -----------------------------------------------------------------------------------------
    async def list_objects(self, ctx: S3Request) -> None:
        params = ctx.params
        list_type = params.get("list-type")
        if list_type not in (None, "2"):
            raise S3Error("InvalidArgument", "Invalid List Type specified in Request",
                          ArgumentName="list-type", ArgumentValue=list_type[:40])
        v2 = list_type == "2"
        encoding = params.get("encoding-type")
        if encoding is not None and encoding != "url":
            raise S3Error("InvalidArgument", "Invalid Encoding Method specified in Request",
                          ArgumentName="encoding-type", ArgumentValue=encoding[:40])
        max_keys = _max_keys(params, self.settings.max_keys)
        prefix = params.get("prefix", "")
        delimiter = params.get("delimiter") or None
        token = params.get("continuation-token") if v2 else None
        start_after = params.get("start-after") if v2 else None
        marker = params.get("marker") if not v2 else None
        if token is not None:
            after: str | None = decode_token(token)
        else:
            after = (start_after if v2 else marker) or None
        root = await self._bucket_root(ctx.bucket)
        listing = await list_keys(
            self.client.list, root, prefix=prefix, delimiter=delimiter, after=after,
            limit=max_keys,
        )
        doc = ListingXml(
            bucket=ctx.bucket,
            prefix=prefix,
            delimiter=delimiter,
            max_keys=max_keys,
            encoding_url=encoding == "url",
            contents=[
                ObjectEntry(key, status.size, status.mtime, s3_etag(status))
                for key, status in listing.objects
            ],
            prefixes=listing.prefixes,
            truncated=listing.truncated,
            v2=v2,
        )
        if v2:
            doc.continuation_token = token
            doc.start_after = start_after
            doc.fetch_owner = params.get("fetch-owner") == "true"
            if listing.truncated and listing.last is not None:
                doc.next_continuation_token = encode_token(listing.last)
        else:
            doc.marker = marker or ""
            if listing.truncated and delimiter is not None:
                doc.next_marker = listing.last
        self._send_xml(ctx, doc.render())

    # objects ------------------------------------------------------------------------------------------
    async def get_object(self, ctx: S3Request) -> None:
        root = self.buckets.root(ctx.bucket)
        canonical = check_key(ctx.key, ctx.bucket)
        path = canonical if root == "/" else root + canonical
        params = ctx.params
        version_id = params.get("versionId")
        if version_id is not None and version_id != "null":
            raise S3Error("InvalidArgument", "Invalid version id specified",
                          ArgumentName="versionId", ArgumentValue=version_id[:80])
        overrides = [(h, params[p]) for p, h in RESPONSE_OVERRIDES.items() if p in params]
        if overrides and ctx.principal is None:
            raise S3Error(
                "InvalidRequest",
                "Request specific response headers cannot be used for anonymous GET requests.",
            )
        status: FileStatus | None = None
        redirector = self.redirector
        if (
            redirector is not None
            and not ctx.writer.head_only
            and REDIRECT_PARAM not in params
            and follows_redirects(ctx.http.headers)
        ):
            cached = self._recent.get(path)
            # An object read here last time (by its last known size) is served on the usual
            # path (its stat beside a speculative read); others are stat'ed first to be routed.
            if cached is None or self._owner_of(ctx, redirector, path, cached) is not None:
                status = await self._stat_object(ctx, root, path)
                self._remember(path, status)
                self._redirect(ctx, redirector, path, status)
        for attempt in (0, 1):
            try:
                await self._get_object(ctx, root, path, overrides, status)
                return
            except StaleVersion:
                # The object changed between its stat and its first bytes: serve the new one.
                if attempt or ctx.writer.started:
                    raise
                status = None

    def _owner_of(
        self, ctx: S3Request, redirector: Redirector, path: str, status: FileStatus
    ) -> WorkerInfo | None:
        """The worker whose gateway should serve this GET of an object of ``status``, if not us."""
        headers_in = ctx.http.headers
        size = status.size
        part = ctx.params.get("partNumber")
        if part is not None:
            if part != "1" or "range" in headers_in:
                return None  # the error is answered here
            start, end = 0, size
        else:
            try:
                rng = parse_range(headers_in.get("range"), size)
            except S3Error:
                return None
            start, end = (0, size) if rng is None else rng
        return redirector.owner(path, start, end)

    def _redirect(
        self, ctx: S3Request, redirector: Redirector, path: str, status: FileStatus
    ) -> None:
        """Raise a 307 to the gateway of the worker that owns the bytes asked for, if any."""
        owner = self._owner_of(ctx, redirector, path, status)
        if owner is None:
            return
        location = redirector.location(
            owner.s3_endpoint, ctx.http.path, parse_query(ctx.http.query), ctx.principal
        )
        if location is None:
            return
        redirector.sent += 1
        headers = [("Location", location)]
        if self.served_by:
            headers.append((SERVED_BY, self.served_by))
        raise S3Error(
            "TemporaryRedirect", headers=headers, Endpoint=location.split("/", 3)[2],
            Bucket=ctx.bucket,
        )

    async def _stat_object(self, ctx: S3Request, root: str, path: str) -> FileStatus:
        try:
            status = await self.client.stat(path, attributes=True)
        except NotFound:
            await self._bucket_root(ctx.bucket)  # NoSuchBucket before NoSuchKey
            raise S3Error("NoSuchKey", Key=ctx.key, BucketName=ctx.bucket) from None
        if status.is_dir:
            raise S3Error("NoSuchKey", Key=ctx.key, BucketName=ctx.bucket)
        return status

    def _speculate(self, ctx: S3Request, path: str) -> _Read | None:
        """Start reading a small object pinned to the version seen last, beside its stat.

        The stat still decides: its answer is fresh (the worker's metadata policy), and the bytes
        are used only if it names the same version and the same range, so a hot small GET costs
        one round trip to the worker instead of two. Skipped when the answer is likely a 304.
        """
        cached = self._recent.get(path)
        headers_in = ctx.http.headers
        if (
            cached is None
            or ctx.writer.head_only
            or "if-none-match" in headers_in
            or "if-modified-since" in headers_in
            or "partNumber" in ctx.params
        ):
            return None
        try:
            rng = parse_range(headers_in.get("range"), cached.size)
        except S3Error:
            return None
        lo, hi = rng if rng is not None else (0, cached.size)
        if not 0 < hi - lo <= self.block_size:
            return None
        buf = self.pool.take()
        version = version_of(cached)
        fut = asyncio.ensure_future(
            self.client.read_range_into(path, lo, hi, memoryview(buf)[: hi - lo], version=version)
        )
        return _Read(fut, buf, lo, hi, version)

    def _remember(self, path: str, status: FileStatus) -> None:
        recent = self._recent
        recent.pop(path, None)
        recent[path] = status
        if len(recent) > RECENT_VERSIONS:
            del recent[next(iter(recent))]

    def _discard(self, read: _Read) -> None:
        """Let a speculative read finish on its own; its block goes back to the pool after."""

        def done(fut: asyncio.Future[int]) -> None:
            if not fut.cancelled() and fut.exception() is None:
                self.pool.give(read.buf)

        read.fut.add_done_callback(done)

    async def _get_object(
        self,
        ctx: S3Request,
        root: str,
        path: str,
        overrides: list[tuple[str, str]],
        status: FileStatus | None = None,
    ) -> None:
        """Serve the object; ``status``: its stat, when already taken (a redirect check)."""
        spec = None
        if status is None:
            spec = self._speculate(ctx, path)
            try:
                status = await self._stat_object(ctx, root, path)
            except BaseException:
                if spec is not None:
                    self._discard(spec)
                raise
            self._remember(path, status)
        try:
            await self._serve_object(ctx, path, status, overrides, spec)
        finally:
            if spec is not None and not spec.used:
                self._discard(spec)  # a 304, a 412, a bad range: the bytes are not needed

    async def _serve_object(
        self,
        ctx: S3Request,
        path: str,
        status: FileStatus,
        overrides: list[tuple[str, str]],
        spec: _Read | None,
    ) -> None:
        headers_in = ctx.http.headers
        size = status.size
        etag = s3_etag(status)
        headers = self._base_headers(ctx.request_id)
        if self.served_by:
            headers.append((SERVED_BY, self.served_by))
        headers.append(("Last-Modified", http_date(status.mtime)))
        headers.append(("ETag", etag))
        outcome = check_preconditions(headers_in, etag, status.mtime)
        if outcome == 304:
            ctx.writer.start(304, headers, None)
            return
        if outcome == 412:
            condition = "If-Match" if "if-match" in headers_in else "If-Unmodified-Since"
            raise S3Error("PreconditionFailed", Condition=condition)
        part = ctx.params.get("partNumber")
        if part is not None:
            if "range" in headers_in:
                raise S3Error("InvalidRequest",
                              "Cannot specify both Range header and partNumber query parameter")
            if part != "1" or size == 0:
                if not part.isdigit() or not 1 <= int(part) <= 10000:
                    raise S3Error("InvalidArgument", "Part number must be an integer between 1 "
                                  "and 10000, inclusive", ArgumentName="partNumber")
                raise S3Error("InvalidPartNumber")
            rng: tuple[int, int] | None = (0, size)
            headers.append(("x-amz-mp-parts-count", "1"))
        else:
            rng = parse_range(headers_in.get("range"), size)
        code = 200 if rng is None else 206
        start, end = (0, size) if rng is None else rng
        headers.append(("Accept-Ranges", "bytes"))
        if code == 206:
            headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
        if overrides:
            names = frozenset(h for h, _ in overrides)
            headers.extend(object_headers(status.attributes, ctx.key, names))
            headers.extend((h, v.replace("\r", " ").replace("\n", " ")) for h, v in overrides)
        else:
            headers.extend(object_headers(status.attributes, ctx.key))
        version = version_of(status)
        first = None
        if spec is not None:
            if spec.version == version and (spec.lo, spec.hi) == (start, end):
                first = spec
            else:
                self._discard(spec)
            spec.used = True
        await self._send_range(ctx.writer, path, version, start, end, code, headers, first)

    async def _send_range(
        self,
        writer: ResponseWriter,
        path: str,
        version: str,
        start: int,
        end: int,
        code: int,
        headers: list[tuple[str, str]],
        first: _Read | None = None,
    ) -> None:
        """Stream ``[start, end)`` of ``path`` (pinned to ``version``) as the response body.

        The first block is in hand before the head goes out, so a failure there still gets a
        proper status; a failure later can only cut the connection (the client sees a short
        body, never wrong bytes).
        """
        length = end - start
        if writer.head_only or length == 0:
            if first is not None:
                self._discard(first)
            writer.start(code, headers, length)
            return
        block = self.block_size
        bounds: deque[tuple[int, int]] = deque()
        reads: deque[tuple[asyncio.Future[int], bytearray, int, int]] = deque()
        pos = start
        if first is not None:
            reads.append((first.fut, first.buf, first.lo, first.hi))
            pos = first.hi
        while pos < end:
            stop = min(end, (pos // block + 1) * block)
            bounds.append((pos, stop))
            pos = stop
        held: deque[tuple[int, bytearray]] = deque()  # (end mark in the body, buffer)
        read_into = self.client.read_range_into
        pool = self.pool

        def launch() -> None:
            lo, hi = bounds.popleft()
            buf = pool.take()
            fut = asyncio.ensure_future(
                read_into(path, lo, hi, memoryview(buf)[: hi - lo], version=version)
            )
            reads.append((fut, buf, lo, hi))

        written = 0
        ok = False
        try:
            while bounds and len(reads) < self.window:
                launch()
            while reads:
                fut, buf, lo, hi = reads.popleft()
                count = await fut
                if count != hi - lo:
                    raise StaleVersion(
                        f"object is shorter than its size ({lo + count} of {end} bytes)", path
                    )
                if bounds:
                    launch()
                if not writer.started:
                    writer.start(code, headers, length)
                writer.write(memoryview(buf)[:count])
                written += count
                held.append((written, buf))
                if reads:
                    await writer.drain()
                    flushed = written - writer.pending()
                    while held and held[0][0] <= flushed:
                        pool.give(held.popleft()[1])
            await writer.flush()
            ok = True
        finally:
            if reads:
                for fut, _, _, _ in reads:
                    fut.cancel()
                for fut, _, _, _ in reads:
                    with contextlib.suppress(BaseException):
                        await fut
            if ok:
                for _, buf in held:
                    pool.give(buf)
