"""Writes of staging files that bypass the page cache (``O_DIRECT``).

Why: a checkpoint staged through the page cache needs a fresh cache page for every 4 KiB it
writes, evicts data the cache was holding for readers, and is then written to the disk by the
``fsync`` of its acknowledgement anyway. On a VM whose freed memory goes back to the host,
filling fresh pages is the slowest part of a large write. Direct writes go from one reused,
aligned buffer to the disk at the disk's own rate, and the ``fsync`` that follows has little
left to do.

``DirectWriter`` gathers sequential writes (front to back, whatever the size and alignment of
each piece) in that buffer and writes it out in aligned blocks. Anything else (scattered writes,
the unaligned head and tail of a run) goes through the ordinary descriptor of the same file, so
the page cache, as before. Reads stay coherent: the
kernel drops cached pages of a range a direct write covers, and ``flush`` puts the gathered
bytes in the file before anyone reads it.

Where ``O_DIRECT`` is not supported (tmpfs, some network filesystems) ``DirectIO.open`` returns
None and the caller writes through the page cache.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

#: Offsets, lengths and buffer addresses of direct writes are multiples of this (the largest
#: logical block size of common disks; an mmap buffer is page aligned).
ALIGN = 4096
#: A run is gathered only from a first write of at least this much: below it, small files and
#: scattered writes go through the page cache, where they cost less than a device round trip.
MIN_RUN = 256 * 1024
#: The aligned buffer a run is gathered in (a multiple of ALIGN).
BUFFER = 4 * 1024 * 1024

_O_DIRECT = getattr(os, "O_DIRECT", 0)


class DirectIO:
    """What the direct writers of one client or mount share: idle aligned buffers (touched once,
    reused from file to file, at most ``idle_buffers`` kept) and the threads that write full
    buffers behind the writers. Thread-safe; ``close`` when done."""

    def __init__(self, idle_buffers: int = 8, threads: int = 2) -> None:
        self.idle_buffers = idle_buffers
        self.threads = threads
        self._idle: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._closed = False

    def open(self, path: str | os.PathLike[str], fd: int, end: int = 0) -> DirectWriter | None:
        """A direct writer of ``path``, whose ordinary descriptor (for what cannot be written
        directly) is ``fd`` and whose content ends at ``end``; None where the system or the
        filesystem has no ``O_DIRECT``."""
        if not _O_DIRECT or self._closed:
            return None
        try:
            direct = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW | _O_DIRECT)
        except OSError:
            return None
        return DirectWriter(self, direct, fd, end)

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return mmap.mmap(-1, BUFFER)

    def give(self, buffer: mmap.mmap) -> None:
        with self._lock:
            if len(self._idle) < self.idle_buffers and not self._closed:
                self._idle.append(buffer)
                return
        _free(buffer)

    def submit(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        """Run ``fn(*args)`` on a writing thread (inline once closed)."""
        with self._lock:
            if not self._closed:
                if self._executor is None or self._pid != os.getpid():
                    # First use, or a forked child (a data loader's worker): the parent's
                    # threads do not exist here.
                    self._executor = ThreadPoolExecutor(
                        self.threads, thread_name_prefix="depot-direct"
                    )
                    self._pid = os.getpid()
                return self._executor.submit(fn, *args)
        done: Future[None] = Future()
        try:
            fn(*args)
        except BaseException as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)
        return done

    def close(self) -> None:
        """Wait for the writes behind, stop the threads, free the idle buffers."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
            idle, self._idle = self._idle, []
        if executor is not None:
            executor.shutdown()
        for buffer in idle:
            _free(buffer)


def takes_direct_io(directory: str | os.PathLike[str]) -> bool:
    """Whether files in ``directory`` can be opened with ``O_DIRECT`` (tmpfs and some network
    filesystems refuse it). Creates and removes a probe file there."""
    if not _O_DIRECT:
        return False
    probe = os.path.join(directory, f".depot-direct-probe.{os.getpid()}")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | _O_DIRECT, 0o600))
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return True


def _free(buffer: mmap.mmap) -> None:
    try:
        buffer.close()
    except BufferError:
        pass  # a slice of it is still referenced (by a traceback): unmapped with it


def pwrite_all(fd: int, data: Any, offset: int) -> None:
    """``pwrite`` all of ``data`` (any bytes-like object) at ``offset``."""
    data = memoryview(data).cast("B")
    while data:
        count = os.pwrite(fd, data, offset)
        data = data[count:]
        offset += count


class DirectWriter:
    """Sequential runs of one file written with ``O_DIRECT`` (blocking calls, one thread at a
    time). ``fd`` is the caller's ordinary descriptor of the file; the caller keeps owning it.

    A full buffer is written out by a thread of its own while the next one fills (two buffers):
    the caller's copy of the next bytes overlaps the disk's write of the last ones. An error of
    that write is raised by the next call. Bytes given to ``write`` may sit in a buffer until
    the run ends: ``flush`` before the file is read, copied, truncated or fsync'd.
    """

    def __init__(self, io: DirectIO, direct: int, fd: int, end: int = 0) -> None:
        self._io = io
        self._direct = direct
        self._fd = fd
        self._buffers: list[mmap.mmap] = []
        self._views: list[memoryview] = []
        self._view = memoryview(b"")  # the buffer being filled (taken when a run starts)
        self._start = 0  # file offset of its first byte (aligned)
        self._fill = 0  # bytes gathered in it
        self._run = False  # a run is going on: the next write at its end goes on with it
        self._last_end = end  # where the last write ended: a write there goes on sequentially
        self._pending: Future[None] | None = None  # the other buffer being written out
        self.direct_bytes = 0  # written with O_DIRECT, for tests and stats

    @property
    def end(self) -> int:
        """The file offset a write must start at to go on with the current run (-1: none)."""
        return self._start + self._fill if self._run else -1

    def write(self, data: Any, offset: int) -> bool:
        """Take ``data`` for ``offset``; False: the caller writes it through its descriptor
        (after this call, nothing of an earlier run is left in a buffer).

        A run goes on with a write at its end, and starts with a write that goes on from the
        last one (front to back, whatever the sizes) or a large one (``MIN_RUN``). Its first
        bytes up to an aligned offset are written through the page cache."""
        view = memoryview(data).cast("B")
        if self._run and offset != self._start + self._fill:
            self.flush()
        if not self._run:
            self._wait()  # nothing written elsewhere may land before a write in flight
            head = -offset % ALIGN
            if (
                self._direct < 0
                or (offset != self._last_end and len(view) < MIN_RUN)
                or head >= len(view)
            ):
                self._last_end = offset + len(view)
                return False
            if head:
                pwrite_all(self._fd, view[:head], offset)
                offset += head
                view = view[head:]
            self._start = offset
            self._run = True
            if not self._buffers:
                self._add_buffer()
                self._view = self._views[0]
        while view:
            count = min(len(view), BUFFER - self._fill)
            self._view[self._fill : self._fill + count] = view[:count]
            self._fill += count
            view = view[count:]
            if self._fill == BUFFER:
                self._write_behind()
        self._last_end = self._start + self._fill
        return True

    def flush(self) -> None:
        """Put every gathered byte in the file (the aligned part directly, the tail through the
        page cache) and wait for the writes in flight."""
        self._wait()
        fill = self._fill
        if fill:
            aligned = fill - fill % ALIGN
            self._write_block(self._view, self._start, aligned)
            pwrite_all(self._fd, self._view[aligned:fill], self._start + aligned)
            self._start += fill
            self._fill = 0
        self._run = False

    def _write_behind(self) -> None:
        """Hand the full buffer to the writing thread and go on in the other one."""
        self._wait()
        if len(self._buffers) < 2:
            self._add_buffer()
        full, start = self._view, self._start
        self._pending = self._io.submit(self._write_block, full, start, BUFFER)
        self._view = self._views[1] if full is self._views[0] else self._views[0]
        self._start += BUFFER
        self._fill = 0

    def _add_buffer(self) -> None:
        buffer = self._io.take()
        self._buffers.append(buffer)
        self._views.append(memoryview(buffer))

    def _wait(self) -> None:
        """Wait for the write in flight; raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write_block(self, view: memoryview, start: int, count: int) -> None:
        """Write ``view[:count]`` (aligned) at ``start``: directly, or what the disk refused
        through the page cache."""
        done = 0
        direct = self._direct
        if direct >= 0:
            try:
                while done < count:
                    written = os.pwrite(direct, view[done:count], start + done)
                    if written <= 0 or written % ALIGN:
                        break  # a short direct write: the rest goes through the page cache
                    done += written
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct = -1  # this file takes no direct writes after all
                os.close(direct)
        self.direct_bytes += done
        if done < count:
            pwrite_all(self._fd, view[done:count], start + done)

    def close(self) -> None:
        """Close the direct descriptor and free the buffers (``flush`` first to keep the
        gathered bytes; a write in flight is waited for, its error dropped)."""
        with contextlib.suppress(OSError):
            self._wait()
        if self._direct >= 0:
            os.close(self._direct)
            self._direct = -1
        self._fill = 0
        self._run = False
        self._view = memoryview(b"")
        for view, buffer in zip(self._views, self._buffers, strict=True):
            view.release()
            self._io.give(buffer)
        self._views.clear()
        self._buffers.clear()


__all__ = [
    "ALIGN", "BUFFER", "MIN_RUN", "DirectIO", "DirectWriter", "pwrite_all", "takes_direct_io"
]
