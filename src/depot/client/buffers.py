"""Buffers for the read path: results received without a copy, and pooled read-ahead blocks.

Measured facts drive this module (see BASELINES.md): on these VMs, first-touching fresh memory
runs at 0.6-2.5 GB/s in 4 KiB page faults (slower than the network), and copying a large result
once more costs as much again. So large results are received straight into the ``bytes`` object
handed to the caller (``depot.core.buffers.alloc_result``), and read-ahead blocks come from a
pool of buffers that were touched once and are reused. (Asking for transparent huge pages for large results was measured too: 2.2 GB/s
when free huge pages exist, but 0.45 GB/s when the kernel must compact memory first, so no.)
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading

log = logging.getLogger(__name__)

# glibc's mallopt(3) parameters, and the ceiling of its own dynamic mmap threshold on 64-bit.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
KEPT_BLOCK_MAX = 32 * 1024 * 1024
KEPT_FREE_MAX = 2 * KEPT_BLOCK_MAX
_kept_lock = threading.Lock()
_kept: bool | None = None  # None: not asked yet in this process


def keep_freed_blocks() -> bool:
    """Let this process's allocator reuse the memory of freed result blocks (once per process).

    Why: a ``read(8 MiB)`` loop over HTTP gets a new result object per block, with two more in
    flight. glibc's heap grows by those blocks when a file's read starts, and is trimmed back
    when they are freed at its end (its dynamic trim threshold is twice the largest block freed
    so far), so every file faults ~32 MiB of fresh, kernel-zeroed memory in again: 8,160 faults
    per file here, a fifth of the client's CPU for a hot 1 GiB file (docs/fsspec.md). This sets
    the thresholds glibc's own rule reaches after a 32 MiB block is freed (mmap 32 MiB, trim
    64 MiB): freed blocks stay mapped for the next file, at most 64 MiB of free memory per heap.
    Returns whether the setting is in effect (glibc only).
    """
    global _kept
    if _kept is not None:  # asked before: no lock on the read path
        return _kept
    with _kept_lock:
        if _kept is None:
            _kept = _set_malloc_thresholds(KEPT_BLOCK_MAX, KEPT_FREE_MAX)
        return _kept


def _set_malloc_thresholds(mmap_threshold: int, trim_threshold: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the symbols this process has loaded: its C library's
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):
        return False  # musl has mallopt too, but not these thresholds
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: setting either one turns glibc's dynamic adjustment off.
    if mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1:
        return False
    if mallopt(_M_TRIM_THRESHOLD, trim_threshold) != 1:
        return False
    log.debug("malloc thresholds set: mmap %d, trim %d", mmap_threshold, trim_threshold)
    return True


class BufferPool:
    """Fixed-size, pre-touched buffers, reused across files of one filesystem.

    Thread-safe: buffers are taken by the reading thread and may be given back from the IO loop.
    At most ``max_buffers`` idle buffers are kept; extra ones are left to the allocator.
    """

    def __init__(self, block_size: int, max_buffers: int) -> None:
        self.block_size = block_size
        self.max_buffers = max_buffers
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self) -> bytearray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return bytearray(self.block_size)  # zero-filled, so every page is touched once here

    def give(self, buf: bytearray) -> None:
        if len(buf) != self.block_size:
            return
        with self._lock:
            if len(self._free) < self.max_buffers:
                self._free.append(buf)

    def __len__(self) -> int:
        return len(self._free)
