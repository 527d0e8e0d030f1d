"""Request bodies for writes: bytes, files and async streams turned into a replayable ``Upload``.

A write needs its length up front (the worker requires ``Content-Length``) and must be able to
start its body again if the first worker refused the connection. Bytes and seekable files are
read in place; anything else (an async stream, a pipe) is spooled first: up to ``SPOOL_MEMORY``
bytes in memory, the rest in a temporary file, so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import tempfile
from collections.abc import AsyncIterable, AsyncIterator
from typing import IO, Any

from depot.core.errors import InvalidArgument
from depot.core.transport import BodyChunk, Upload

CHUNK = 1024 * 1024
SPOOL_MEMORY = 8 * 1024 * 1024

WriteSource = bytes | bytearray | memoryview | AsyncIterable[bytes] | IO[bytes] | Any


class UploadSource(contextlib.AbstractAsyncContextManager["UploadSource"]):
    """An ``Upload`` over a caller's data, and the spool file to remove afterwards."""

    def __init__(self, upload: Upload, spool: IO[bytes] | None = None) -> None:
        self.upload = upload
        self._spool = spool

    async def __aexit__(self, *exc: object) -> None:
        if self._spool is not None:
            self._spool.close()


def _from_buffer(data: bytes | bytearray | memoryview) -> Upload:
    view = memoryview(data).cast("B")

    async def chunks() -> AsyncIterator[BodyChunk]:
        for pos in range(0, view.nbytes, CHUNK):
            yield view[pos : pos + CHUNK]

    return Upload(view.nbytes, chunks)


def _seekable(file: Any) -> bool:
    try:
        return bool(file.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _from_file(file: Any, start: int, length: int) -> Upload:
    async def chunks() -> AsyncIterator[BodyChunk]:
        await asyncio.to_thread(file.seek, start)
        left = length
        while left > 0:
            data = await asyncio.to_thread(file.read, min(CHUNK, left))
            if not data:
                raise InvalidArgument(f"the file ended {left} bytes early (did it shrink?)")
            left -= len(data)
            yield bytes(data)

    return Upload(length, chunks)


async def open_source(data: WriteSource) -> UploadSource:
    """An ``UploadSource`` for ``data``: bytes-like, a binary file object, or an async iterable
    of bytes."""
    if isinstance(data, bytes | bytearray | memoryview):
        return UploadSource(_from_buffer(data))
    if hasattr(data, "read"):
        file: Any = data
        if _seekable(file):
            start = await asyncio.to_thread(file.tell)
            end = await asyncio.to_thread(file.seek, 0, io.SEEK_END)
            return UploadSource(_from_file(file, start, end - start))
        return await _spool(_read_chunks(file))
    if isinstance(data, AsyncIterable):
        return await _spool(data)
    raise InvalidArgument(
        f"cannot write a {type(data).__name__}: give bytes, a binary file or an async iterable"
    )


async def _read_chunks(file: Any) -> AsyncIterator[bytes]:
    while True:
        data = await asyncio.to_thread(file.read, CHUNK)
        if not data:
            return
        yield bytes(data)


async def _spool(stream: AsyncIterable[bytes]) -> UploadSource:
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)  # noqa: SIM115
    try:
        size = 0
        async for chunk in stream:
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise InvalidArgument(f"a write stream yielded a {type(chunk).__name__}, not bytes")
            size += len(chunk)
            await asyncio.to_thread(spool.write, chunk)
    except BaseException:
        spool.close()
        raise
    return UploadSource(_from_file(spool, 0, size), spool)


__all__ = ["UploadSource", "WriteSource", "open_source"]
