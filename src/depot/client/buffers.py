"""Buffers for the read path: results received without a copy, and pooled read-ahead blocks.

Measured facts drive this module (see BASELINES.md): on these VMs, first-touching fresh memory
runs at 0.6-2.5 GB/s in 4 KiB page faults (slower than the network), and copying a large result
once more costs as much again. So large results are received straight into the ``bytes`` object
handed to the caller (``depot.core.buffers.alloc_result``), and read-ahead blocks come from a
pool of buffers that were touched once and are reused (the allocator's side of it,
``keep_freed_blocks``, is in ``depot.core.buffers``). (Asking for transparent huge pages for large results was measured too: 2.2 GB/s
when free huge pages exist, but 0.45 GB/s when the kernel must compact memory first, so no.)
"""

from __future__ import annotations

import threading


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
