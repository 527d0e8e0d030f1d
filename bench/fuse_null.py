"""A null FUSE filesystem: one file served from memory by pyfuse3 (asyncio), nothing else.

The ceiling of a Python FUSE filesystem on this machine, measured beside depot's mount in
``bench/fuse_bench.py``: same library, same loop, same kernel read-ahead, no network and no cache
lookups. Run: ``python bench/fuse_null.py MOUNTPOINT SIZE_MIB`` (foreground; SIGTERM to stop).
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import stat
import sys

import pyfuse3
import pyfuse3.asyncio

from depot.fuse.mounts import set_read_ahead

NAME = b"null.bin"


class NullFs(pyfuse3.Operations):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.data = memoryview(bytearray(size))  # touched once: no page faults while serving

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = ino
        entry.attr_timeout = entry.entry_timeout = 3600
        if ino == pyfuse3.ROOT_INODE:
            entry.st_mode = stat.S_IFDIR | 0o555
        else:
            entry.st_mode = stat.S_IFREG | 0o444
            entry.st_size = self.size
        entry.st_nlink = 1
        return entry

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(2)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.data[off : off + size]  # type: ignore[return-value]

    async def release(self, fh: int) -> None:
        return None


async def main(mount_point: str, size: int) -> None:
    pyfuse3.asyncio.enable()
    pyfuse3.init(NullFs(size), mount_point, {"fsname=depot-null", "ro"})
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pyfuse3.terminate)
    async def when_serving() -> None:
        # The read-ahead is set by the kernel on our INIT reply: raise it after that.
        await asyncio.to_thread(os.stat, mount_point)
        set_read_ahead(mount_point, 1024)
        print("ready", flush=True)

    started = loop.create_task(when_serving())
    try:
        await pyfuse3.main()
        await started
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) * 1024 * 1024))
