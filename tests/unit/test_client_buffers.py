"""Result buffers and the read-ahead block pool of the client."""

from __future__ import annotations

import asyncio
import platform
import subprocess
import sys

import pytest

from depot.client.buffers import BufferPool
from depot.client.fs import _Block, _MemoryBudget
from depot.core.buffers import alloc_result, finish_result


@pytest.mark.parametrize("size", [0, 1, 4096, 256 * 1024, 9 * 1024 * 1024 + 7])
def test_alloc_result_fills_a_bytes_object(size: int) -> None:
    result, view = alloc_result(size)
    assert len(view) == size and not view.readonly
    pattern = bytes(i % 253 for i in range(min(size, 1 << 16)))
    for off in range(0, size, len(pattern) or 1):
        view[off : off + len(pattern)] = pattern[: size - off]
    out = finish_result(result, view, size)
    assert type(out) is bytes and len(out) == size
    assert out[: len(pattern)] == pattern[:size]
    assert hash(out) == hash(bytes(out))  # a real, immutable bytes object from here on


def test_results_are_independent_and_can_be_cut_short() -> None:
    size = 1 << 20
    first, first_view = alloc_result(size)
    second, second_view = alloc_result(size)
    first_view[:] = b"a" * size
    second_view[:] = b"b" * size
    assert finish_result(first, first_view, size) == b"a" * size
    assert finish_result(second, second_view, 10) == b"b" * 10


def test_pool_reuses_bounded_buffers() -> None:
    pool = BufferPool(block_size=4096, max_buffers=2)
    a, b, c = pool.take(), pool.take(), pool.take()
    assert len(a) == 4096 and a == bytes(4096)
    for buf in (a, b, c):
        pool.give(buf)
    assert len(pool) == 2
    pool.give(bytearray(100))  # wrong size: never handed out as a block
    assert len(pool) == 2
    assert pool.take() is b and pool.take() is a


@pytest.mark.parametrize("order", ["finish-then-drop", "drop-then-finish"])
def test_block_buffer_returns_to_pool_exactly_once(order: str) -> None:
    pool = BufferPool(block_size=4096, max_buffers=8)
    block = _Block(0, 4096, pool)
    steps = (
        [block.finished, block.drop]
        if order == "finish-then-drop"
        else [block.drop, block.finished]
    )
    steps[0]()
    assert len(pool) == 0  # still owned by the other side
    steps[1]()
    assert len(pool) == 1 and pool.take() is block.buf


async def test_transfer_budget_waits_for_memory_to_come_back() -> None:
    budget = _MemoryBudget(100)
    assert await budget.take(60) == 60
    waiter = asyncio.ensure_future(budget.take(60))
    await asyncio.sleep(0.01)
    assert not waiter.done()  # only 40 bytes free
    await budget.give(60)
    assert await asyncio.wait_for(waiter, 1) == 60
    await budget.give(60)
    assert await asyncio.wait_for(budget.take(10**9), 1) == 100  # never more than the total


_FAULTS_SCRIPT = """
import sys
from depot.core.buffers import alloc_result, keep_freed_blocks

def faults():
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])

def read_file(blocks):
    held = []  # three blocks alive at a time, as a read loop with read-ahead keeps them
    for _ in range(blocks):
        result, view = alloc_result(8 << 20)
        view[::4096] = b"x" * len(view[::4096])
        held.append(result)
        if len(held) > 3:
            held.pop(0)

if sys.argv[1] == "keep":
    assert keep_freed_blocks() is True
    assert keep_freed_blocks() is True  # once per process, same answer
read_file(8)  # the heap grows to what a file's read needs
before = faults()
for _ in range(4):
    read_file(8)
print(faults() - before)
"""


def _count_in_process(script: str, mode: str) -> int:
    """The number ``script`` prints, run in a process of its own (allocator settings are per
    process)."""
    out = subprocess.run(
        [sys.executable, "-c", script, mode], capture_output=True, text=True, check=True, timeout=60
    )
    return int(out.stdout)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's malloc thresholds",
)
def test_kept_freed_blocks_are_reused_without_page_faults() -> None:
    """Files read in 8 MiB results, three alive at a time: with glibc's default thresholds the
    heap is trimmed when a file's last blocks are freed, and the next file faults its blocks'
    pages in again; with the thresholds set, the freed memory is reused. Each run is a process
    of its own: the setting is per process."""
    plain = _count_in_process(_FAULTS_SCRIPT, "plain")
    kept = _count_in_process(_FAULTS_SCRIPT, "keep")
    assert plain >= 4 * 2048, plain  # the default: at least a block of fresh pages per file
    assert kept <= 64, kept


_HEAPS_SCRIPT = """
import ctypes, os, sys, tempfile, threading
from depot.core.buffers import alloc_result, keep_freed_blocks

if sys.argv[1] == "one":
    assert keep_freed_blocks(one_heap=True) is True
else:
    assert keep_freed_blocks() is True

def fetch():  # an under-store client's thread: pages arrive in new blocks
    held = [alloc_result(4 << 20)[0] for _ in range(4)]
    held.clear()

thread = threading.Thread(target=fetch)
thread.start()
thread.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
libc.fclose.argtypes = (ctypes.c_void_p,)
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "info.xml")
    stream = libc.fopen(path.encode(), b"w")
    assert libc.malloc_info(0, stream) == 0
    libc.fclose(stream)
    print(open(path).read().count("<heap nr="))
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's arenas",
)
def test_one_heap_keeps_other_threads_blocks_in_the_main_heap() -> None:
    """glibc gives a thread that allocates a heap of its own, and unmaps such a heap when it
    empties, thresholds or not: with ``one_heap`` (the worker's setting) a thread's blocks come
    from the main heap, whose freed memory is kept. ``malloc_info`` lists the heaps in use."""

    assert _count_in_process(_HEAPS_SCRIPT, "plain") >= 2
    assert _count_in_process(_HEAPS_SCRIPT, "one") == 1
