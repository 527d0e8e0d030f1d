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

Where ``O_DIRECT`` is not supported (tmpfs, some network filesystems) ``open_direct`` returns
None and the caller writes through the page cache.
"""

from __future__ import annotations

import errno
import mmap
import os
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


def open_direct(path: str | os.PathLike[str], fd: int, end: int = 0) -> DirectWriter | None:
    """A direct writer of ``path``, whose ordinary descriptor (for what cannot be written
    directly) is ``fd`` and whose content ends at ``end``; None where the system or the
    filesystem has no ``O_DIRECT``."""
    if not _O_DIRECT:
        return None
    try:
        direct = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW | _O_DIRECT)
    except OSError:
        return None
    return DirectWriter(direct, fd, end)


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

    Bytes given to ``write`` may sit in the buffer until the run ends: ``flush`` before the
    file is read, copied, truncated or fsync'd.
    """

    def __init__(self, direct: int, fd: int, end: int = 0) -> None:
        self._direct = direct
        self._fd = fd
        self._buffer = mmap.mmap(-1, BUFFER)
        self._view = memoryview(self._buffer)
        self._start = 0  # file offset of the buffer's first byte (aligned)
        self._fill = 0  # bytes gathered
        self._last_end = end  # where the last write ended: a write there goes on sequentially
        self.direct_bytes = 0  # written with O_DIRECT, for tests and stats

    @property
    def end(self) -> int:
        """The file offset a write must start at to go on with the current run (-1: none)."""
        return self._start + self._fill if self._fill else -1

    def write(self, data: Any, offset: int) -> bool:
        """Take ``data`` for ``offset``; False: the caller writes it through its descriptor
        (after this call, nothing of an earlier run is left in the buffer).

        A run goes on with a write at its end, and starts with a write that goes on from the
        last one (front to back, whatever the sizes) or a large one (``MIN_RUN``). Its first
        bytes up to an aligned offset are written through the page cache."""
        view = memoryview(data).cast("B")
        if self._fill and offset != self._start + self._fill:
            self.flush()
        if not self._fill:
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
        while view:
            count = min(len(view), BUFFER - self._fill)
            self._view[self._fill : self._fill + count] = view[:count]
            self._fill += count
            view = view[count:]
            if self._fill == BUFFER:
                self._write_out(BUFFER)
        self._last_end = self._start + self._fill
        return True

    def flush(self) -> None:
        """Put every gathered byte in the file: the aligned part directly, the tail through the
        page cache."""
        if not self._fill:
            return
        aligned = self._fill - self._fill % ALIGN
        if aligned:
            self._write_out(aligned)
        if self._fill:
            pwrite_all(self._fd, self._view[: self._fill], self._start)
            self._start += self._fill
            self._fill = 0

    def _write_out(self, count: int) -> None:
        """Write the buffer's first ``count`` (aligned) bytes; keep the rest at its head."""
        done = 0
        if self._direct >= 0:
            try:
                while done < count:
                    written = os.pwrite(self._direct, self._view[done:count], self._start + done)
                    if written <= 0 or written % ALIGN:
                        break  # a short direct write: the rest goes through the page cache
                    done += written
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._close_direct()  # this file takes no direct writes after all
        self.direct_bytes += done
        if done < count:
            pwrite_all(self._fd, self._view[done:count], self._start + done)
        rest = self._fill - count
        if rest:
            self._view[:rest] = self._view[count : self._fill]
        self._start += count
        self._fill = rest

    def discard(self) -> None:
        """Drop what is gathered (the file is being given up)."""
        self._fill = 0

    def _close_direct(self) -> None:
        if self._direct >= 0:
            os.close(self._direct)
            self._direct = -1

    def close(self) -> None:
        """Close the direct descriptor and free the buffer (``flush`` first to keep the
        gathered bytes)."""
        self._close_direct()
        self._fill = 0
        try:
            self._view.release()
            self._buffer.close()
        except BufferError:
            pass  # a slice is still referenced (by a traceback): freed with it


__all__ = ["ALIGN", "BUFFER", "MIN_RUN", "DirectWriter", "open_direct", "pwrite_all"]
