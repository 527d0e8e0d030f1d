"""Files being written through a mount: a local spool per file, uploaded whole on close.

depot writes whole objects (docs/writes.md), so a file opened for writing is staged in an
anonymous temporary file under ``fuse.staging_dir`` (memory stays bounded: the bytes are on
disk) and uploaded with ``CacheClient.write`` when it is closed (``flush``) or ``fsync``'d.
Writes must be sequential: each one starts where the last ended. A write anywhere else, or into
an existing file that was not truncated, is refused with ``Unsupported`` (``EOPNOTSUPP``):
staging with random writes comes with write-back (issue 7).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from typing import IO

from depot.core.errors import Unsupported


class Staged:
    """The spool of one file being written (shared by every open of it for writing)."""

    def __init__(
        self, path: str, staging_dir: str | None, *, base_size: int, truncated: bool
    ) -> None:
        self.path = path
        self.file: IO[bytes] = tempfile.TemporaryFile(  # noqa: SIM115 (closed by close())
            dir=staging_dir, prefix="depot-write-"
        )
        #: False while the file still is the stored object, untouched (opened without O_TRUNC).
        self.truncated = truncated
        self.size = 0 if truncated else base_size
        #: Bytes (or a truncation) not uploaded yet; a new or truncated file is uploaded on close
        #: even when nothing was written (``touch``, ``: > file``).
        self.dirty = truncated
        #: The last upload failed: its error was reported; release does not try again.
        self.failed = False
        #: The name was removed (unlink, replaced by a rename): nothing is uploaded any more.
        self.unlinked = False
        self.handles = 0
        self.mtime = time.time()
        self.lock = asyncio.Lock()

    def truncate(self) -> None:
        self.file.truncate(0)
        self.size = 0
        self.truncated = True
        self.dirty = True
        self.failed = False
        self.mtime = time.time()

    def write(self, offset: int, data: bytes) -> int:
        if not self.truncated:
            if self.size > 0:
                raise Unsupported(
                    "writing into an existing file is not supported: open it with O_TRUNC "
                    "(depot replaces whole files)",
                    self.path,
                )
            self.truncated = True  # an empty file: writing it from the start is sequential
        if offset != self.size:
            raise Unsupported(
                f"write at offset {offset} of a file written sequentially up to {self.size}: "
                "random writes are not supported",
                self.path,
            )
        count = os.pwrite(self.file.fileno(), data, offset)
        self.size += count
        self.dirty = True
        self.failed = False
        self.mtime = time.time()
        return count

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.file.fileno(), max(0, min(size, self.size - offset)), offset)

    def close(self) -> None:
        self.file.close()


__all__ = ["Staged"]
