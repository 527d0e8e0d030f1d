"""A lean HTTP/1.1 server on asyncio for the worker's API and data path.

Why not a framework: the read path needs sub-millisecond small reads and line-rate large ones on
a 2-core node, and the measured frameworks cost 3-5x more per request than a plain protocol
(see docs/benchmarks.md). This server does only what the worker needs: keep-alive, one request at
a time per connection (pipelined requests are queued), bounded heads and bodies, timeouts against
slow clients, flow-controlled streaming of large responses, and a clean 4xx for anything malformed.

Request bodies are buffered (up to ``max_body_bytes``) and handed over as ``Request.body``, except
for the requests the ``streaming(method, path)`` hook picks (whole-file writes): those need a
``Content-Length`` (411 without one, 413 over ``max_stream_bytes``) and reach the handler as
``Request.stream``, a ``RequestBody`` read chunk by chunk with backpressure (reading from the
socket pauses while the handler is behind). ``Expect: 100-continue`` is answered when the handler
first reads. A body that ends early (the client went away) raises ``ConnectionResetError`` in the
reader, so a write in progress is aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from urllib.parse import unquote

from depot.core.errors import DepotError, InvalidArgument, RequestTooLarge

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

REASONS = {
    200: "OK", 204: "No Content", 206: "Partial Content", 304: "Not Modified",
    307: "Temporary Redirect",
    400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 409: "Conflict", 411: "Length Required", 412: "Precondition Failed",
    413: "Content Too Large", 416: "Range Not Satisfiable", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
    504: "Gateway Timeout", 505: "HTTP Version Not Supported", 507: "Insufficient Storage",
}


class HttpError(Exception):
    """A protocol-level error answered before any handler runs."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Request:
    method: str
    target: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    body: bytes = b""
    keep_alive: bool = True
    # The body of a streamed request (see HttpServer's ``streaming``), else None.
    stream: RequestBody | None = None

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


# Bytes of a streamed body held for a handler that is behind: reading the socket pauses above.
STREAM_HIGH_WATER = 4 * 1024 * 1024
STREAM_LOW_WATER = 1024 * 1024
# A handler that answers before reading all of a streamed body (an early error): up to this many
# remaining bytes are read and dropped so the connection stays usable; more, and it is closed.
DISCARD_LIMIT = 8 * 1024 * 1024


class RequestTimeout(InvalidArgument):
    errno_value = 110  # ETIMEDOUT
    code = "RequestTimeout"
    http_status = 408


class RequestBody:
    """The body of a streamed request: ``length`` bytes, read in chunks as they arrive."""

    def __init__(self, proto: HttpProtocol, length: int, expect_continue: bool) -> None:
        self._proto = proto
        self.length = length
        self.received = 0
        self.consumed = 0
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.continue_pending = expect_continue and length > 0

    @property
    def complete(self) -> bool:
        """Every byte of the body has arrived (not necessarily been read)."""
        return self.received >= self.length

    def feed(self, data: bytes) -> bytes:
        """Take the body's share of ``data``; return what lies past the body's end."""
        take = min(len(data), self.length - self.received)
        if take:
            piece = data if take == len(data) else data[:take]
            self._chunks.append(piece)
            self._buffered += take
            self.received += take
            self.continue_pending = False
            self._wake()
            if self._buffered > STREAM_HIGH_WATER:
                self._proto.pause_reading()
        return data[take:]

    def fail(self, error: BaseException) -> None:
        if self._error is None and not self.complete:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        """The next chunk of the body; ``b""`` once it has all been read."""
        while not self._chunks:
            if self.consumed >= self.length:
                return b""
            if self._error is not None:
                raise self._error
            if self.continue_pending:
                self.continue_pending = False
                self._proto.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._proto.resume_reading()
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await asyncio.wait_for(waiter, self._proto.body_timeout)
            except TimeoutError:
                self._error = RequestTimeout(
                    f"no body bytes for {self._proto.body_timeout:g}s "
                    f"({self.received} of {self.length} received)"
                )
                raise self._error from None
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        self.consumed += len(chunk)
        if self._buffered < STREAM_LOW_WATER:
            self._proto.resume_reading()
        return chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            chunk = await self.read()
            if not chunk:
                return
            yield chunk

    async def read_all(self) -> bytes:
        parts = [chunk async for chunk in self]
        return b"".join(parts)


class ChunkedRequestBody(RequestBody):
    """A streamed body sent with ``Transfer-Encoding: chunked`` (only for streamed requests of a
    server built with ``chunked_streams=True``): de-chunked as it arrives; ``length`` is unknown
    (``max_length``, the limit) until the last chunk, then the decoded size."""

    def __init__(self, proto: HttpProtocol, max_length: int, expect_continue: bool) -> None:
        super().__init__(proto, max_length, expect_continue)
        self.continue_pending = expect_continue
        self._raw = bytearray()
        self._left = -1  # data bytes left in the current chunk; -1: a size line is next
        self._state = "size"  # size, data, crlf, trailer, done

    @property
    def complete(self) -> bool:
        return self._state == "done"

    def feed(self, data: bytes) -> bytes:
        raw = self._raw
        raw += data
        self.continue_pending = False
        while True:
            if self._state in ("size", "crlf", "trailer"):
                end = raw.find(b"\r\n")
                if end < 0:
                    if len(raw) > 8192:
                        self.fail(HttpError(400, "malformed chunked body"))
                        raw.clear()
                    break
                line = bytes(raw[:end])
                del raw[: end + 2]
                if self._state == "size":
                    text = line.split(b";", 1)[0].strip()
                    try:
                        size = int(text, 16)
                    except ValueError:
                        self.fail(HttpError(400, "malformed chunk size"))
                        raw.clear()
                        break
                    if size == 0:
                        self._state = "trailer"
                    elif self.received + size > self.length:
                        self.fail(RequestTooLarge(f"request body over the limit of {self.length}"))
                        raw.clear()
                        break
                    else:
                        self._left, self._state = size, "data"
                elif self._state == "crlf":
                    if line:
                        self.fail(HttpError(400, "malformed chunked body"))
                        raw.clear()
                        break
                    self._state = "size"
                elif not line:  # the end of the trailer section
                    self._state = "done"
                    self.length = self.received
                    self._wake()
                    rest = bytes(raw)
                    raw.clear()
                    return rest
            else:  # data
                if not raw:
                    break
                take = min(len(raw), self._left)
                piece = bytes(raw[:take])
                del raw[:take]
                self._left -= take
                self._chunks.append(piece)
                self._buffered += take
                self.received += take
                self._wake()
                if self._left == 0:
                    self._state = "crlf"
        if self._buffered > STREAM_HIGH_WATER:
            self._proto.pause_reading()
        return b""

    def fail(self, error: BaseException) -> None:
        if self._error is None and not self.complete:
            self._error = error
            self._wake()


Handler = Callable[[Request, "ResponseWriter"], Awaitable[None]]
# (status, message) -> (body, headers) of the answer to a request the server itself refuses.
ProtocolErrorResponder = Callable[[int, str], tuple[bytes, Iterable[tuple[str, str]]]]
JSON_HEADERS: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)


class ResponseWriter:
    """Writes one response on a connection, with flow control for large bodies."""

    __slots__ = ("_head", "_proto", "aborted", "handed_off", "head_only", "started", "status")

    def __init__(self, proto: HttpProtocol, head_only: bool) -> None:
        self._proto = proto
        self._head: bytes | None = None
        self.started = False
        self.handed_off = False
        self.aborted = False
        self.head_only = head_only
        self.status = 0

    def start(
        self, status: int, headers: Iterable[tuple[str, str]], content_length: int | None
    ) -> None:
        """Queue the status line and headers; they go out with the first body bytes.

        ``content_length=None`` sends no ``Content-Length`` and no body: for responses that
        never have one (``304 Not Modified``).
        """
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.status = status
        if content_length is None:
            self.head_only = True
        self._head = response_head(status, headers, content_length, self._proto.keep_alive)
        if self.head_only or content_length == 0:
            self._flush_head()

    def _flush_head(self) -> None:
        if self._head is not None:
            self._proto.write(self._head)
            self._head = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.head_only:
            return
        if self._head is not None:
            if len(data) <= 64 * 1024:
                self._proto.write(self._head + data)
                self._head = None
                return
            self._flush_head()
        self._proto.write(data)

    async def drain(self) -> None:
        await self._proto.drain()

    async def flush(self) -> None:
        """Wait until every byte given to ``write`` has been handed to the kernel.

        After it, the buffers that were written may be reused (see ``pending``).
        """
        await self._proto.flush()

    def pending(self) -> int:
        """Bytes given to ``write`` that the transport has not handed to the kernel yet.

        A caller that reuses its buffers must wait until their bytes are out: from Python 3.12
        the transport keeps a reference to unsent data instead of copying it.
        """
        transport = self._proto.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def send(
        self, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        self.start(status, headers, len(body))
        if body:
            self.write(body)

    def hand_off(self, take: Callable[[socket.socket, bytes], None]) -> bool:
        """Give the connection to ``take`` before any byte of this response is written: it gets
        a duplicate of the socket and the bytes received past this request's head, and answers
        this request and the later ones itself (or gives it back with ``HttpServer.adopt``).

        False when the connection cannot be handed over (bytes still queued to send, a request
        body arriving, a transport without a plain socket): the response is then written here.
        """
        if self.started:
            return False
        detached = self._proto.detach()
        if detached is None:
            return False
        self.started = True
        self.handed_off = True
        take(*detached)
        return True

    def abort(self) -> None:
        """Cut the connection: the client sees a short body, never wrong bytes."""
        self.aborted = True
        self._proto.abort()


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method_b, target_b, version_b = parts
    if not method_b or not all(c in _TOKEN_CHARS for c in method_b):
        raise HttpError(400, "malformed method")
    if version_b not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version_b.startswith(b"HTTP/"):
            raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
        raise HttpError(400, "malformed request line")
    if not target_b or any(c <= 0x20 or c >= 0x7F for c in target_b):
        raise HttpError(400, "malformed request target")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "too many headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        if line[0] in (0x20, 0x09):
            raise HttpError(400, "folded header lines are not accepted")
        name, sep, value = line.partition(b":")
        if not sep or not name or not all(c in _TOKEN_CHARS for c in name):
            raise HttpError(400, "malformed header line")
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
            raise HttpError(400, "control character in header value")
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key in ("content-length", "host", "range", "if-match"):
                if headers[key] != text:
                    raise HttpError(400, f"conflicting {key} headers")
                continue
            headers[key] = headers[key] + ", " + text
        else:
            headers[key] = text
    return method_b.decode("ascii"), target_b.decode("ascii"), version_b.decode("ascii"), headers


def _split_target(target: str) -> tuple[str, str]:
    """The decoded path and the raw query of a request target."""
    path, _, query = target.partition("?")
    if not path.startswith("/"):
        raise HttpError(400, "request target must be an absolute path")
    try:
        path = unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise HttpError(400, "request path is not valid UTF-8") from None
    return path, query


def _keeps_alive(version: str, headers: dict[str, str]) -> bool:
    conn = headers.get("connection", "").lower()
    return "close" not in conn if version == "HTTP/1.1" else "keep-alive" in conn


def bodiless_request(head: bytes) -> Request | None:
    """The request of ``head`` (its bytes up to the blank line) if it has no body, else None.

    For readers of a connection outside the event loop (worker/lanes.py): they serve only
    requests without a body and leave everything else to the loop. Raises ``HttpError`` for a
    malformed head, as the loop would.
    """
    method, target, version, headers = _parse_head(head)
    path, query = _split_target(target)
    if "transfer-encoding" in headers or headers.get("content-length", "0") != "0":
        return None
    return Request(method, target, path, query, version, headers, b"", _keeps_alive(version, headers))


def response_head(
    status: int, headers: Iterable[tuple[str, str]], content_length: int | None, keep_alive: bool
) -> bytes:
    """The status line and headers of a response, up to the blank line."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"]
    lines.extend(f"{k}: {v}\r\n" for k, v in headers)
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}\r\n")
    if not keep_alive:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


class HttpProtocol(asyncio.Protocol):
    """One client connection: parse, dispatch one request at a time, keep alive."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._paused_writing = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self.keep_alive = True
        self._body: RequestBody | None = None  # a streamed body still arriving
        self._streaming = False  # the request being handled has a streamed body
        self._detached = False  # the socket was handed over (ResponseWriter.hand_off)

    @property
    def body_timeout(self) -> float:
        return self._server.idle_timeout

    # connection lifecycle -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=1024 * 1024)
        self._server.connections.add(self)
        self._arm_timer(self._server.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server.connections.discard(self)
        self._cancel_timer()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("client closed the connection"))
        body = self._body
        if body is not None:
            body.fail(ConnectionResetError("client closed the connection before the end of the body"))
        if self._task is not None and not self._task.done() and not self._streaming:
            # A streamed write is not cancelled: a body cut short fails its reader (the upload
            # is aborted); one that arrived whole is completed and its answer dropped.
            self._task.cancel()

    def eof_received(self) -> bool:
        body = self._body
        if body is not None:  # the client stopped sending before the end of the body
            body.fail(ConnectionResetError("the request body ended early"))
        if self._task is None:
            self.close()
        else:
            self.keep_alive = False
        return True

    def _arm_timer(self, seconds: float) -> None:
        self._cancel_timer()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(seconds, self._on_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timeout(self) -> None:
        self._timer = None
        if self._detached:
            return
        if self._task is None:
            if self._buf:
                self._reply_protocol_error(HttpError(408, "request head not received in time"))
            else:
                self.close()

    def close(self) -> None:
        if self.transport is not None and not self._closed:
            self._closed = True
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self._closed = True
            self.transport.abort()

    def detach(self) -> tuple[socket.socket, bytes] | None:
        """A duplicate of the socket and the bytes received but not parsed, for a reader
        outside this loop; this transport stops reading and is closed once the handler returns
        (its descriptor only: the connection lives on in the duplicate). None if the connection
        is not in a state to be handed over."""
        transport = self.transport
        if (
            transport is None
            or self._closed
            or self._body is not None
            or self._streaming
            or transport.get_write_buffer_size()
            or transport.get_extra_info("sslcontext") is not None
        ):
            return None
        raw = transport.get_extra_info("socket")
        if raw is None or raw.type != socket.SOCK_STREAM:
            return None
        transport.pause_reading()  # (also takes the descriptor out of the loop's selector)
        try:
            sock = socket.socket(raw.family, raw.type, raw.proto, os.dup(raw.fileno()))
        except OSError:
            transport.resume_reading()
            return None
        self._reading_paused = True
        self._detached = True
        rest = bytes(self._buf)
        self._buf.clear()
        return sock, rest

    # flow control ----------------------------------------------------------------------------
    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self._closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self._closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed or self.transport is None:
            raise ConnectionResetError("connection closed")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("connection closed")
        if not self._paused_writing:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiter = waiter
        try:
            await waiter
        finally:
            self._drain_waiter = None

    async def flush(self) -> None:
        transport = self.transport
        if self._closed or transport is None:
            raise ConnectionResetError("connection closed")
        if transport.get_write_buffer_size() == 0:
            return
        high = transport.get_write_buffer_limits()[1]
        # With a high-water mark of 0 the transport pauses us until its buffer is empty.
        transport.set_write_buffer_limits(high=0)
        try:
            await self.drain()
        finally:
            if not self._closed:
                transport.set_write_buffer_limits(high=high)

    # request parsing -------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        body = self._body
        if body is not None:
            data = body.feed(data)
            if body.complete:
                self._body = None
            if not data:
                return
        self._buf += data
        if self._task is None:
            self._next_request()
        elif len(self._buf) > MAX_HEAD_BYTES + self._server.max_body_bytes and self.transport:
            self.transport.pause_reading()
            self._reading_paused = True

    def _next_request(self) -> None:
        if self._closed:
            return
        try:
            request = self._parse_request()
        except HttpError as exc:
            self._reply_protocol_error(exc)
            return
        if request is None:
            if self._buf:
                self._arm_timer(self._server.head_timeout)
            return
        self._cancel_timer()
        self._task = asyncio.get_running_loop().create_task(self._handle(request))

    def _parse_request(self) -> Request | None:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise HttpError(431, "request head too large")
            return None
        if end > MAX_HEAD_BYTES:
            raise HttpError(431, "request head too large")
        method, target, version, headers = _parse_head(bytes(buf[:end]))
        path, query = _split_target(target)
        streaming = self._server.streaming
        streamed = streaming is not None and streaming(method, path)
        body_len = 0
        chunked = False
        if "transfer-encoding" in headers:
            if not (
                streamed
                and self._server.chunked_streams
                and headers["transfer-encoding"].strip().lower() == "chunked"
                and "content-length" not in headers
            ):
                raise HttpError(501, "chunked request bodies are not supported")
            chunked = True
        if "content-length" in headers:
            text = headers["content-length"]
            if not text.isdigit() or len(text) > 18:
                raise HttpError(400, "malformed Content-Length")
            body_len = int(text)
            limit = self._server.max_stream_bytes if streamed else self._server.max_body_bytes
            if body_len > limit:
                raise HttpError(413, f"request body of {body_len} bytes is over the limit of {limit}")
        elif streamed and not chunked:
            raise HttpError(411, "Content-Length is required")
        keep_alive = _keeps_alive(version, headers)
        if streamed:
            del buf[: end + 4]
            expect = "100-continue" in headers.get("expect", "").lower() and version == "HTTP/1.1"
            stream = (
                ChunkedRequestBody(self, self._server.max_stream_bytes, expect)
                if chunked
                else RequestBody(self, body_len, expect)
            )
            if buf:
                rest = stream.feed(bytes(buf))
                buf[:] = rest
            if not stream.complete:
                self._body = stream
            self._streaming = True
            self.keep_alive = keep_alive
            return Request(method, target, path, query, version, headers, b"", keep_alive, stream)
        total = end + 4 + body_len
        if len(buf) < total:
            return None
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        self._streaming = False
        self.keep_alive = keep_alive
        return Request(method, target, path, query, version, headers, body, keep_alive)

    def _reply_protocol_error(self, exc: HttpError) -> None:
        self.keep_alive = False
        responder = self._server.protocol_error
        if responder is not None:
            body, headers = responder(exc.status, exc.message)
        else:
            code = "InvalidArgument" if exc.status != 413 else "RequestTooLarge"
            body, headers = _error_body(exc.status, code, exc.message), JSON_HEADERS
        writer = ResponseWriter(self, head_only=False)
        with contextlib.suppress(ConnectionError):
            writer.send(exc.status, body, headers)
        self._buf.clear()
        self.close()

    async def _handle(self, request: Request) -> None:
        writer = ResponseWriter(self, head_only=request.method == "HEAD")
        try:
            await self._server.handler(request, writer)
            if not writer.started:
                raise RuntimeError("handler did not answer")
        except asyncio.CancelledError:
            self.abort()
            raise
        except ConnectionError:
            self.abort()
        except Exception as exc:
            if writer.started or writer.aborted:
                if not writer.aborted:
                    log.warning("aborting response after it started: %s", exc)
                self.abort()
            else:
                err = exc if isinstance(exc, DepotError) else None
                if err is None:
                    log.exception("unhandled error for %s %s", request.method, request.target)
                status = err.http_status if err else 500
                body = error_json(err) if err else _error_body(500, "InternalError", "internal error")
                with contextlib.suppress(ConnectionError):
                    writer.send(status, body, error_headers(err))
        finally:
            stream = request.stream
            if stream is not None and not stream.complete and not self._closed:
                await self._skip_rest(stream)
            self._task = None
            self._streaming = False
        if self._detached:
            self._cancel_timer()
            self.close()
            return
        if self._closed:
            return
        if not self.keep_alive or writer.aborted:
            self.close()
            return
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        self._arm_timer(self._server.idle_timeout)
        if self._buf:
            self._next_request()


    async def _skip_rest(self, stream: RequestBody) -> None:
        """The handler answered without reading the whole body: drop a small remainder so the
        connection stays usable, else close it (its next request cannot be found)."""
        if stream.continue_pending or stream.length - stream.received > DISCARD_LIMIT:
            self.keep_alive = False
            self._body = None
            return
        try:
            while await stream.read():
                pass
        except (OSError, RequestTimeout):
            self.keep_alive = False
            self._body = None


def _error_body(status: int, code: str, message: str) -> bytes:
    import json

    return json.dumps({"error": {"code": code, "message": message, "status": status}}).encode()


def error_json(err: DepotError) -> bytes:
    import json

    return json.dumps({"error": err.to_dict()}).encode()


def error_headers(err: DepotError | None) -> list[tuple[str, str]]:
    headers = [("Content-Type", "application/json")]
    if err is not None and err.http_status == 503:
        headers.append(("Retry-After", "1"))
    return headers


class HttpServer:
    """Owns the listening socket and the open connections."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body_bytes: int = 1024 * 1024,
        idle_timeout: float = 75.0,
        head_timeout: float = 30.0,
        protocol_error: ProtocolErrorResponder | None = None,
        streaming: Callable[[str, str], bool] | None = None,
        max_stream_bytes: int = 64 * 1024**3,
        chunked_streams: bool = False,
    ) -> None:
        self.handler = handler
        # (method, path) -> whether the request's body is streamed to the handler.
        self.streaming = streaming
        self.max_stream_bytes = max_stream_bytes
        # Streamed requests may come with ``Transfer-Encoding: chunked`` (the S3 gateway: SDKs
        # send aws-chunked bodies that way); the worker API requires Content-Length.
        self.chunked_streams = chunked_streams
        # Builds (body, headers) of the answer to a malformed request, which no handler sees:
        # the S3 gateway answers those in S3 XML. Default: the worker API's JSON error.
        self.protocol_error = protocol_error
        self.max_body_bytes = max_body_bytes
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout
        self.connections: set[HttpProtocol] = set()
        self._server: asyncio.Server | None = None
        self._adopting: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpProtocol(self), host, port, reuse_address=True, backlog=1024
        )
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    def adopt(self, sock: socket.socket, received: bytes) -> None:
        """Serve a connection handed off earlier (``ResponseWriter.hand_off``) again, starting
        with ``received``: bytes read from it and not answered. Call on the server's loop."""
        if self._server is None:
            sock.close()
            return
        task = asyncio.get_running_loop().create_task(self._adopt(sock, received))
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    async def _adopt(self, sock: socket.socket, received: bytes) -> None:
        try:
            _transport, protocol = await asyncio.get_running_loop().connect_accepted_socket(
                lambda: HttpProtocol(self), sock
            )
        except (OSError, RuntimeError):
            sock.close()
            return
        if received:
            protocol.data_received(received)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for conn in list(self.connections):
            conn.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)
        self._server = None


__all__ = [
    "HttpError",
    "HttpServer",
    "InvalidArgument",
    "ProtocolErrorResponder",
    "Request",
    "RequestBody",
    "RequestTimeout",
    "RequestTooLarge",
    "ResponseWriter",
    "bodiless_request",
    "error_headers",
    "error_json",
    "response_head",
]
