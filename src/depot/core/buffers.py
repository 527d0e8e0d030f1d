"""Large buffers without needless memory work, for the client and the worker.

Result objects filled in place: a large read lands in the ``bytes`` object its caller gets
(the client's results of reads, the pages the worker's memory tier holds); copying 4-8 MiB once
more, or zero-filling it first, costs about as much as receiving it (BASELINES.md). And
``keep_freed_blocks``: the allocator reuses freed large blocks instead of faulting in new memory.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading

log = logging.getLogger(__name__)

# Below this size the copy out of a bytearray is cheaper than the ctypes call that avoids it.
_DIRECT_MIN = 256 * 1024


def _probe_bytes_layout() -> int | None:
    """Offset of a bytes object's data in CPython, verified by a write-and-read-back probe."""
    if sys.implementation.name != "cpython":
        return None
    try:
        offset = bytes.__basicsize__ - 1
        make = ctypes.pythonapi.PyBytes_FromStringAndSize
        make.restype = ctypes.py_object
        make.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
        probe = make(None, 16)
        view = memoryview((ctypes.c_char * 16).from_address(id(probe) + offset)).cast("B")
        view[:] = b"depot-bytes-ok!!"
        if probe != b"depot-bytes-ok!!":
            return None
    except (AttributeError, OSError, TypeError, ValueError):
        return None
    return offset


_BYTES_OFFSET = _probe_bytes_layout()


def alloc_result(size: int) -> tuple[bytes | bytearray, memoryview]:
    """A new result object of ``size`` bytes and a writable view of its storage.

    In CPython, for large sizes, the result is a ``bytes`` object that the caller fills through
    the view before anyone else sees it (what ``io.FileIO.read`` does in C); elsewhere it is a
    ``bytearray``. Either way the bytes are received once and never copied again.
    """
    if _BYTES_OFFSET is not None and size >= _DIRECT_MIN:
        result: bytes = ctypes.pythonapi.PyBytes_FromStringAndSize(None, size)
        array = (ctypes.c_char * size).from_address(id(result) + _BYTES_OFFSET)
        return result, memoryview(array).cast("B")
    buf = bytearray(size)
    return buf, memoryview(buf)


def finish_result(result: bytes | bytearray, view: memoryview, filled: int) -> bytes:
    """``result`` as ``bytes``, cut to the ``filled`` bytes actually received."""
    if isinstance(result, bytes) and filled == len(result):
        return result
    return bytes(view[:filled])


# glibc's mallopt(3) parameters, and the ceiling of its own dynamic mmap threshold on 64-bit.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
KEPT_BLOCK_MAX = 32 * 1024 * 1024
KEPT_FREE_MAX = 2 * KEPT_BLOCK_MAX
_kept_lock = threading.Lock()
_kept: bool | None = None  # None: not asked yet in this process


def keep_freed_blocks(*, one_heap: bool = False) -> bool:
    """Let this process's allocator reuse the memory of freed large blocks (once per process).

    Why, in a client: a ``read(8 MiB)`` loop over HTTP gets a new result object per block, with
    two more in flight. glibc's heap grows by those blocks when a file's read starts, and is
    trimmed back when they are freed at its end (its dynamic trim threshold is twice the largest
    block freed so far), so every file faults ~32 MiB of fresh, kernel-zeroed memory in again:
    8,160 faults per file here, a fifth of the client's CPU for a hot 1 GiB file
    (docs/fsspec.md). This sets the thresholds glibc's own rule reaches after a 32 MiB block is
    freed (mmap 32 MiB, trim 64 MiB): freed blocks stay mapped for the next file, at most 64 MiB
    of free memory per heap.
    In a worker: the pages a cold read fetches from the under store, new blocks each
    (``worker.keep_freed_blocks``), made by the under-store client's own threads. glibc gives
    such threads heaps of their own, and unmaps one whenever it empties, whatever the
    thresholds: the worker asks for ``one_heap`` (every thread allocates from the main heap,
    whose freed blocks are kept), as early as it can, since a thread keeps the heap it has.
    Not for a client, which lives in its user's process. The first call decides. Returns
    whether the setting is in effect (glibc only).
    """
    global _kept
    if _kept is not None:  # asked before: no lock on the read path
        return _kept
    with _kept_lock:
        if _kept is None:
            _kept = _set_malloc_thresholds(KEPT_BLOCK_MAX, KEPT_FREE_MAX, 1 if one_heap else 0)
        return _kept


def _set_malloc_thresholds(mmap_threshold: int, trim_threshold: int, heaps: int) -> bool:
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
    if heaps and mallopt(_M_ARENA_MAX, heaps) != 1:
        return False
    log.debug("malloc thresholds set: mmap %d, trim %d, heaps %s", mmap_threshold,
              trim_threshold, heaps or "glibc's own")
    return True
