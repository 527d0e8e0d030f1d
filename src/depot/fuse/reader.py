"""File data in the mount process: read-ahead for sequential readers, segment prefetch for random ones.

The kernel asks for at most 1 MiB per ``read`` (with ``read_ahead_kb=1024``), usually one or two
requests at a time per reader. Answering each with one worker round trip would leave the pipe
idle most of the time, so:

- **Sequential readers** (a read that starts where the last one on the same open file ended) get
  read-ahead: whole blocks (>= 4 MiB, page-aligned) beyond the request are fetched in parallel
  into pooled, pre-touched buffers, and later requests are answered straight out of those
  buffers (the reply is a ``memoryview`` of the block: no copy in the mount process).
- **Random readers** (mmap page faults over a model file, random 4 KiB reads) are served with
  exact ranges at first; once a file has seen ``random_threshold`` of them, every further miss
  fetches the whole aligned segment around it (``prefetch_segment``, the whole file when it is
  small) in large parallel reads, and the blocks are pushed into the kernel page cache
  (``notify_store``) as they arrive, so the following faults in that segment never leave the
  kernel.
- Everything else goes out as one exact range received straight into a pooled scratch buffer.

(Pushing the read-ahead blocks of sequential readers into the page cache as well was measured
and brought nothing: the kernel's own read-ahead asks for those pages anyway, and the bytes were
then copied twice.)

All blocks of all files share one memory budget (``fuse.memory``): finished blocks are kept in
LRU order, consumed and already-stored ones are evicted first, and a block being read is pinned
so its buffer is never reused under a reader. Everything runs on the event loop thread; the only
other thread is the one that makes the (blocking) kernel cache calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from depot.client.buffers import BufferPool
from depot.client.client import CacheClient

if TYPE_CHECKING:
    from depot.fuse.inodes import Inode

log = logging.getLogger(__name__)

MiB = 1024 * 1024
BLOCK_MIN = 4 * MiB
# The largest request the kernel sends (max_pages 256): direct reads up to this use scratch buffers.
SCRATCH_SIZE = 1 * MiB
# A read is sequential if it starts inside, or at most this far past, the previous one.
SEQ_SLACK = 1 * MiB
# Reads up to this size that miss count towards a file's random-read pattern.
RANDOM_MAX = 256 * 1024

Reply = bytes | bytearray | memoryview
# (file data, block) -> a future that is done when the kernel has a copy (or None: not stored).
StoreFn = Callable[["FileData", "Block"], "asyncio.Future[None] | None"]


class Block:
    """``[start, end)`` of one version of a file, in a buffer of the cache; filled on the loop."""

    __slots__ = (
        "buf",
        "count",
        "data",
        "discarded",
        "end",
        "future",
        "index",
        "pins",
        "prefetched",
        "start",
    )

    def __init__(self, data: FileData, index: int, start: int, end: int, buf: bytearray) -> None:
        self.data = data
        self.index = index
        self.start = start
        self.end = end
        self.buf: bytearray | None = buf
        self.future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.count = 0
        self.pins = 0
        self.discarded = False
        self.prefetched = False

    @property
    def view(self) -> memoryview:
        assert self.buf is not None
        return memoryview(self.buf)[: self.end - self.start]

    @property
    def finished(self) -> bool:
        return self.future.done()


class BlockCache:
    """The blocks of every file of a mount under one memory budget."""

    def __init__(self, block_size: int, memory: int) -> None:
        self.block_size = block_size
        self.limit = memory // block_size
        self.pool = BufferPool(block_size, max(1, self.limit))
        self.live = 0
        # Finished blocks, least recently used first: the candidates for eviction.
        self._lru: OrderedDict[Block, None] = OrderedDict()

    def alloc(self) -> bytearray | None:
        """A block buffer, evicting the least recently used finished block if the budget is full."""
        if self.live >= self.limit and not self._evict_one():
            return None
        self.live += 1
        return self.pool.take()

    def _evict_one(self) -> bool:
        for block in self._lru:
            if block.pins == 0:
                block.data.discard(block)
                return True
        return False

    def finished(self, block: Block) -> None:
        self._lru[block] = None

    def touch(self, block: Block) -> None:
        if block in self._lru:
            self._lru.move_to_end(block)

    def consumed(self, block: Block) -> None:
        """Evict this block first: its bytes were used up, or are in the kernel page cache."""
        if block in self._lru:
            self._lru.move_to_end(block, last=False)

    def free(self, block: Block) -> None:
        self._lru.pop(block, None)
        if block.buf is not None:
            self.pool.give(block.buf)
            block.buf = None
            self.live -= 1


class FileData:
    """The blocks the mount holds for one version of one file, and how it is being read."""

    def __init__(self, cache: BlockCache, inode: Inode, version: str, size: int) -> None:
        self.cache = cache
        self.inode = inode
        self.path = inode.path
        self.version = version
        self.size = size
        self.blocks: dict[int, Block] = {}
        self.random_misses = 0
        self.random_mode = False
        self.segments: set[int] = set()
        self.closed = False

    def discard(self, block: Block) -> None:
        """Forget ``block``; its buffer goes back once no fetch or reader uses it."""
        if self.blocks.get(block.index) is block:
            del self.blocks[block.index]
        block.discarded = True
        if block.finished and block.pins == 0:
            self.cache.free(block)

    def close(self) -> None:
        self.closed = True
        for block in list(self.blocks.values()):
            self.discard(block)


class Handle:
    """One open file: the version it pinned at open, and where its reader was last."""

    __slots__ = (
        "ahead_end",
        "data",
        "fh",
        "inode",
        "last_end",
        "last_start",
        "path",
        "size",
        "version",
    )

    def __init__(
        self, fh: int, inode: Inode, version: str, size: int, data: FileData | None
    ) -> None:
        self.fh = fh
        self.inode = inode
        self.path = inode.path
        self.version = version
        self.size = size
        self.data = data
        self.last_start = -1
        self.last_end = -1
        # The end of the read-ahead window started for this reader.
        self.ahead_end = -1

    def sequential(self, off: int) -> bool:
        """Whether a read at ``off`` continues this reader's stream (and so gets read-ahead)."""
        if self.last_end < 0:
            return off == 0
        if self.last_start <= off <= self.last_end + SEQ_SLACK:
            return True
        # Past the last request but inside this reader's read-ahead window: the pages in between
        # were already in the kernel page cache, so the kernel did not ask for them.
        return self.ahead_end > self.last_end and self.last_end <= off <= self.ahead_end + SEQ_SLACK


class Reader:
    """Answers the ``read`` requests of a mount (see the module docstring)."""

    def __init__(
        self,
        client: CacheClient,
        cache: BlockCache,
        *,
        read_ahead: int,
        prefetch: bool,
        prefetch_segment: int,
        random_threshold: int,
        parallelism: int,
        store: StoreFn | None = None,
    ) -> None:
        self.client = client
        self.cache = cache
        # A window that does not fit the budget would evict its own blocks before they are read.
        self.read_ahead = min(read_ahead, cache.limit * cache.block_size // 4)
        self.prefetch = prefetch and cache.limit > 0
        size = cache.block_size
        self.segment = max(size, -(-prefetch_segment // size) * size)
        self.random_threshold = random_threshold
        self.store = store
        self.scratch = BufferPool(SCRATCH_SIZE, 64)
        self._fetches = asyncio.Semaphore(max(2, 2 * parallelism))
        self._tasks: set[asyncio.Task[None]] = set()
        # Counters for tests and logs.
        self.stats = {
            "direct_reads": 0,
            "block_reads": 0,
            "blocks_fetched": 0,
            "segments_prefetched": 0,
            "blocks_stored": 0,
            "largest_read": 0,
        }

    # the request ------------------------------------------------------------------------------
    async def read(self, handle: Handle, off: int, size: int) -> Reply:
        if size > self.stats["largest_read"]:
            self.stats["largest_read"] = size
        end = min(off + size, handle.size)
        if end <= off:
            return b""
        sequential = handle.sequential(off)
        handle.last_start, handle.last_end = off, end
        data = handle.data
        if data is None or data.closed or self.cache.limit == 0:
            return await self._direct(handle, off, end)
        block_size = self.cache.block_size
        first, last = off // block_size, (end - 1) // block_size
        blocks = data.blocks
        held: list[Block] = []
        for index in range(first, last + 1):
            found = blocks.get(index)
            if found is None:
                held = []
                break
            held.append(found)
        present = bool(held)
        for block in held:
            block.pins += 1  # not evicted by the read-ahead below, not reused under us
        try:
            if sequential:
                if self.read_ahead > 0:
                    handle.ahead_end = max(handle.ahead_end, self._read_ahead(data, end))
            else:
                handle.ahead_end = -1  # a jump: the stream (if any) is over
                if not present:
                    # Small reads only: a jump of a reader that then goes on sequentially (a
                    # loader moving to the next tensor) arrives as a large read-around request.
                    if end - off <= RANDOM_MAX:
                        data.random_misses += 1
                    if self.prefetch and (
                        data.random_mode or data.random_misses >= self.random_threshold
                    ):
                        if not data.random_mode:
                            data.random_mode = True
                            log.debug("random reads on %s: prefetching segments", data.path)
                        self._prefetch_segment(data, off)
            if present:
                return await self._from_blocks(handle, held, off, end, sequential)
            return await self._direct(handle, off, end)
        finally:
            for block in held:
                self._unpin(block)

    async def _direct(self, handle: Handle, off: int, end: int) -> Reply:
        """One exact range, received into a scratch buffer that is reused once the reply is sent."""
        self.stats["direct_reads"] += 1
        length = end - off
        if length > SCRATCH_SIZE:
            buf = bytearray(length)
            count = await self.client.read_range_into(
                handle.path, off, end, memoryview(buf), version=handle.version
            )
            return memoryview(buf)[:count]
        buf = self.scratch.take()
        try:
            view = memoryview(buf)
            count = await self.client.read_range_into(
                handle.path, off, end, view[:length], version=handle.version
            )
            return view[:count]
        finally:
            # The reply is written to the kernel right after this coroutine returns, in the same
            # step of the same task; the buffer goes back to the pool on the next turn of the loop.
            asyncio.get_running_loop().call_soon(self.scratch.give, buf)

    async def _from_blocks(
        self, handle: Handle, blocks: list[Block], off: int, end: int, sequential: bool
    ) -> Reply:
        """Serve ``[off, end)`` from ``blocks`` (pinned by the caller, in order)."""
        self.stats["block_reads"] += 1
        if len(blocks) == 1:
            block = blocks[0]
            count = await self._wait(block)
            if count is None:
                return await self._direct(handle, off, end)
            if sequential and block.start + count <= end:
                self.cache.consumed(block)
            else:
                self.cache.touch(block)
            lo = off - block.start
            hi = min(end - block.start, count)
            # A view, not a copy: the reply goes out before anything else runs on the loop.
            return block.view[lo:hi] if hi > lo else b""
        # The rare request that spans blocks: copy the pieces into one reply.
        out = bytearray(end - off)
        pos = off
        for block in blocks:
            count = await self._wait(block)
            if count is None:  # its fetch was dropped: read the rest directly
                view = memoryview(out)[pos - off :]
                pos += await self.client.read_range_into(
                    handle.path, pos, end, view, version=handle.version
                )
                break
            hi = min(end, block.start + count)
            if hi > pos:
                out[pos - off : hi - off] = block.view[pos - block.start : hi - block.start]
                pos = hi
            if block.start + count < block.end:
                break  # the file ended early
        del out[pos - off :]
        return out

    async def _wait(self, block: Block) -> int | None:
        """The bytes in ``block`` once filled; None if its fetch was cancelled or dropped.

        The caller holds a pin on the block, so its buffer stays put.
        """
        if not block.future.done():
            try:
                await asyncio.shield(block.future)
            except asyncio.CancelledError:
                if not block.future.cancelled():
                    raise  # this request itself was cancelled
        if block.future.cancelled() or block.buf is None:
            return None
        return block.future.result()  # raises the fetch's error

    def _unpin(self, block: Block) -> None:
        block.pins -= 1
        if block.pins == 0 and block.discarded and block.finished:
            self.cache.free(block)

    # fetching blocks --------------------------------------------------------------------------
    def _read_ahead(self, data: FileData, end: int) -> int:
        """Keep the blocks of ``[end, end + read_ahead)`` in flight; the end actually covered."""
        size = self.cache.block_size
        stop = min(data.size, end + self.read_ahead)
        covered = end
        for index in range(end // size, (stop - 1) // size + 1 if stop > end else 0):
            if index not in data.blocks and self._start(data, index) is None:
                break
            covered = min(data.size, (index + 1) * size)
        return covered

    def _prefetch_segment(self, data: FileData, off: int) -> None:
        """Fetch the aligned segment around ``off`` (the whole file if it is small)."""
        size = self.cache.block_size
        if data.size <= 2 * self.segment:
            key, lo, hi = -1, 0, data.size
        else:
            key = off // self.segment
            lo, hi = key * self.segment, min(data.size, (key + 1) * self.segment)
        if key in data.segments:
            return
        complete = True
        started = 0
        for index in range(lo // size, (hi - 1) // size + 1):
            if index in data.blocks:
                continue
            block = self._start(data, index)
            if block is None:
                complete = False  # the budget is full: the next miss here tries again
                break
            block.prefetched = True
            started += 1
        if complete:
            data.segments.add(key)
        if started:
            self.stats["segments_prefetched"] += 1

    def _start(self, data: FileData, index: int) -> Block | None:
        size = self.cache.block_size
        start = index * size
        if start >= data.size:
            return None
        buf = self.cache.alloc()
        if buf is None:
            return None
        block = Block(data, index, start, min(data.size, start + size), buf)
        data.blocks[index] = block
        task = asyncio.get_running_loop().create_task(self._fill(block))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return block

    async def _fill(self, block: Block) -> None:
        data = block.data
        try:
            async with self._fetches:
                if block.discarded:
                    raise asyncio.CancelledError
                count = await self.client.read_range_into(
                    data.path, block.start, block.end, block.view, version=data.version
                )
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                block.future.cancel()
            else:
                block.future.set_exception(exc)
                block.future.exception()  # retrieved: a reader that waits on it reports it
                log.debug("block %d of %s failed: %s", block.index, data.path, exc)
            data.discard(block)
            if not isinstance(exc, Exception):
                raise
            return
        self.stats["blocks_fetched"] += 1
        block.count = count
        block.future.set_result(count)
        if block.discarded:
            if block.pins == 0:
                self.cache.free(block)
            return
        self.cache.finished(block)
        if block.prefetched:
            self._push(block)

    def _push(self, block: Block) -> None:
        """Hand a filled block to the kernel page cache (pinned until the kernel has a copy)."""
        if self.store is None or block.buf is None or block.discarded:
            return
        if block.count != block.end - block.start:
            return
        stored = self.store(block.data, block)
        if stored is not None:
            self.stats["blocks_stored"] += 1
            block.pins += 1
            stored.add_done_callback(lambda _: self._stored(block))

    def _stored(self, block: Block) -> None:
        self._unpin(block)
        self.cache.consumed(block)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


__all__ = ["BLOCK_MIN", "Block", "BlockCache", "FileData", "Handle", "Reader"]
