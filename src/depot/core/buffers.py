"""Result objects filled in place: a large read lands in the ``bytes`` object its caller gets.

Used by the client (results of reads) and the worker (pages its memory tier holds): copying 4-8
MiB once more, or zero-filling it first, costs about as much as receiving it (BASELINES.md).
"""

from __future__ import annotations

import ctypes
import sys

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
