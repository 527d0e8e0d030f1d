"""A lean HTTP/1.1 keep-alive client for the worker API (used by clients and by workers calling each other).

Why not aiohttp or httpx: on a 2-core node the client, not the network, is the bottleneck
(aiohttp tops out near 1.0-1.4 GB/s on loopback and costs ~1 ms per small request). This
transport does only what the worker API needs, as cheaply as asyncio allows:

- one ``asyncio.BufferedProtocol`` per connection, so a response body is received straight into
  the caller's buffer (``get_buffer`` hands out the unfilled part of it); the head is parsed from a
  small per-connection scratch buffer and body bytes that arrived with it are copied once;
- while a large body arrives, the socket's low-water mark (``SO_RCVLOWAT``) is 1 MiB, so the
  event loop wakes once per MiB rather than once per loopback segment (a quarter less client CPU
  on hot reads); it is lowered for the last bytes of a body, and when a body trickles in too
  slowly to reach it, and is back at 1 byte before the next response;
- a bounded pool of keep-alive connections per endpoint (LIFO, so warm connections are reused);
- a stale keep-alive connection (closed by the server while idle) is replaced once,
  transparently: every request is idempotent (GET, or a POST of an idempotent operation, or a
  whole-file PUT);
- request bodies (writes) are streamed from an ``Upload`` with a ``Content-Length``, with flow
  control (a chunk is sent when the socket took the previous ones); a worker that answers before
  the whole body was sent (an early error) gets no more of it;
- typed errors: a refused, reset or timed-out connection raises ``WorkerUnreachable`` or
  ``WorkerTimeout`` (both ``Unavailable``), so the caller can fall back to the under store, and a
  JSON error body is rebuilt into the error the worker reported.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

from depot.core.errors import (
    DepotError,
    InvalidArgument,
    Timeout,
    Unavailable,
    error_for_http_status,
    error_from_code,
)

DEFAULT_ENDPOINT = "http://127.0.0.1:7070"
MAX_HEAD_BYTES = 64 * 1024
# Bodies that do not go into a caller's buffer (JSON, errors) are held in memory: bound them so a
# broken or hostile server cannot make the client allocate without limit.
MAX_MEMORY_BODY = 256 * 1024 * 1024
_USER_AGENT = "depot-client"
# While a large body arrives, the socket reports itself readable only once this many bytes are
# queued (SO_RCVLOWAT), lowered to what is left near the end of the body: one wake-up of this
# event loop per 1 MiB instead of one per loopback segment, which on loopback the sender pays.
BODY_LOW_WATER = 1024 * 1024
# The idle timeout of a request is checked this many times per timeout.
_WATCH_PERIODS = 4
_METHODS = frozenset({"GET", "POST", "DELETE", "PUT"})
_BODY_METHODS = frozenset({"POST", "DELETE", "PUT"})
BodyChunk = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Upload:
    """A request body: ``length`` bytes that ``chunks()`` yields from the start on every call
    (a request resent on a fresh connection starts the body again)."""

    length: int
    chunks: Callable[[], AsyncIterator[BodyChunk]]


class WorkerUnreachable(Unavailable):
    """The worker could not be reached, or broke the protocol: the under store may be tried.

    ``connect_failed`` tells a worker that is down (no connection at all) from one that broke a
    single response.
    """

    connect_failed = False


class WorkerTimeout(Timeout):
    """The worker did not connect or answer in time: the under store may be tried."""

    connect_failed = False


def _connect_error(error: WorkerUnreachable | WorkerTimeout) -> WorkerUnreachable | WorkerTimeout:
    error.connect_failed = True
    return error


def _connect_failure(
    exc: OSError, label: str, connect_timeout: float
) -> WorkerUnreachable | WorkerTimeout:
    """The error for a connection to worker ``label`` that could not be made (no byte sent)."""
    if isinstance(exc, TimeoutError):
        error: WorkerUnreachable | WorkerTimeout = WorkerTimeout(
            f"worker {label} did not accept a connection within {connect_timeout:g}s"
        )
    elif isinstance(exc, ConnectionRefusedError):
        error = WorkerUnreachable(f"worker {label} refused the connection")
    elif isinstance(exc, ssl.SSLError):
        error = WorkerUnreachable(f"TLS handshake with worker {label} failed: {exc}")
    else:
        reason = exc.strerror or str(exc) or type(exc).__name__
        error = WorkerUnreachable(f"cannot connect to worker {label}: {reason}")
    return _connect_error(error)


class _StaleConnection(WorkerUnreachable):
    """A kept-alive connection was closed before any byte of the response: safe to resend."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a worker listens, parsed once from its URL."""

    scheme: str
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_endpoint(url: str) -> Endpoint:
    """Parse ``http://host:port`` (``https`` too); a bare ``host:port`` means http."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgument(f"invalid worker endpoint {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidArgument(f"invalid worker endpoint {url!r}: use http://HOST:PORT")
    if not parts.hostname:
        raise InvalidArgument(f"invalid worker endpoint {url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidArgument(f"invalid worker endpoint {url!r}: expected no path or query")
    if port is None:
        port = 443 if scheme == "https" else 80
    return Endpoint(scheme, parts.hostname, port)


def path_query(route: str, path: str) -> str:
    """``route?path=P`` with ``P`` percent-encoded completely (``/`` too), as the API expects."""
    return f"{route}?path={quote(path, safe='')}"


class Response:
    """Status, headers (lowercase names) and body of one response.

    When the request named a destination buffer and the status is 2xx, the body went there and
    ``body`` is empty; ``length`` is the number of body bytes in either case.
    """

    __slots__ = ("body", "headers", "length", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes | bytearray, length: int):
        self.status = status
        self.headers = headers
        self.body = body
        self.length = length

    def json(self) -> Any:
        try:
            return orjson.loads(self.body)  # a 10k-entry listing: 3 ms (json.loads: 7 ms)
        except ValueError:
            raise WorkerUnreachable(
                f"worker sent a malformed JSON body (HTTP {self.status})"
            ) from None


def error_from_response(response: Response, path: str | None) -> DepotError:
    """The typed error a non-2xx response stands for."""
    error: Any = None
    if response.headers.get("content-type", "").startswith("application/json") or (
        response.body[:1] == b"{"
    ):
        try:
            error = json.loads(response.body).get("error")
        except (ValueError, AttributeError):
            error = None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        message = str(error.get("message") or error["code"])
        err_path = error.get("path")
        return error_from_code(
            error["code"], message, err_path if isinstance(err_path, str) else path
        )
    return error_for_http_status(
        response.status, f"worker answered HTTP {response.status} without an error body", path
    )


def parse_response_head(head: bytes, label: str) -> tuple[int, dict[str, str], bool]:
    """The status, the headers (names in lower case) and whether the connection may be reused,
    from a response head without its final blank line."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise WorkerUnreachable(f"worker {label} sent a malformed status line: {lines[0][:80]!r}")
    status = int(parts[1])
    if status < 200:
        raise WorkerUnreachable(f"worker {label} sent an unexpected HTTP {status}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise WorkerUnreachable(f"worker {label} sent a malformed header line: {line[:80]!r}")
        headers[name.lower()] = value.strip()
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection and (
        parts[0] != "HTTP/1.0" or "keep-alive" in connection
    )
    return status, headers, keep_alive


def body_length(status: int, headers: dict[str, str], label: str) -> int:
    """The body length a response head announces (only ``Content-Length`` bodies are read)."""
    length_text = headers.get("content-length")
    if length_text is None:
        if status in (204, 304):
            return 0
        chunked = " (chunked bodies are not supported)" if "transfer-encoding" in headers else ""
        raise WorkerUnreachable(
            f"worker {label} sent HTTP {status} without Content-Length{chunked}"
        )
    if not length_text.isdigit():
        raise WorkerUnreachable(f"worker {label} sent a malformed Content-Length: {length_text!r}")
    return int(length_text)


def build_request(
    prefix: str,
    target: str,
    headers: Iterable[tuple[str, str]],
    method: str = "GET",
    body_length: int = 0,
) -> bytes:
    """A request head: ``prefix`` is the protocol, ``Host`` and ``User-Agent`` part of it."""
    if any(c in target for c in " \r\n"):
        raise InvalidArgument(f"invalid request target {target!r}")
    if method not in _METHODS:
        raise InvalidArgument(f"unsupported HTTP method {method!r}")
    lines = [f"{method} {target} ", prefix]
    if method in _BODY_METHODS:
        # Parameters are in the query; only writes carry a body.
        lines.append(f"Content-Length: {body_length}\r\n")
    for name, value in headers:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise InvalidArgument(f"invalid value for HTTP header {name}")
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    try:
        return "".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise InvalidArgument("HTTP header values must be latin-1") from None


def request_prefix(endpoint: Endpoint) -> str:
    return f"HTTP/1.1\r\nHost: {endpoint.host_header}\r\nUser-Agent: {_USER_AGENT}\r\n"


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._transport: asyncio.Transport | None = None
        self._scratch = bytearray(MAX_HEAD_BYTES)
        self._scratch_view = memoryview(self._scratch)
        self._filled = 0
        self._waiter: asyncio.Future[Response] | None = None
        self._dest: memoryview | None = None
        self._body: memoryview | None = None
        self._body_owner: bytearray | None = None
        self._body_len = 0
        self._body_filled = 0
        self._in_body = False
        self._status = 0
        self._headers: dict[str, str] = {}
        self._progress = 0
        self._error: DepotError | None = None
        self._sent = 0  # request body bytes handed to the transport (the watchdog counts them)
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._sock: Any = None  # the socket (asyncio's view of it), where marks can be set
        self._low_water = 1  # its SO_RCVLOWAT now
        self.closed = False
        self.keep_alive = True

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # asyncio callbacks -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if transport.get_extra_info("sslcontext") is None and hasattr(socket, "SO_RCVLOWAT"):
            self._sock = transport.get_extra_info("socket")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._body = None
        self._wake_drain()
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._error is not None:
            waiter.set_exception(self._error)
        elif self._progress == 0:
            reason = f" ({exc})" if exc else ""
            waiter.set_exception(
                _StaleConnection(f"worker {self._label} closed the connection{reason}")
            )
        elif self._in_body:
            waiter.set_exception(
                WorkerUnreachable(
                    f"worker {self._label} closed the connection after {self._body_filled} of "
                    f"{self._body_len} body bytes"
                )
            )
        else:
            waiter.set_exception(
                WorkerUnreachable(f"worker {self._label} closed the connection mid-response")
            )

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost reports any pending request

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._in_body:
            assert self._body is not None
            return self._body[self._body_filled :]
        if self._filled >= MAX_HEAD_BYTES:
            self._error = WorkerUnreachable(
                f"worker {self._label} sent a response head over {MAX_HEAD_BYTES} bytes"
            )
            raise self._error
        return self._scratch_view[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._progress += nbytes
        if self._in_body:
            self._body_filled += nbytes
            left = self._body_len - self._body_filled
            if left <= 0:
                self._finish()
            elif left < self._low_water:
                self._set_low_water(left)
            return
        if self._waiter is None:
            self._fail(WorkerUnreachable(f"worker {self._label} sent data without a request"))
            return
        search_from = max(0, self._filled - 3)
        self._filled += nbytes
        end = self._scratch.find(b"\r\n\r\n", search_from, self._filled)
        if end >= 0:
            try:
                self._start_body(end)
            except DepotError as exc:
                self._fail(exc)

    # response parsing --------------------------------------------------------------------------
    def _start_body(self, head_end: int) -> None:
        status, headers, keep_alive = parse_response_head(
            bytes(self._scratch_view[:head_end]), self._label
        )
        if not keep_alive:
            self.keep_alive = False
        self._status = status
        self._headers = headers
        length = body_length(status, headers, self._label)
        body_start = head_end + 4
        leftover = self._filled - body_start
        if leftover > length:
            raise WorkerUnreachable(
                f"worker {self._label} sent {leftover - length} bytes past the end of a response"
            )
        dest = self._dest
        if dest is not None and 200 <= status < 300:
            if length > len(dest):
                raise WorkerUnreachable(
                    f"worker {self._label} sent {length} bytes for a request of {len(dest)}"
                )
            body = dest[:length]
            self._body_owner = None
        elif leftover == length:
            # Small bodies (JSON, errors) usually arrive with the head: one copy, no buffer.
            self._body_owner = None
            self._body_len = length
            self._body_filled = length
            self._finish(bytes(self._scratch_view[body_start : body_start + length]))
            return
        else:
            if length > MAX_MEMORY_BODY:
                raise WorkerUnreachable(
                    f"worker {self._label} sent a {length}-byte body where at most "
                    f"{MAX_MEMORY_BODY} were expected"
                )
            self._body_owner = bytearray(length)
            body = memoryview(self._body_owner)
        if leftover:
            body[:leftover] = self._scratch_view[body_start : self._filled]
        self._body = body
        self._body_len = length
        self._body_filled = leftover
        if leftover >= length:
            self._finish()
        else:
            self._in_body = True
            left = length - leftover
            if left >= BODY_LOW_WATER // 4:  # for small bodies two more syscalls cost more
                self._set_low_water(min(BODY_LOW_WATER, left))

    def _set_low_water(self, nbytes: int) -> None:
        """Set the socket's SO_RCVLOWAT: never above the bytes still to come, or the end of a
        body would not wake the loop (lowering it wakes the loop if enough bytes wait)."""
        if self._sock is None or nbytes == self._low_water:
            return
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
        except OSError:
            # Not supported here (every segment wakes the loop, as before), or the socket is
            # gone: set no more marks, and leave the idle timeout to judge the connection.
            self._sock = None
            self._low_water = 1
            return
        self._low_water = nbytes

    def _finish(self, small_body: bytes | None = None) -> None:
        waiter = self._waiter
        if small_body is not None:
            body: bytes | bytearray = small_body
        elif self._body_owner is not None:
            body = self._body_owner
        else:
            body = b""
        response = Response(self._status, self._headers, body, self._body_len)
        self._reset()
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def _reset(self) -> None:
        if self._low_water != 1:
            self._set_low_water(1)  # the next head must wake the loop at its first byte
        self._filled = 0
        self._in_body = False
        self._dest = None
        self._body = None
        self._body_owner = None
        self._body_len = 0
        self._body_filled = 0
        self._waiter = None

    def _fail(self, error: DepotError) -> None:
        """A protocol violation: report it and drop the connection (it cannot be trusted)."""
        self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.abort()

    # used by the pool ---------------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        return (
            not self.closed
            and self.keep_alive
            and self._transport is not None
            and not self._transport.is_closing()
        )

    def abort(self) -> None:
        self.closed = True
        self._body = None
        self._in_body = False
        if self._transport is not None:
            self._transport.abort()

    async def request(
        self,
        payload: bytes,
        dest: memoryview | None,
        idle_limit: float,
        body: Upload | None = None,
    ) -> Response:
        assert self._transport is not None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Response] = loop.create_future()
        self._waiter = waiter
        self._dest = dest
        self._progress = 0
        self._sent = 0
        self._error = None
        self._transport.write(payload)
        watchdog = loop.call_later(
            idle_limit / _WATCH_PERIODS, self._watchdog, waiter, 0, loop.time(), idle_limit
        )
        try:
            if body is not None:
                await self._send_body(body, waiter)
            return await waiter
        except BaseException:
            # Cancelled or failed mid-response: the stream position is unknown and the caller's
            # buffer must not be written to any more, so this connection is done.
            self.abort()
            raise
        finally:
            watchdog.cancel()
            if self._waiter is waiter:
                self._reset()

    async def _send_body(self, body: Upload, waiter: asyncio.Future[Response]) -> None:
        """Send the body chunk by chunk, waiting while the socket is behind; stop early if the
        worker answered (or went away) first."""
        transport = self._transport
        assert transport is not None
        chunks = body.chunks()
        try:
            async for chunk in chunks:
                if waiter.done() or self.closed:
                    break
                if self._sent + len(chunk) > body.length:
                    raise InvalidArgument(
                        f"the request body is longer than its declared {body.length} bytes"
                    )
                transport.write(chunk)
                self._sent += len(chunk)
                if self._write_paused:
                    drained = asyncio.get_running_loop().create_future()
                    self._drain_waiter = drained
                    try:
                        await drained
                    finally:
                        self._drain_waiter = None
        finally:
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()
        if self._sent != body.length:
            if waiter.done() or self.closed:
                self.keep_alive = False  # the rest of the body was never sent
                return
            raise InvalidArgument(
                f"the request body ended after {self._sent} of its declared {body.length} bytes"
            )

    def _watchdog(
        self, waiter: asyncio.Future[Response], seen: int, idle_since: float, timeout: float
    ) -> None:
        """Fail the request when no byte arrived for ``timeout`` seconds.

        Checked every ``timeout / _WATCH_PERIODS``, so a connection that goes silent mid-body
        fails after about ``timeout`` of silence (a check per whole timeout would let it hang
        for up to twice that), without a clock read per received buffer.
        """
        if waiter.done() or self._waiter is not waiter:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        period = timeout / _WATCH_PERIODS
        progress = self._progress + self._sent
        if progress != seen:
            seen, idle_since = progress, now
        elif self._low_water > 1:
            # A body trickling in below the low-water mark wakes nobody: take the mark down, so
            # bytes that are waiting count as progress and only true silence times out.
            self._set_low_water(1)
        elif now - idle_since >= timeout - period / 2:
            self._fail(WorkerTimeout(f"worker {self._label} sent nothing for {timeout:g}s"))
            return
        loop.call_later(period, self._watchdog, waiter, seen, idle_since, timeout)


class ConnectionPool:
    """Keep-alive connections to one worker, at most ``max_connections`` in use at once."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        max_connections: int = 32,
        connect_timeout: float = 2.0,
        timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise InvalidArgument("max_connections must be at least 1")
        self.endpoint = endpoint
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        if ssl_context is None and endpoint.scheme == "https":
            ssl_context = ssl.create_default_context()
        self._ssl = ssl_context
        self._idle: list[_Connection] = []
        self._active: set[_Connection] = set()
        self._slots: asyncio.Semaphore | None = None
        self._prefix = request_prefix(endpoint)
        self._closed = False
        self.connects = 0  # connections opened, for tests and stats

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        label = self.endpoint.url
        conn = _Connection(label)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(
                    lambda: conn, self.endpoint.host, self.endpoint.port, ssl=self._ssl
                )
        except OSError as exc:  # TimeoutError and ssl.SSLError are OSErrors too
            raise _connect_failure(exc, label, self.connect_timeout) from None
        self.connects += 1
        return conn

    async def request(
        self,
        target: str,
        headers: Iterable[tuple[str, str]] = (),
        *,
        dest: memoryview | None = None,
        method: str = "GET",
        body: Upload | None = None,
    ) -> Response:
        """Send ``GET target`` (or ``method``) and return the response (of any status).

        With ``dest``, a 2xx body is received into it (it must be large enough for the body).
        ``method`` may be ``GET``, ``POST`` or ``DELETE`` (not ``HEAD``: its answer has no
        body). Requests carry no body (the worker API takes its parameters in the query). Send
        only idempotent operations: a stale keep-alive connection is replaced and the request
        sent again.

        ``body`` (with ``POST``/``PUT``) is sent after the head, with its ``Content-Length``. A
        refused connection raises with ``connect_failed`` set: no byte was sent.
        """
        if self._closed:
            raise Unavailable("the client was closed")
        if body is not None and method not in _BODY_METHODS:
            raise InvalidArgument(f"a {method} request takes no body")
        payload = build_request(
            self._prefix, target, headers, method, body.length if body is not None else 0
        )
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_connections)
        limit = self.timeout
        async with self._slots:
            conn: _Connection | None = None
            while self._idle:
                candidate = self._idle.pop()
                if candidate.usable:
                    conn = candidate
                    break
                candidate.abort()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                try:
                    self._active.add(conn)
                    response = await conn.request(payload, dest, limit, body)
                except _StaleConnection:
                    if not reused:
                        raise
                    self._active.discard(conn)
                    conn = await self._connect()
                    self._active.add(conn)
                    response = await conn.request(payload, dest, limit, body)
                finally:
                    self._active.discard(conn)
            except _StaleConnection as exc:
                raise WorkerUnreachable(exc.message) from None
            except OSError as exc:
                if isinstance(exc, DepotError):
                    raise
                conn.abort()
                raise WorkerUnreachable(
                    f"connection to worker {self.endpoint.url} failed: {exc}"
                ) from None
            if conn.usable and not self._closed:
                self._idle.append(conn)
            else:
                conn.abort()
            return response

    def fail_active(self, error: DepotError) -> int:
        """Fail every request in flight on this pool with ``error`` (a worker found hung: its
        connections are open but nothing will come). Returns how many were failed."""
        active = list(self._active)
        for conn in active:
            conn._fail(error)
        return len(active)

    def close(self) -> None:
        """Close idle connections; connections in use close when their request ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.abort()


def timeval(seconds: float) -> bytes:
    """``struct timeval`` for SO_RCVTIMEO / SO_SNDTIMEO."""
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


class _BlockingConnection:
    __slots__ = ("head", "head_view", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.head = bytearray(MAX_HEAD_BYTES)
        self.head_view = memoryview(self.head)


class BlockingPool:
    """Keep-alive connections to one worker for GETs sent from the caller's own thread.

    Why: a small read sent through the event loop pays two thread hand-offs (the caller to the
    loop and back), about half the time of a hot 4 KiB read on loopback. A blocking socket in the
    caller's thread pays none. Thread-safe (each request takes a connection of its own); plain
    HTTP only. Every failure closes the connection and raises ``WorkerUnreachable`` or
    ``WorkerTimeout``: the caller decides where to go next (the event loop path, which fails
    over). ``timeout`` bounds each wait for bytes, not the whole request: a worker gone silent
    is found within one to two of it (a receive ends at the timeout with what came by then).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        connect_timeout: float = 2.0,
        timeout: float = 30.0,
        max_idle: int = 16,
    ) -> None:
        if endpoint.scheme != "http":
            raise InvalidArgument(f"blocking connections are plain HTTP only, not {endpoint.url}")
        self.endpoint = endpoint
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_idle = max_idle
        self._prefix = request_prefix(endpoint)
        self._idle: list[_BlockingConnection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False
        self.connects = 0  # connections opened, for tests and stats

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def _take(self) -> _BlockingConnection | None:
        with self._lock:
            if self._pid != os.getpid():
                # A forked child must not share its parent's connections: a response would go
                # to whichever process reads first. Its copies of them are closed, not used.
                stale, self._idle = self._idle, []
                self._pid = os.getpid()
                for conn in stale:
                    conn.sock.close()
            return self._idle.pop() if self._idle else None

    def _give_back(self, conn: _BlockingConnection) -> None:
        with self._lock:
            if not self._closed and self._pid == os.getpid() and len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.sock.close()

    def _connect(self) -> _BlockingConnection:
        label = self.endpoint.url
        try:
            sock = socket.create_connection(
                (self.endpoint.host, self.endpoint.port), timeout=self.connect_timeout
            )
        except OSError as exc:
            raise _connect_failure(exc, label, self.connect_timeout) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A blocking socket with the kernel's timeouts, not Python's: a body is then received
        # with one ``MSG_WAITALL`` call instead of a poll and a receive per loopback segment
        # (a sixth less client CPU on hot reads). A timeout is an EAGAIN from the call.
        sock.settimeout(None)
        wait = timeval(self.timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, wait)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, wait)
        self.connects += 1
        return _BlockingConnection(sock)

    def get_into(
        self, target: str, headers: Iterable[tuple[str, str]], dest: memoryview
    ) -> Response:
        """Send ``GET target``; a 2xx body is received into ``dest`` (``Response.length`` says
        how much of it), any other body into memory (at most ``MAX_HEAD_BYTES``)."""
        return self._request(target, headers, dest, 0)

    def get(
        self, target: str, headers: Iterable[tuple[str, str]] = (), max_body: int = MAX_HEAD_BYTES
    ) -> Response:
        """Send ``GET target``; the body, of any status, is received into memory
        (``Response.body``). A 2xx body over ``max_body`` closes the connection and raises
        ``WorkerUnreachable``: the caller asks through the event loop instead."""
        return self._request(target, headers, None, max_body)

    def _request(
        self,
        target: str,
        headers: Iterable[tuple[str, str]],
        dest: memoryview | None,
        max_body: int,
    ) -> Response:
        if self._closed:
            raise Unavailable("the client was closed")
        payload = build_request(self._prefix, target, headers)
        conn = self._take()
        reused = conn is not None
        if conn is None:
            conn = self._connect()
        try:
            try:
                response, keep_alive = self._exchange(conn, payload, dest, max_body)
            except _StaleConnection:
                conn.sock.close()
                if not reused:
                    raise
                conn = self._connect()  # the idle one was closed by the worker: once more
                response, keep_alive = self._exchange(conn, payload, dest, max_body)
        except _StaleConnection as exc:
            conn.sock.close()
            raise WorkerUnreachable(exc.message) from None
        except (TimeoutError, BlockingIOError):  # the receive or send timeout
            conn.sock.close()
            raise WorkerTimeout(
                f"worker {self.endpoint.url} sent nothing for {self.timeout:g}s"
            ) from None
        except DepotError:
            conn.sock.close()
            raise
        except OSError as exc:
            conn.sock.close()
            raise WorkerUnreachable(
                f"connection to worker {self.endpoint.url} failed: {exc}"
            ) from None
        if keep_alive:
            self._give_back(conn)
        else:
            conn.sock.close()
        return response

    def _exchange(
        self, conn: _BlockingConnection, payload: bytes, dest: memoryview | None, max_body: int
    ) -> tuple[Response, bool]:
        label = self.endpoint.url
        sock = conn.sock
        view = conn.head_view
        sock.sendall(payload)
        filled = 0
        while True:
            got = sock.recv_into(view[filled:])
            if got == 0:
                if filled == 0:
                    raise _StaleConnection(f"worker {label} closed the connection")
                raise WorkerUnreachable(f"worker {label} closed the connection mid-response")
            end = conn.head.find(b"\r\n\r\n", max(0, filled - 3), filled + got)
            filled += got
            if end >= 0:
                break
            if filled >= MAX_HEAD_BYTES:
                raise WorkerUnreachable(
                    f"worker {label} sent a response head over {MAX_HEAD_BYTES} bytes"
                )
        status, response_headers, keep_alive = parse_response_head(bytes(view[:end]), label)
        length = body_length(status, response_headers, label)
        body_start = end + 4
        leftover = filled - body_start
        if leftover > length:
            raise WorkerUnreachable(
                f"worker {label} sent {leftover - length} bytes past the end of a response"
            )
        owner: bytearray | None = None
        if 200 <= status < 300 and dest is not None:
            if length > len(dest):
                raise WorkerUnreachable(
                    f"worker {label} sent {length} bytes for a request of {len(dest)}"
                )
            body = dest[:length]
        elif 200 <= status < 300:
            if length > max_body:
                raise WorkerUnreachable(
                    f"worker {label} sent a {length}-byte body (at most {max_body} expected)"
                )
            owner = bytearray(length)
            body = memoryview(owner)
        else:
            if length > MAX_HEAD_BYTES:
                raise WorkerUnreachable(
                    f"worker {label} sent a {length}-byte error body (at most "
                    f"{MAX_HEAD_BYTES} expected)"
                )
            owner = bytearray(length)
            body = memoryview(owner)
        body[:leftover] = view[body_start:filled]
        received = leftover
        while received < length:
            # Returns early only at the receive timeout (with what came by then), at the end of
            # the stream, or on a signal.
            got = sock.recv_into(body[received:], 0, socket.MSG_WAITALL)
            if got == 0:
                raise WorkerUnreachable(
                    f"worker {label} closed the connection after {received} of {length} body bytes"
                )
            received += got
        return Response(status, response_headers, owner if owner is not None else b"", length), (
            keep_alive
        )

    def close(self) -> None:
        """Close idle connections; connections in use close when their request ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.sock.close()
