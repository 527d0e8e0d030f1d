"""Micro-benchmark of the local page store against plain file I/O on the same machine.

Measures, in one run: 4 KiB random read latency (p50/p99) through ``read_into``, full-page read
throughput, ``put`` throughput, and the same operations done directly with ``os.preadv`` /
``os.write`` on files of the same size, so every figure also reads as a ratio. The pages are
warm in the page cache (the store's reads run inline with RWF_NOWAIT); the "thread" rows force
the thread fallback that cold reads take.

Run: ``python bench/pagestore_micro.py [--dir DIR] [--pages 64] [--page-size 4MiB]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from depot.core.types import PageId, parse_size
from depot.pagestore import LocalPageStore

SMALL = 4096


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed_store_reads(
    store: LocalPageStore, pages: list[PageId], page_size: int, count: int
) -> list[float]:
    """Latency (seconds) of ``count`` random 4 KiB reads anywhere in the pages."""
    rng = random.Random(1)
    buf = memoryview(bytearray(SMALL))
    out: list[float] = []
    clock = time.perf_counter
    for _ in range(count):
        page = pages[rng.randrange(len(pages))]
        offset = rng.randrange(page_size // SMALL) * SMALL
        t0 = clock()
        ok = await store.read_into(page, offset, buf)
        out.append(clock() - t0)
        assert ok
    return out


def timed_direct_reads(paths: list[Path], page_size: int, count: int) -> list[float]:
    rng = random.Random(1)
    buf = memoryview(bytearray(SMALL))
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    out: list[float] = []
    clock = time.perf_counter
    try:
        for _ in range(count):
            fd = fds[rng.randrange(len(fds))]
            offset = rng.randrange(page_size // SMALL) * SMALL
            t0 = clock()
            os.preadv(fd, [buf], offset)
            out.append(clock() - t0)
    finally:
        for fd in fds:
            os.close(fd)
    return out


async def store_page_reads(
    store: LocalPageStore, pages: list[PageId], page_size: int, rounds: int
) -> float:
    buf = bytearray(page_size)  # touched once so its memory is mapped before timing
    view = memoryview(buf)
    t0 = time.perf_counter()
    for _ in range(rounds):
        for page in pages:
            assert await store.read_into(page, 0, view)
    return rounds * len(pages) * page_size / (time.perf_counter() - t0)


async def store_page_reads_parallel(
    store: LocalPageStore, pages: list[PageId], page_size: int, rounds: int, width: int
) -> float:
    bufs = [memoryview(bytearray(page_size)) for _ in range(width)]

    async def lane(i: int) -> None:
        for _ in range(rounds):
            for page in pages[i::width]:
                assert await store.read_into(page, 0, bufs[i])

    t0 = time.perf_counter()
    await asyncio.gather(*(lane(i) for i in range(width)))
    return rounds * len(pages) * page_size / (time.perf_counter() - t0)


def direct_page_reads(paths: list[Path], page_size: int, rounds: int) -> float:
    buf = memoryview(bytearray(page_size))
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        t0 = time.perf_counter()
        for _ in range(rounds):
            for fd in fds:
                os.preadv(fd, [buf], 0)
        return rounds * len(fds) * page_size / (time.perf_counter() - t0)
    finally:
        for fd in fds:
            os.close(fd)


def direct_writes(root: Path, blobs: list[bytes]) -> float:
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, blob in enumerate(blobs):
        tmp = root / f".{i}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, blob)
        os.close(fd)
        os.replace(tmp, root / str(i))
    rate = sum(map(len, blobs)) / (time.perf_counter() - t0)
    shutil.rmtree(root)
    return rate


async def put_rates(
    store: LocalPageStore, direct_root: Path, blobs: list[bytes], rounds: int
) -> tuple[float, float, float]:
    """Median put rates (one at a time, all at once) and of plain file writes.

    Write speed depends on how much dirty data the kernel already holds, so the three are
    measured in turns, each after ``sync``, and the medians are compared.
    """
    total = sum(map(len, blobs))
    seq: list[float] = []
    par: list[float] = []
    direct: list[float] = []
    for r in range(rounds):
        os.sync()
        t0 = time.perf_counter()
        for i, blob in enumerate(blobs):
            assert await store.put(PageId(f"seq{r}", i), blob)
        seq.append(total / (time.perf_counter() - t0))
        os.sync()
        t0 = time.perf_counter()
        done = await asyncio.gather(
            *(store.put(PageId(f"par{r}", i), b) for i, b in enumerate(blobs))
        )
        par.append(total / (time.perf_counter() - t0))
        assert all(done)
        await store.delete_file(f"seq{r}")
        await store.delete_file(f"par{r}")
        os.sync()
        direct.append(direct_writes(direct_root, blobs))
    return statistics.median(seq), statistics.median(par), statistics.median(direct)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="scratch dir (default: a temp dir)")
    parser.add_argument("--pages", type=int, default=64)
    parser.add_argument("--page-size", default="4MiB")
    parser.add_argument("--reads", type=int, default=20_000, help="4 KiB reads to time")
    parser.add_argument("--rounds", type=int, default=5, help="passes over all pages")
    parser.add_argument("--put-batch", type=int, default=16, help="pages per timed put batch")
    args = parser.parse_args()
    page_size = parse_size(args.page_size)
    scratch = Path(tempfile.mkdtemp(prefix="depot-bench-", dir=args.dir))
    try:
        blobs = [random.Random(i).randbytes(page_size) for i in range(args.pages)]
        capacity = (args.pages + 2 * args.put_batch + 1) * page_size  # no evictions
        store = await LocalPageStore.open([(scratch / "cache", capacity)], page_size)
        pages = [PageId("bench", i) for i in range(args.pages)]

        for page, blob in zip(pages, blobs, strict=True):
            assert await store.put(page, blob)
        put_rate, put_rate_par, write_rate = await put_rates(
            store, scratch / "direct", blobs[: args.put_batch], args.rounds
        )
        paths = [p for p in (store.page_file(pg) for pg in pages) if p is not None]

        await timed_store_reads(store, pages, page_size, 2000)  # warm up
        store_lat = await timed_store_reads(store, pages, page_size, args.reads)
        direct_lat = timed_direct_reads(paths, page_size, args.reads)
        store_read = await store_page_reads(store, pages, page_size, args.rounds)
        store_read_par = await store_page_reads_parallel(store, pages, page_size, args.rounds, 4)
        direct_read = direct_page_reads(paths, page_size, args.rounds)
        inline = store.inline_reads
        await store.close()

        threaded = await LocalPageStore.open(
            [(scratch / "cache", capacity)], page_size, inline_read_max=0
        )
        thread_lat = await timed_store_reads(threaded, pages, page_size, args.reads // 4)
        thread_read = await store_page_reads(threaded, pages, page_size, args.rounds)
        thread_read_par = await store_page_reads_parallel(
            threaded, pages, page_size, args.rounds, 4
        )
        await threaded.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    us = 1e6
    gb = 1e9
    d50, d99 = percentile(direct_lat, 0.5) * us, percentile(direct_lat, 0.99) * us
    rows = [
        ("4 KiB read p50 (us)", percentile(store_lat, 0.5) * us, d50),
        ("4 KiB read p99 (us)", percentile(store_lat, 0.99) * us, d99),
        (
            "4 KiB read mean (us)",
            statistics.fmean(store_lat) * us,
            statistics.fmean(direct_lat) * us,
        ),
        ("4 KiB read p50, thread path (us)", percentile(thread_lat, 0.5) * us, d50),
        ("4 KiB read p99, thread path (us)", percentile(thread_lat, 0.99) * us, d99),
        ("page read 1 stream (GB/s)", store_read / gb, direct_read / gb),
        ("page read 4 streams (GB/s)", store_read_par / gb, direct_read / gb),
        ("page read 1 stream, thread path (GB/s)", thread_read / gb, direct_read / gb),
        ("page read 4 streams, thread path (GB/s)", thread_read_par / gb, direct_read / gb),
        ("put 1 at a time (GB/s)", put_rate / gb, write_rate / gb),
        (f"put {args.put_batch} concurrent (GB/s)", put_rate_par / gb, write_rate / gb),
    ]
    print(
        f"page store micro-benchmark: {args.pages} pages of {page_size} bytes, "
        f"{os.cpu_count()} CPUs, inline reads {inline}"
    )
    print(f"{'measure':<42}{'page store':>12}{'direct':>12}{'store/direct':>14}")
    for name, mine, direct in rows:
        print(f"{name:<42}{mine:>12.2f}{direct:>12.2f}{mine / direct:>14.2f}")
    print(
        "direct = os.preadv on an open fd of the same page files (reads); "
        "os.write + rename of new files, measured in turns with the puts (writes)"
    )


if __name__ == "__main__":
    asyncio.run(main())
