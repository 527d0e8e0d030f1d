"""Write-back: acknowledge a write once it is durable on local disk, upload it in the background.

The engine of the ``write-back`` mode (issue 7), as a library; the worker's routes are wired to
it separately.

Acknowledgement point. ``stage`` writes the bytes to a new staging file, fsyncs the file and the
staging directory, then appends a ``staged`` record to the journal (``depot.worker.journal``) and
fsyncs it. Only then does it return a ``Ticket``: an acknowledged write survives a crash of the
process or of the machine. A crash before that point leaves at most an orphan staging file
(removed at the next open) and a torn journal tail (ignored at replay). A write of at most
``_INLINE_WRITE`` bytes (an S3 PUT of a small object) is acknowledged with one fsync instead of
three: its ``staged`` record carries the content, and its staging file is written but not
fsync'd. Recovery writes such a file again from its record; compaction, which drops the content
from the journal, fsyncs the files first.

Local writes. ``open_slot`` lends a new, empty staging file to a writer on this node, which
writes and fsyncs it itself; ``adopt`` checks its size, fsyncs it and the directory and journals
it exactly like ``stage`` (the bytes cross no socket). A slot that is not adopted is dropped with
its file by ``discard_slot``, after ``slot_ttl``, or at the next open (an orphan).

Ordering. Every acknowledged write gets the next sequence number, under the journal lock, so
sequence order is acknowledgement order ("last close wins"). Uploads of one path are serialized:
a path has at most one upload in flight, and a newer write of a path supersedes the older ones
that have not started (they are journaled ``abandoned`` and their staging files removed). An
older upload already in flight is allowed to finish, and the newer one starts only after it, so
an older object can never land after a newer one.

Upload. A pool of ``concurrency`` tasks streams staged files to the under store (holding back
while writes are coming in, up to ``defer_uploads`` seconds, unless a sync waits): one ``put``
up to ``multipart_threshold``, ``put_multipart`` above it (the staging file is read part by part;
the checksum is verified as the bytes are read and a mismatch aborts the upload before its last
part, so nothing appears under the final name). Retryable errors (``Throttled``,
``Unavailable``...) are retried with capped exponential backoff and jitter; permanent ones (and
retryable ones past ``max_attempts``) leave the write ``failed``: its staging file and journal
record are kept, it shows in ``stats()["failures"]``, and ``retry_failed``/``abandon`` are the
operator's choices. Nothing is dropped silently.

Recovery. ``WriteBackQueue.open`` replays the journal: every staged record without an
``uploaded``/``abandoned`` record is live; for each path only the newest live record is kept
(older ones are journaled ``abandoned``); its staging file is checked against the recorded size
and checksum and the write is queued again. A missing or corrupt staging file of an acknowledged
write is reported as a ``lost`` failure (logged as an error, kept in ``stats()`` and in the
journal until an operator abandons it), never skipped.

Quota. ``staging_quota`` bounds the bytes held in staging files. A write that would exceed it
raises ``NoSpace`` (errno ENOSPC) or, with ``on_full="wait"``, waits up to ``full_wait_timeout``
for uploads to free space, then raises ``NoSpace``. A disk-full error while staging is also
``NoSpace``; in every case the partial staging file is removed and nothing is acknowledged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import enum
import errno
import io
import logging
import os
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Literal

import xxhash

from depot.core.directio import pwrite_all
from depot.core.errors import (
    Corrupted,
    DepotError,
    InvalidArgument,
    NoSpace,
    NotFound,
    Timeout,
)
from depot.core.types import Attributes
from depot.ufs.base import Buffer, ObjectInfo, UnderStore
from depot.worker.journal import Journal, Record, fsync_dir

log = logging.getLogger(__name__)

Source = Buffer | AsyncIterable[Buffer] | IO[bytes]
StoreFactory = Callable[[str], UnderStore]
UploadedHook = Callable[["Ticket", ObjectInfo], Awaitable[None]]

DEFAULT_PART_SIZE = 8 * 1024 * 1024
DEFAULT_MULTIPART_THRESHOLD = 16 * 1024 * 1024
_READ_CHUNK = 1024 * 1024
# Writes up to this size are gathered in memory and staged in one thread call.
_SMALL_WRITE = 256 * 1024
# Writes up to this size are carried in their journal record: one fsync acknowledges them (the
# journal's), not three (staging file, staging directory, journal).
_INLINE_WRITE = 64 * 1024
# The journal is compacted (dropping that content) once it holds this much of it.
_INLINE_JOURNAL_BYTES = 64 * 1024 * 1024
_RATE_WINDOW = 10.0
# Uploads deferred while writes come in start once no write has been in progress this long.
_QUIET = 0.25


class State(enum.Enum):
    QUEUED = "queued"
    UPLOADING = "uploading"
    FAILED = "failed"  # kept for the operator: the staging file is still there
    LOST = "lost"  # acknowledged, but its staging file is missing or corrupt
    UPLOADED = "uploaded"
    ABANDONED = "abandoned"


_PENDING = (State.QUEUED, State.UPLOADING, State.FAILED, State.LOST)


@dataclass(frozen=True, slots=True)
class Ticket:
    """What ``stage`` acknowledges: the write is durable and will be uploaded."""

    seq: int
    path: str
    store_uri: str
    ufs_key: str
    size: int
    checksum: str  # xxh3_64 hex of the content
    staging_path: Path
    file_id: str = ""
    attributes: Attributes | None = None  # content headers and user metadata to upload with


@dataclass(slots=True)
class _Entry:
    ticket: Ticket
    staged_at: float  # wall clock, persisted: survives restarts for "oldest dirty age"
    state: State = State.QUEUED
    attempts: int = 0
    error: DepotError | None = None
    superseded: bool = False
    claimed: bool = False  # about to be abandoned: uploaders must not take it
    inline: bool = False  # its content is in the journal, its staging file not fsync'd yet

    @property
    def has_file(self) -> bool:
        return self.state in (State.QUEUED, State.UPLOADING, State.FAILED)


@dataclass(slots=True)
class Slot:
    """A staging file handed to a writer on this node, who fills and fsyncs it itself
    (``open_slot``); it becomes a write only through ``adopt``."""

    token: str
    path: str
    staging_path: Path
    reserved: int
    expires: float  # time.monotonic() after which the slot and its file are dropped


@dataclass(slots=True)
class WriteBackConfig:
    concurrency: int = 4
    part_size: int = DEFAULT_PART_SIZE
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD
    bandwidth_limit: float | None = None  # bytes per second over all uploads; None: unlimited
    max_attempts: int | None = None  # None: retry retryable errors forever (with backoff)
    backoff_base: float = 0.1
    backoff_max: float = 30.0
    staging_quota: int | None = None  # bytes; None: bounded by the disk only
    on_full: Literal["error", "wait"] = "error"
    full_wait_timeout: float = 60.0
    compact_after: int = 1000  # journal appends between compactions (if mostly dead)
    slot_ttl: float = 3600.0  # seconds a slot of a writer on this node may stay open
    # Uploads wait while writes are coming in (until none has for _QUIET s), at most this many
    # seconds after the oldest waiting write was acknowledged; 0: upload at once.
    defer_uploads: float = 5.0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.part_size < 1 or self.multipart_threshold < 0:
            raise ValueError("concurrency and part_size must be positive")
        if not self.defer_uploads >= 0:
            raise ValueError("defer_uploads must be >= 0")
        if not self.slot_ttl > 0:
            raise ValueError("slot_ttl must be positive")
        if self.on_full not in ("error", "wait"):
            raise ValueError("on_full must be 'error' or 'wait'")


class _TokenBucket:
    """A byte-rate limiter shared by all uploads (burst of one second)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.stamp = time.monotonic()
        self.lock = asyncio.Lock()

    async def take(self, amount: int) -> None:
        async with self.lock:
            now = time.monotonic()
            self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= amount
            if self.tokens < 0:
                await asyncio.sleep(-self.tokens / self.rate)


def _is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, DepotError) and exc.retryable


class WriteBackQueue:
    """Staged writes, their journal and the background uploader. Use ``await open(...)``."""

    def __init__(
        self,
        directory: Path,
        store_factory: StoreFactory,
        config: WriteBackConfig,
        *,
        on_uploaded: UploadedHook | None = None,
    ) -> None:
        self.directory = directory
        self.staging_dir = directory / "staging"
        self.config = config
        self._store_factory = store_factory
        self._stores: dict[str, UnderStore] = {}
        self._on_uploaded = on_uploaded
        self._journal = Journal(directory / "journal")
        self._journal_lock = asyncio.Lock()
        self._entries: dict[int, _Entry] = {}  # every pending entry by seq
        self._latest: dict[str, _Entry] = {}  # newest pending entry of each path
        self._inflight: set[str] = set()  # paths with an upload running
        self._ready: deque[str] = deque()
        self._ready_set: set[str] = set()
        self._wake = asyncio.Condition()
        self._changed = asyncio.Condition()
        self._next_seq = 1
        self._reserved = 0  # bytes being staged, not yet acknowledged
        self._inline_bytes = 0  # write content carried in the journal since its compaction
        self._slots: dict[str, Slot] = {}  # staging files lent to writers on this node
        self._writing = 0  # writes being staged now (stage calls and open slots)
        self._last_write = 0.0  # time.monotonic() when the last of them ended
        self._syncing = 0  # sync calls waiting: uploads are not deferred
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._limiter = _TokenBucket(config.bandwidth_limit) if config.bandwidth_limit else None
        self._uploads: deque[tuple[float, int]] = deque()
        self.counters: dict[str, int] = {
            "staged": 0,
            "staged_bytes": 0,
            "uploaded": 0,
            "uploaded_bytes": 0,
            "superseded": 0,
            "retries": 0,
            "upload_failures": 0,
            "abandoned": 0,
            "journal_torn_bytes": 0,
        }

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls,
        directory: str | os.PathLike[str],
        store_factory: StoreFactory,
        config: WriteBackConfig | None = None,
        *,
        on_uploaded: UploadedHook | None = None,
        start: bool = True,
    ) -> WriteBackQueue:
        """Open (or create) the queue in ``directory``, replay its journal, start uploading."""
        queue = cls(
            Path(directory), store_factory, config or WriteBackConfig(), on_uploaded=on_uploaded
        )
        await asyncio.to_thread(queue._recover)
        for entry in sorted(queue._latest.values(), key=lambda e: e.ticket.seq):
            if entry.state is State.QUEUED:
                queue._ready.append(entry.ticket.path)
                queue._ready_set.add(entry.ticket.path)
        if start:
            queue.start()
        return queue

    def start(self) -> None:
        """Start the uploader tasks (``open`` does this unless ``start=False``)."""
        if self._closed:
            raise RuntimeError("write-back queue is closed")
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._upload_loop(), name=f"writeback-upload-{i}")
                for i in range(self.config.concurrency)
            ]

    async def close(self) -> None:
        """Stop uploading and close the journal. Pending writes stay staged for the next open."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        async with self._journal_lock:
            await asyncio.to_thread(self._journal.close)
        async with self._changed:
            self._changed.notify_all()

    async def __aenter__(self) -> WriteBackQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _recover(self) -> None:
        """Replay the journal, verify staging files, drop orphans, compact (blocking)."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.directory)
        result = Journal.replay(self._journal.path)
        self.counters["journal_torn_bytes"] = result.torn_bytes
        staged: dict[int, Record] = {}
        max_seq = 0
        for rec in result.records:
            kind = rec["t"]
            if kind == "seq":
                max_seq = max(max_seq, int(rec["next"]) - 1)
            elif kind == "staged":
                staged[int(rec["seq"])] = rec
                max_seq = max(max_seq, int(rec["seq"]))
            elif kind in ("uploaded", "abandoned"):
                staged.pop(int(rec["seq"]), None)
        self._next_seq = max_seq + 1
        abandoned: list[Record] = []
        newest: dict[str, Record] = {}
        for seq in sorted(staged):
            rec = staged[seq]
            older = newest.get(rec["path"])
            if older is not None:
                abandoned.append(older)
            newest[rec["path"]] = rec
        for rec in abandoned:
            del staged[int(rec["seq"])]
            self.counters["superseded"] += 1
        for seq in sorted(staged):
            entry = _entry_from_record(staged[seq], self.staging_dir)
            data = staged[seq].get("data")
            if isinstance(data, str):
                # An inline write: its staging file was never fsync'd; the record is the truth.
                _restore_inline(entry.ticket.staging_path, base64.b64decode(data))
            problem = _verify_staging_file(entry.ticket)
            if problem is not None:
                entry.state = State.LOST
                entry.error = Corrupted(
                    f"acknowledged write #{seq} lost its staging file ({problem}); "
                    "it cannot be uploaded",
                    entry.ticket.path,
                )
                log.error("write-back recovery: %s", entry.error)
            self._entries[seq] = entry
            self._latest[entry.ticket.path] = entry
        keep = {e.ticket.staging_path.name for e in self._entries.values()}
        for name in os.listdir(self.staging_dir):
            if name not in keep:
                os.unlink(self.staging_dir / name)  # orphan: staged, never acknowledged
        for rec in abandoned:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.staging_dir / rec["file"])
        fsync_dir(self.staging_dir)
        self._journal.rewrite(self._live_records())
        if self._entries:
            log.info("write-back recovery: %d staged writes to upload", len(self._entries))

    def _live_records(self) -> list[Record]:
        records: list[Record] = [{"t": "seq", "next": self._next_seq}]
        for seq in sorted(self._entries):
            records.append(_record_from_entry(self._entries[seq]))
        return records

    # ------------------------------------------------------------------ staging

    async def stage(
        self,
        path: str,
        ufs_key: str,
        source: Source,
        *,
        store_uri: str = "",
        file_id: str = "",
        size_hint: int | None = None,
        attributes: Attributes | None = None,
    ) -> Ticket:
        """Write ``source`` durably to local disk and journal it; return once acknowledged.

        ``store_uri`` names the under store (passed to the store factory) and ``ufs_key`` the
        object in it. With ``size_hint``, a write that cannot fit the quota fails before any byte
        is written. ``attributes`` are journaled with the write and uploaded with it.
        """
        if self._closed:
            raise RuntimeError("write-back queue is closed")
        token = uuid.uuid4().hex + ".data"
        staging_path = self.staging_dir / token
        reserved = 0
        if size_hint:
            await self._reserve(size_hint, path)
            reserved = size_hint
        hasher = xxhash.xxh3_64()
        size = 0
        dir_synced = False
        inline: bytes | None = None
        self._writing += 1
        try:
            # A small body (an S3 PUT of a few KiB) is gathered first and staged in one thread
            # call (create, write, fsync, fsync the dir): the acknowledgement then costs two
            # hops to a thread, not six.
            chunks = aiter(_chunks(source))
            head: list[Buffer] = []
            ended = False
            while size <= _SMALL_WRITE:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    ended = True
                    break
                head.append(chunk)
                size += len(chunk)
            if size > reserved:
                await self._reserve(size - reserved, path)
                reserved = size
            if ended and size <= _INLINE_WRITE:
                # Its file is written with the journal append, in the same thread call.
                inline = b"".join(head)
                hasher.update(inline)
            elif ended:
                await asyncio.to_thread(_stage_small, staging_path, head, hasher)
                dir_synced = True
            else:
                fd = await asyncio.to_thread(
                    os.open, staging_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
                )
                try:
                    for chunk in head:
                        await asyncio.to_thread(_write_all, fd, chunk, hasher)
                    del head
                    async for chunk in chunks:
                        n = len(chunk)
                        if size + n > reserved:
                            extra = size + n - reserved
                            await self._reserve(extra, path)
                            reserved += extra
                        await asyncio.to_thread(_write_all, fd, chunk, hasher)
                        size += n
                    await asyncio.to_thread(os.fsync, fd)
                finally:
                    await asyncio.to_thread(os.close, fd)
        except BaseException as exc:
            await self._drop_staging(staging_path, reserved, path, exc)
            raise
        finally:
            self._write_ended()
        draft = Ticket(
            0, path, store_uri, ufs_key, size, hasher.hexdigest(), staging_path, file_id, attributes
        )
        return await self._commit(draft, reserved, dir_synced=dir_synced, inline=inline)

    async def open_slot(self, path: str, size_hint: int | None = None) -> Slot:
        """Lend a new, empty staging file to a writer on this node (a short-circuit write).

        The writer writes the content into ``slot.staging_path`` itself, fsyncs it and calls
        ``adopt``; until then nothing is acknowledged. With ``size_hint`` the quota is reserved
        now (a write that cannot fit fails before any byte is written); otherwise at ``adopt``.
        A slot not adopted or discarded within ``slot_ttl`` is dropped with its file.
        """
        if self._closed:
            raise RuntimeError("write-back queue is closed")
        await self._drop_expired_slots()
        reserved = 0
        if size_hint:
            await self._reserve(size_hint, path)
            reserved = size_hint
        token = uuid.uuid4().hex
        staging_path = self.staging_dir / f"{token}.data"
        try:
            fd = await asyncio.to_thread(
                os.open, staging_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
            )
            os.close(fd)
        except BaseException as exc:
            await self._drop_staging(staging_path, reserved, path, exc)
            raise
        slot = Slot(token, path, staging_path, reserved, time.monotonic() + self.config.slot_ttl)
        self._slots[token] = slot
        self._writing += 1
        return slot

    async def adopt(
        self,
        token: str,
        path: str,
        ufs_key: str,
        size: int,
        checksum: str,
        *,
        store_uri: str = "",
        file_id: str = "",
        attributes: Attributes | None = None,
    ) -> Ticket:
        """Acknowledge the content a writer on this node put in slot ``token`` (``open_slot``).

        The writer fsync'd the file and computed ``checksum`` (xxh3_64 hex) of what it wrote;
        the file's size must be ``size``. The file is fsync'd again here (cheap when it is
        clean) with its directory, then journaled like ``stage``. Any failure drops the slot.
        """
        slot = self._slots.get(token)
        if slot is None or slot.path != path:
            raise NotFound("no such write slot (expired, or the worker restarted)", path)
        del self._slots[token]
        self._write_ended()
        reserved = slot.reserved
        try:
            if slot.expires < time.monotonic():
                raise NotFound("the write slot expired before it was committed", path)
            actual = await asyncio.to_thread(_fsync_size, slot.staging_path)
            if actual != size:
                raise InvalidArgument(
                    f"the slot's file holds {actual} bytes, the writer reported {size}", path
                )
            if size > reserved:
                await self._reserve(size - reserved, path)
                reserved = size
        except BaseException as exc:
            await self._drop_staging(slot.staging_path, reserved, path, exc)
            raise
        draft = Ticket(
            0, path, store_uri, ufs_key, size, checksum, slot.staging_path, file_id, attributes
        )
        return await self._commit(draft, reserved)

    async def discard_slot(self, token: str) -> bool:
        """Drop a slot and its file (the writer gave up); False if there was no such slot."""
        slot = self._slots.pop(token, None)
        if slot is None:
            return False
        self._write_ended()
        await self._drop_staging(slot.staging_path, slot.reserved, slot.path, None)
        return True

    def _write_ended(self) -> None:
        self._writing -= 1
        self._last_write = time.monotonic()

    async def _hold_while_writing(self) -> None:
        """Defer uploads while writes come in (``defer_uploads``): on a node whose cores and
        disk the uploads share, a checkpoint being written would otherwise pay for the upload
        of its first files. Returns once no write has been in progress for ``_QUIET`` s, a sync
        is waiting, or the oldest write waiting for upload is ``defer_uploads`` s old."""
        defer = self.config.defer_uploads
        while defer > 0 and not self._syncing and not self._closed:
            now = time.monotonic()
            quiet_for = now - self._last_write
            if self._writing == 0 and quiet_for >= _QUIET:
                return
            oldest = min(
                (e.staged_at for e in self._latest.values() if e.state is State.QUEUED),
                default=None,
            )
            if oldest is None or time.time() - oldest >= defer:
                return
            await asyncio.sleep(_QUIET - quiet_for if self._writing == 0 else _QUIET / 2)

    async def _drop_expired_slots(self) -> None:
        now = time.monotonic()
        for token in [t for t, s in self._slots.items() if s.expires < now]:
            path = self._slots[token].path
            log.warning("write-back: dropping the slot of %s, not committed in time", path)
            await self.discard_slot(token)

    async def _drop_staging(
        self, staging_path: Path, reserved: int, path: str, exc: BaseException | None
    ) -> None:
        """A staging file that will not be acknowledged: remove it, free its reservation, and
        raise a disk-full error as ``NoSpace``."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging_path)
        await self._release(reserved)
        if (
            isinstance(exc, OSError)
            and not isinstance(exc, DepotError)
            and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        ):
            raise NoSpace(f"staging disk is full: {exc.strerror}", path) from exc

    async def _commit(
        self,
        draft: Ticket,
        reserved: int,
        *,
        dir_synced: bool = False,
        inline: bytes | None = None,
    ) -> Ticket:
        """Journal a staged write (``draft``: its ticket before it has a number): the
        acknowledgement. The staging file is durable (fsync'd, and its directory unless
        ``dir_synced``), or its content is ``inline``: then the journal record carries it."""
        ack: asyncio.Future[Ticket] | None = None
        try:
            if not dir_synced and inline is None:
                await asyncio.to_thread(fsync_dir, self.staging_dir)
            # The journal append is the acknowledgement; a cancelled caller must not leave it
            # half-known (journaled but its staging file removed), so it runs to completion.
            ack = asyncio.ensure_future(self._acknowledge(draft, inline))
            ticket = await asyncio.shield(ack)
        except BaseException as exc:
            if ack is not None:
                if not ack.done():
                    await asyncio.wait([ack])
                if not ack.cancelled() and ack.exception() is None:
                    self._reserved -= reserved  # acknowledged after all: keep everything
                    raise
            await self._drop_staging(draft.staging_path, reserved, draft.path, exc)
            raise
        # The reservation becomes the entry's dirty bytes (counted from _entries).
        self._reserved -= reserved
        return ticket

    async def _acknowledge(self, draft: Ticket, inline: bytes | None) -> Ticket:
        async with self._journal_lock:
            if self._closed:
                raise RuntimeError("write-back queue is closed")
            seq = self._next_seq
            path = draft.path
            ticket = replace(draft, seq=seq)
            entry = _Entry(ticket, time.time(), inline=inline is not None)
            record = _record_from_entry(entry)
            if inline is not None:
                record["data"] = base64.b64encode(inline).decode("ascii")
            records = [record]
            older = self._latest.get(path)
            drop: _Entry | None = None
            if older is not None and older.state in (State.QUEUED, State.FAILED, State.LOST):
                # Claimed before the append (no await in between): no uploader can take it now.
                drop = older
                drop.claimed = True
                records.append(
                    {"t": "abandoned", "seq": older.ticket.seq, "reason": f"superseded by #{seq}"}
                )
            # If this append fails nothing changed in memory and the write is not acknowledged.
            try:
                if inline is None:
                    await asyncio.to_thread(self._journal.append, records)
                else:
                    await asyncio.to_thread(self._append_inline, records, draft.staging_path, inline)
            except BaseException:
                if drop is not None:
                    drop.claimed = False
                raise
            self._next_seq = seq + 1
            self._entries[seq] = entry
            self._latest[path] = entry
            if inline is not None:
                self._inline_bytes += len(inline)
            if older is not None and drop is None:
                older.superseded = True  # in flight: it finishes first, then this one goes
            if drop is not None:
                self._forget(drop, State.ABANDONED)
                self.counters["superseded"] += 1
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(drop.ticket.staging_path)
            self.counters["staged"] += 1
            self.counters["staged_bytes"] += ticket.size
        await self._schedule(path)
        await self._notify()
        await self._maybe_compact()
        return ticket

    async def _reserve(self, amount: int, path: str) -> None:
        quota = self.config.staging_quota
        if quota is None:
            self._reserved += amount
            return
        if amount > quota:
            raise NoSpace(f"write of {amount} bytes is larger than the staging quota", path)
        deadline = time.monotonic() + self.config.full_wait_timeout
        async with self._changed:
            while self.dirty_bytes + self._reserved + amount > quota:
                left = deadline - time.monotonic()
                if self.config.on_full == "error" or left <= 0:
                    raise NoSpace(
                        f"write-back staging quota of {quota} bytes is full "
                        f"({self.dirty_bytes} bytes waiting for upload)",
                        path,
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
            self._reserved += amount

    async def _release(self, amount: int) -> None:
        self._reserved -= amount
        await self._notify()

    # ------------------------------------------------------------------ queries

    def pending(self, path: str) -> Ticket | None:
        """The newest acknowledged, not yet uploaded write of ``path`` whose bytes are on disk.

        The read path serves these bytes (``ticket.staging_path``) before they reach the UFS.
        """
        entry = self._latest.get(path)
        if entry is None or not entry.has_file:
            return None
        return entry.ticket

    @property
    def dirty_bytes(self) -> int:
        return sum(e.ticket.size for e in self._entries.values() if e.has_file)

    def failures(self) -> list[dict[str, Any]]:
        out = []
        for entry in sorted(self._entries.values(), key=lambda e: e.ticket.seq):
            if entry.state in (State.FAILED, State.LOST):
                err = entry.error
                out.append(
                    {
                        "seq": entry.ticket.seq,
                        "path": entry.ticket.path,
                        "state": entry.state.value,
                        "attempts": entry.attempts,
                        "code": err.code if err else "",
                        "message": str(err) if err else "",
                    }
                )
        return out

    def stats(self) -> dict[str, Any]:
        now = time.time()
        mono = time.monotonic()
        while self._uploads and self._uploads[0][0] < mono - _RATE_WINDOW:
            self._uploads.popleft()
        recent = sum(n for _, n in self._uploads)
        pending = list(self._entries.values())
        oldest = min((e.staged_at for e in pending), default=None)
        return {
            "dirty_bytes": self.dirty_bytes,
            "queue_length": len(pending),
            "uploading": sum(1 for e in pending if e.state is State.UPLOADING),
            "upload_rate": recent / _RATE_WINDOW,
            "oldest_dirty_age": 0.0 if oldest is None else max(0.0, now - oldest),
            "failures": self.failures(),
            **self.counters,
        }

    async def sync(
        self,
        path: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - `depot sync --wait` deadline
    ) -> None:
        """Wait until every path dirty now (or ``path``) is uploaded.

        Raises the recorded error if one of them failed permanently (or was lost), and
        ``Timeout`` when ``timeout`` runs out first.
        """
        paths = {path} if path is not None else set(self._latest)

        def done() -> bool:
            for p in paths:
                entry = self._latest.get(p)
                if entry is None:
                    continue
                if entry.state in (State.FAILED, State.LOST) and entry.error is not None:
                    raise entry.error
                return False
            return True

        async def wait() -> None:
            async with self._changed:
                while not done():
                    if self._closed:
                        raise RuntimeError("write-back queue closed while syncing")
                    await self._changed.wait()

        self._syncing += 1  # a sync flushes now: uploads are not deferred meanwhile
        try:
            await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise Timeout(f"write-back sync did not finish in {timeout} s", path) from None
        finally:
            self._syncing -= 1

    # ------------------------------------------------------------------ operator actions

    async def retry_failed(self, seq: int | None = None) -> int:
        """Queue failed writes (all, or ``seq``) again; returns how many."""
        count = 0
        for entry in list(self._entries.values()):
            if (
                entry.state is State.FAILED
                and not entry.claimed
                and (seq is None or entry.ticket.seq == seq)
            ):
                entry.state = State.QUEUED
                entry.error = None
                entry.attempts = 0
                count += 1
                await self._schedule(entry.ticket.path)
        await self._notify()
        return count

    async def abandon(self, seq: int, reason: str) -> None:
        """Give up on a failed or lost write: journaled, its staging file removed."""
        entry = self._entries.get(seq)
        if entry is None:
            raise NotFound(f"no pending write-back #{seq}")
        if entry.state not in (State.FAILED, State.LOST, State.QUEUED):
            raise DepotError(f"write-back #{seq} is {entry.state.value}; it cannot be abandoned")
        async with self._journal_lock:
            await asyncio.to_thread(
                self._journal.append, [{"t": "abandoned", "seq": seq, "reason": reason}]
            )
            self._forget(entry, State.ABANDONED)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.ticket.staging_path)
        self.counters["abandoned"] += 1
        await self._notify()

    # ------------------------------------------------------------------ uploader

    def _forget(self, entry: _Entry, state: State) -> None:
        entry.state = state
        self._entries.pop(entry.ticket.seq, None)
        if self._latest.get(entry.ticket.path) is entry:
            del self._latest[entry.ticket.path]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _schedule(self, path: str) -> None:
        async with self._wake:
            if path not in self._ready_set and path not in self._inflight:
                self._ready.append(path)
                self._ready_set.add(path)
                self._wake.notify()

    async def _next_ready(self) -> _Entry:
        while True:
            await self._hold_while_writing()
            async with self._wake:
                while self._ready:
                    path = self._ready.popleft()
                    self._ready_set.discard(path)
                    entry = self._latest.get(path)
                    if (
                        path in self._inflight
                        or entry is None
                        or entry.state is not State.QUEUED
                        or entry.claimed
                    ):
                        continue
                    self._inflight.add(path)
                    entry.state = State.UPLOADING
                    return entry
                await self._wake.wait()  # then hold again: the write that woke us just ended

    async def _upload_loop(self) -> None:
        while True:
            entry = await self._next_ready()
            path = entry.ticket.path
            try:
                await self._upload_entry(entry)
            finally:
                self._inflight.discard(path)
                newest = self._latest.get(path)
                if newest is not None and newest.state is State.QUEUED:
                    await self._schedule(path)
                await self._notify()

    async def _upload_entry(self, entry: _Entry) -> None:
        ticket = entry.ticket
        while True:
            entry.attempts += 1
            try:
                info = await self._upload_once(ticket)
            except asyncio.CancelledError:
                entry.state = State.QUEUED  # staged and journaled: the next open uploads it
                raise
            except Exception as exc:
                err = exc if isinstance(exc, DepotError) else DepotError(f"upload failed: {exc!r}")
                limit = self.config.max_attempts
                if _is_retryable(err) and (limit is None or entry.attempts < limit):
                    self.counters["retries"] += 1
                    delay = min(
                        self.config.backoff_max,
                        self.config.backoff_base * 2 ** (entry.attempts - 1),
                    ) * (0.5 + random.random() / 2)
                    log.info(
                        "write-back upload of %s failed (%s); retry in %.2fs",
                        ticket.path,
                        err,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    if entry.superseded:
                        await self._abandon_superseded(entry)
                        return
                    continue
                if isinstance(err, Corrupted):
                    entry.state = State.LOST
                else:
                    entry.state = State.FAILED
                entry.error = err
                self.counters["upload_failures"] += 1
                log.error(
                    "write-back upload of %s (#%d) failed permanently after %d attempts: %s",
                    ticket.path,
                    ticket.seq,
                    entry.attempts,
                    err,
                )
                if entry.superseded:
                    await self._abandon_superseded(entry)
                return
            break
        async with self._journal_lock:
            await asyncio.to_thread(
                self._journal.append,
                [{"t": "uploaded", "seq": ticket.seq, "etag": info.etag, "version": info.version}],
            )
            self._forget(entry, State.UPLOADED)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, ticket.staging_path)
        self.counters["uploaded"] += 1
        self.counters["uploaded_bytes"] += ticket.size
        self._uploads.append((time.monotonic(), ticket.size))
        if self._on_uploaded is not None:
            try:
                await self._on_uploaded(ticket, info)
            except Exception:
                log.exception("write-back on_uploaded hook failed for %s", ticket.path)
        await self._maybe_compact()

    async def _abandon_superseded(self, entry: _Entry) -> None:
        async with self._journal_lock:
            await asyncio.to_thread(
                self._journal.append,
                [{"t": "abandoned", "seq": entry.ticket.seq, "reason": "superseded"}],
            )
            self._forget(entry, State.ABANDONED)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.ticket.staging_path)
        self.counters["superseded"] += 1

    def _store(self, uri: str) -> UnderStore:
        store = self._stores.get(uri)
        if store is None:
            store = self._store_factory(uri)
            self._stores[uri] = store
        return store

    async def _upload_once(self, ticket: Ticket) -> ObjectInfo:
        store = self._store(ticket.store_uri)
        if ticket.size <= self.config.multipart_threshold:
            data = await asyncio.to_thread(_read_verified, ticket)
            if self._limiter is not None:
                await self._limiter.take(len(data))
            return await store.put(ticket.ufs_key, data, attributes=ticket.attributes)
        return await store.put_multipart(
            ticket.ufs_key,
            self._parts(ticket),
            part_size=self.config.part_size,
            attributes=ticket.attributes,
        )

    async def _parts(self, ticket: Ticket) -> AsyncIterator[Buffer]:
        """The staging file in parts; a checksum mismatch raises before the last part."""
        part_size = self.config.part_size
        f = await asyncio.to_thread(open, ticket.staging_path, "rb")
        try:
            hasher = xxhash.xxh3_64()
            sent = 0
            while True:
                part = await asyncio.to_thread(f.read, part_size)
                if part:
                    hasher.update(part)
                    sent += len(part)
                last = not part or sent >= ticket.size
                if last:
                    extra = await asyncio.to_thread(f.read, 1)
                    if sent != ticket.size or extra or hasher.hexdigest() != ticket.checksum:
                        raise Corrupted(
                            f"staging file of write-back #{ticket.seq} does not match its checksum",
                            ticket.path,
                        )
                if part:
                    if self._limiter is not None:
                        await self._limiter.take(len(part))
                    yield part
                if last:
                    return
        finally:
            await asyncio.to_thread(f.close)

    def _append_inline(self, records: list[Record], staging_path: Path, data: bytes) -> None:
        """Create an inline write's staging file (not fsync'd) and journal it (blocking)."""
        fd = os.open(staging_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            pwrite_all(fd, data, 0)
        finally:
            os.close(fd)
        self._journal.append(records)

    def _compaction_due(self) -> bool:
        return (
            self._journal.appended >= self.config.compact_after
            or self._inline_bytes >= _INLINE_JOURNAL_BYTES
        )

    async def _maybe_compact(self) -> None:
        if not self._compaction_due():
            return
        async with self._journal_lock:
            if not self._compaction_due() or self._closed:
                return
            # The rewrite carries no inline content, so the staging files of the inline writes
            # still pending are made durable first.
            inline = [e for e in self._entries.values() if e.inline]
            files = [e.ticket.staging_path for e in inline if e.has_file]
            await asyncio.to_thread(self._compact, files, self._live_records())
            for entry in inline:
                entry.inline = False
            self._inline_bytes = 0

    def _compact(self, inline_files: list[Path], records: list[Record]) -> None:
        """fsync ``inline_files`` and their directory, then rewrite the journal to ``records``
        (blocking; under the journal lock)."""
        for path in inline_files:
            with contextlib.suppress(FileNotFoundError):  # uploaded and dropped meanwhile
                _fsync_size(path)
        if inline_files:
            fsync_dir(self.staging_dir)
        self._journal.rewrite(records)


# ---------------------------------------------------------------------- helpers


def _fsync_size(path: Path) -> int:
    """fsync a file written by another process; its size."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _stage_small(path: Path, chunks: list[Buffer], hasher: Any) -> None:
    """Create ``path`` with ``chunks``, fsync it and its directory (blocking)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in chunks:
            _write_all(fd, chunk, hasher)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def _restore_inline(path: Path, data: bytes) -> None:
    """Write a staging file again from its journal record's content and fsync it (blocking)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        pwrite_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, chunk: Buffer, hasher: Any) -> None:
    view = memoryview(chunk).cast("B")
    hasher.update(view)
    while view:
        written = os.write(fd, view)
        view = view[written:]


async def _chunks(source: Source) -> AsyncIterator[Buffer]:
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source).cast("B")
        for start in range(0, len(view), _READ_CHUNK):
            yield view[start : start + _READ_CHUNK]
    elif isinstance(source, io.IOBase) or hasattr(source, "read"):
        reader: IO[bytes] = source  # type: ignore[assignment]
        while True:
            block = await asyncio.to_thread(reader.read, _READ_CHUNK)
            if not block:
                return
            yield block
    else:
        async for chunk in source:
            if chunk:
                yield chunk


def _read_verified(ticket: Ticket) -> bytes:
    data = ticket.staging_path.read_bytes()
    if len(data) != ticket.size or xxhash.xxh3_64_hexdigest(data) != ticket.checksum:
        raise Corrupted(
            f"staging file of write-back #{ticket.seq} does not match its checksum", ticket.path
        )
    return data


def _verify_staging_file(ticket: Ticket) -> str | None:
    try:
        size = os.stat(ticket.staging_path).st_size
    except FileNotFoundError:
        return "missing"
    if size != ticket.size:
        return f"size {size}, expected {ticket.size}"
    hasher = xxhash.xxh3_64()
    with open(ticket.staging_path, "rb") as f:
        while block := f.read(_READ_CHUNK):
            hasher.update(block)
    if hasher.hexdigest() != ticket.checksum:
        return "checksum mismatch"
    return None


def _record_from_entry(entry: _Entry) -> Record:
    t = entry.ticket
    record: Record = {
        "t": "staged",
        "seq": t.seq,
        "path": t.path,
        "store": t.store_uri,
        "key": t.ufs_key,
        "file": t.staging_path.name,
        "file_id": t.file_id,
        "size": t.size,
        "xxh3": t.checksum,
        "at": entry.staged_at,
    }
    if t.attributes is not None:  # absent in records of older versions: None
        record["attrs"] = t.attributes.to_dict()
    return record


def _entry_from_record(rec: Record, staging_dir: Path) -> _Entry:
    ticket = Ticket(
        seq=int(rec["seq"]),
        path=str(rec["path"]),
        store_uri=str(rec["store"]),
        ufs_key=str(rec["key"]),
        size=int(rec["size"]),
        checksum=str(rec["xxh3"]),
        staging_path=staging_dir / str(rec["file"]),
        file_id=str(rec.get("file_id", "")),
        attributes=Attributes.from_dict(rec["attrs"]) if "attrs" in rec else None,
    )
    return _Entry(ticket, float(rec["at"]))


__all__ = ["State", "Ticket", "WriteBackConfig", "WriteBackQueue"]
