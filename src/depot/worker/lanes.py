"""Hot lanes: connections that read cached pages, each served by a thread of its own.

Why: the event loop sends every response from one core. Per byte, a hot read costs a copy out
of the page cache, the block checksums and the copy into the socket, and on a 2-core node one
core of that reaches about 0.6 of a loopback stream. A thread per connection that reads, checks
and sends with blocking calls (which release the GIL while they copy) puts the second core to
work, as a bare threaded server does (docs/benchmarks.md, "The ceiling of a verified hot
stream").

How: when the loop serves a large read whose pages are all cached, it hands the connection (a
duplicate of its socket, and the bytes received past the request) to a lane, if one is free. The
lane's thread answers that read and every next request on the connection that it can answer
alone: a ``GET /api/v1/read`` whose file status is cached and fresh and whose pages are all
stored (``LaneHost.prepare_now``). Anything else (a miss, a stat, a write, an error to report, a
malformed head, a slow head) goes back to the loop with the connection (``HttpServer.adopt``),
and the thread ends. Pages are read from their files with the same verified reader short-circuit
clients use (``PageFiles``): a page file is never rewritten in place, so a page evicted while it
is read is still read whole, and one that is gone or damaged is read through the loop's read
path instead (``LaneHost.read_on_loop``), which also drops a damaged page. A page the store's
memory tier holds is sent from there, with no read or check of its file; a page read whole from
its file is read into a buffer of its own and offered to the tier. The hits, eviction touches,
admissions and request times of each request are posted to the loop, without waiting for it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from depot.core.buffers import alloc_result
from depot.core.transport import timeval
from depot.core.types import PageId
from depot.pagestore.base import Buffer, PageStore
from depot.pagestore.direct import BLOCK_SIZE, CorruptPage, PageFiles
from depot.worker.http import MAX_HEAD_BYTES, HttpError, Request, bodiless_request

log = logging.getLogger(__name__)

#: Reads of at least this many bytes move their connection to a lane: below it, the loop's
#: per-request cost is what matters, not the per-byte one.
LANE_MIN_BYTES = 1024 * 1024
#: Seconds a lane waits for its connection's next request before giving the connection back.
LANE_IDLE = 1.0
#: Reads lanes served are accounted on the loop this long after the first of a batch.
ACCOUNT_DELAY = 0.05


@dataclass(slots=True)
class LanePart:
    """Bytes ``[lo, hi)`` of a stored page of ``length`` bytes."""

    page: PageId
    length: int
    lo: int
    hi: int


@dataclass(slots=True)
class LaneRead:
    """A read a lane answers alone: the response head and the page parts of its body."""

    head: bytes
    parts: list[LanePart]
    length: int
    keep_alive: bool
    # What the host needs to read a part through the loop, and to account the request.
    context: Any = None
    # Planned by the loop's read path (the read that moved the connection to a lane).
    planned_on_loop: bool = False


class LaneHost(Protocol):
    """What lanes need from the worker's routes."""

    def prepare_now(self, request: Request) -> LaneRead | None:
        """The read ``request`` asks for, if a lane can answer it alone (any thread)."""

    def read_on_loop(self, read: LaneRead, part: LanePart, out: memoryview) -> Awaitable[None]:
        """Fill ``out`` with ``part`` through the loop's read path (a page gone or damaged)."""

    def lane_served(self, read: LaneRead, seconds: float, hits: list[LanePart]) -> None:
        """Account a read a lane answered, ``hits`` the parts read from page files (called on
        the loop)."""


@dataclass(slots=True)
class LaneStats:
    handed: int = 0  # connections handed to a lane
    requests: int = 0  # reads lanes answered
    bytes: int = 0
    handed_back: int = 0  # connections given back to the loop
    from_loop: int = 0  # parts read through the loop (page gone or damaged)
    from_memory: int = 0  # parts sent from the page store's memory tier

    def to_dict(self, active: int, lanes: int) -> dict[str, int]:
        return {
            "lanes": lanes,
            "active": active,
            "connections": self.handed,
            "requests": self.requests,
            "bytes": self.bytes,
            "handed_back": self.handed_back,
            "parts_from_loop": self.from_loop,
            "parts_from_memory": self.from_memory,
        }


@dataclass(slots=True)
class _Served:
    """A read a lane answered, to account on the loop."""

    read: LaneRead
    seconds: float
    hits: list[LanePart]  # the parts read from page files or the memory tier
    from_memory: int
    # Pages read whole from their files, offered to the memory tier.
    admissions: list[tuple[Callable[[Buffer], bool], Buffer]]


@dataclass(slots=True, eq=False)
class _Lane:
    sock: socket.socket
    received: bytearray
    thread: threading.Thread | None = None
    # The partly covered blocks at a range's edges are checked here (2 blocks).
    scratch: memoryview = field(default_factory=lambda: memoryview(bytearray(2 * BLOCK_SIZE)))


class HotLanes:
    """Up to ``count`` connections served by threads of their own (see the module's text)."""

    def __init__(
        self,
        host: LaneHost,
        files: PageFiles,
        adopt: Callable[[socket.socket, bytes], None],
        *,
        count: int,
        page_size: int,
        idle_timeout: float,
        head_timeout: float,
        send_timeout: float = 60.0,
        senders: int | None = None,
        pages: PageStore | None = None,
    ) -> None:
        self.host = host
        self.files = files
        # The store whose memory tier lanes send from and fill (None: page files only).
        self.pages = pages
        self.count = count
        self.page_size = page_size
        self.idle_timeout = idle_timeout
        self.head_timeout = head_timeout
        self.send_timeout = send_timeout
        # A connection that sends no request for this long goes back to the loop.
        self.lane_idle = min(idle_timeout, LANE_IDLE)
        self.stats = LaneStats()
        self._adopt = adopt
        self._lock = threading.Lock()
        # Reads sent at once: more senders than cores only take turns at the GIL and the CPU.
        self.senders = max(1, min(count, senders or os.cpu_count() or 1))
        self._sending = threading.BoundedSemaphore(self.senders)
        self._reserved = 0
        self._lanes: set[_Lane] = set()
        # Reads served and not accounted yet (on the loop, ``flush_accounts``).
        self._served_reads: collections.deque[_Served] = collections.deque()
        self._account_due = False
        # Page buffers, touched already: one per read being sent at most, kept for the next.
        self._buffers: list[memoryview] = []
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # on the loop ---------------------------------------------------------------------------
    def reserve(self) -> bool:
        """Claim a free lane (then ``start`` it, or ``release`` the claim)."""
        with self._lock:
            if self._stopping or self._reserved >= self.count:
                return False
            self._reserved += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._reserved -= 1

    def start(self, sock: socket.socket, received: bytes, first: LaneRead) -> None:
        """Serve ``sock`` from a claimed lane, answering ``first`` before reading requests."""
        self._loop = asyncio.get_running_loop()
        lane = _Lane(sock, bytearray(received))
        with self._lock:
            stopping = self._stopping
            if not stopping:
                self._lanes.add(lane)
        if stopping:
            self.release()
            sock.close()
            return
        self.stats.handed += 1
        lane.thread = threading.Thread(
            target=self._run, args=(lane, first), name="depot-lane", daemon=True
        )
        lane.thread.start()

    def active(self) -> int:
        with self._lock:
            return len(self._lanes)

    def stats_document(self) -> dict[str, int]:
        self.flush_accounts()
        return self.stats.to_dict(self.active(), self.count)

    async def stop(self) -> None:
        """Close every lane's connection and wait for the threads to end."""
        with self._lock:
            self._stopping = True
            lanes = list(self._lanes)
        for lane in lanes:
            with contextlib.suppress(OSError):
                lane.sock.shutdown(socket.SHUT_RDWR)
        threads = [lane.thread for lane in lanes if lane.thread is not None]
        if threads:
            await asyncio.to_thread(_join_all, threads, 10.0)
        self.flush_accounts()

    def flush_accounts(self) -> None:
        """Account the reads lanes served since the last call (on the loop)."""
        with self._lock:
            self._account_due = False
        served = self._served_reads
        while served:
            done = served.popleft()
            for admit, data in done.admissions:
                admit(data)
            self.stats.requests += 1
            self.stats.bytes += done.read.length
            self.stats.from_loop += len(done.read.parts) - len(done.hits)
            self.stats.from_memory += done.from_memory
            self.host.lane_served(done.read, done.seconds, done.hits)

    def _take_back(self, sock: socket.socket, received: bytes) -> None:
        self.stats.handed_back += 1
        self._adopt(sock, received)

    # in the lane's thread ------------------------------------------------------------------
    def _run(self, lane: _Lane, first: LaneRead) -> None:
        sock = lane.sock
        give_back = False
        try:
            sock.setblocking(True)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(self.send_timeout))
            read: LaneRead | None = first
            while read is not None:
                self._send(lane, read)
                if not read.keep_alive or self._stopping:
                    break
                read, give_back = self._next_read(lane)
        except OSError as exc:  # the client went away, stopped reading, or the worker stops
            log.debug("lane connection ended: %s", exc)
            give_back = False
        except Exception:
            log.exception("lane failed; closing its connection")
            give_back = False
        finally:
            with self._lock:
                self._lanes.discard(lane)
                self._reserved -= 1
            handed = give_back and not self._stopping
            if not (handed and self._post(self._take_back, sock, bytes(lane.received))):
                sock.close()

    def _next_read(self, lane: _Lane) -> tuple[LaneRead | None, bool]:
        """The next request's read, or (None, whether to give the connection back)."""
        sock = lane.sock
        received = lane.received
        waiting = "idle"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(self.lane_idle))
        while True:
            end = received.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(received) > MAX_HEAD_BYTES:
                return None, True  # the loop answers 431
            if received and waiting == "idle":
                waiting = "head"
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(self.head_timeout)
                )
            try:
                chunk = sock.recv(64 * 1024)
            except BlockingIOError:  # the receive timeout
                # Idle: the lane is freed for a busier connection; the loop keeps this one
                # open for its keep-alive time. A head cut short: the loop answers 408.
                return None, True
            if not chunk:
                return None, False
            received += chunk
        try:
            request = bodiless_request(bytes(received[:end]))
        except HttpError:
            return None, True  # the loop answers it
        if request is None:
            return None, True
        read = self.host.prepare_now(request)
        if read is None:
            return None, True
        del received[: end + 4]
        return read, False

    def _send(self, lane: _Lane, read: LaneRead) -> None:
        with self._sending:
            with self._lock:
                buffer = self._buffers.pop() if self._buffers else None
            if buffer is None:
                buffer = _touched(self.page_size)
            try:
                self._send_parts(lane, read, buffer)
            finally:
                with self._lock:
                    self._buffers.append(buffer)

    def _send_parts(self, lane: _Lane, read: LaneRead, buffer: memoryview) -> None:
        started = time.perf_counter()
        sock = lane.sock
        files = self.files
        pages = self.pages
        served = _Served(read, 0.0, read.parts, 0, [])
        sock.sendall(read.head)
        last = read.parts[-1]
        for part in read.parts:
            held = None if pages is None else pages.held(part.page)
            if held is not None:
                served.from_memory += 1
                out = memoryview(held)[part.lo : part.hi]
            else:
                admit = None
                if pages is not None and part.lo == 0 and part.hi == part.length:
                    admit = pages.admission(part.page)
                # A page offered to the memory tier is read into memory of its own (not zeroed
                # first: that would cost as much as the read).
                whole = None
                if admit is None:
                    out = buffer[: part.hi - part.lo]
                else:
                    whole, out = alloc_result(part.length)
                try:
                    found = files.read_into(part.page, part.length, part.lo, out, 0, lane.scratch)
                except (CorruptPage, OSError):
                    found = False
                if not found:
                    if served.hits is read.parts:
                        served.hits = list(read.parts)
                    served.hits.remove(part)
                    self._read_on_loop(read, part, out)
                elif admit is not None and whole is not None:
                    served.admissions.append((admit, whole))
            if part is last:
                # Queued before the client can have the whole answer: a client that reads and
                # then asks for the counters finds its read in them.
                served.seconds = time.perf_counter() - started
                self._account(served)
            sock.sendall(out)

    def _account(self, served: _Served) -> None:
        """Queue a served read for the loop, waking it at most once per ``ACCOUNT_DELAY``: a
        wake-up per read would cost the loop's thread a switch and a turn at the GIL each."""
        self._served_reads.append(served)
        with self._lock:
            if self._account_due:
                return
            self._account_due = True
        if not self._post(self._account_later):
            with self._lock:
                self._account_due = False

    def _account_later(self) -> None:
        asyncio.get_running_loop().call_later(ACCOUNT_DELAY, self.flush_accounts)

    def _read_on_loop(self, read: LaneRead, part: LanePart, out: memoryview) -> None:
        loop = self._loop
        if loop is None or self._stopping:
            raise ConnectionAbortedError("the worker is stopping")
        try:
            future = asyncio.run_coroutine_threadsafe(
                _awaited(self.host.read_on_loop(read, part, out)), loop
            )
        except RuntimeError:
            raise ConnectionAbortedError("the worker is stopping") from None
        try:
            future.result(timeout=self.send_timeout)
        except Exception as exc:
            # The head is out: all the client can be told is a short body.
            raise ConnectionAbortedError(f"page {part.page} could not be read: {exc}") from exc

    def _post(self, callback: Callable[..., None], *args: Any) -> bool:
        loop = self._loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed
            return False
        return True


async def _awaited(awaitable: Awaitable[None]) -> None:
    await awaitable


def _touched(size: int) -> memoryview:
    """A buffer whose memory is mapped already: the first copy into fresh pages runs at a
    fraction of the rate (see ../shared/BASELINES.md)."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    for offset in range(0, size, 4096):
        view[offset] = 1
    return view


def _join_all(threads: list[threading.Thread], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
