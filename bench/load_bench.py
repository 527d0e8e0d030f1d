"""Preload benchmark: ``depot load`` of a ~2 GiB dataset of mixed file sizes vs the UFS's own rate.

The dataset is many small files (1-8 MiB) and a few large ones (384 MiB), served by
``bench/ufs_server.py`` (an S3-compatible server with an object store's first-byte latency and
per-connection rate). Prints one table (markdown), every figure measured in the same run:

- this machine's limits: loopback TCP (one Python stream), page-cache read, and what a cache
  fill costs the file system (create, write, rename page-sized files), on disk and on tmpfs,
  through the page cache and with ``O_DIRECT`` (as a worker's load does with
  ``cache.preload_direct_io: true``);
- the UFS's own read rate: obstore reading every file of the dataset in page-sized ranges with as
  many requests in flight as a worker sends the under store (``worker.ufs_concurrency``);
- ``depot load -r`` of the dataset into an empty cache, with 1 worker and with 2 (static
  membership; each worker loads the segments it owns), as a rate and as a ratio to the direct
  rate; then ``load --verify`` of the loaded dataset (every page read back and checked).

Workers and the UFS server run as their own processes, as in production. Data goes to a temp dir
that is deleted at the end. Run: ``.venv/bin/python bench/load_bench.py [--small 200]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import mmap
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from read_bench import gbps, loopback_tcp, page_cache_read, write_file

from depot.client.client import CacheClient
from depot.core.directio import takes_direct_io

PY = sys.executable
MiB = 1024 * 1024




def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def page_files_write(
    root: Path, total: int = 1024 * MiB, size: int = 4 * MiB, direct_io: bool = False
) -> float:
    """What a cache fill costs the file system: create, write and rename ``size``-byte files
    (with ``direct_io``: written with ``O_DIRECT`` from a reused aligned buffer)."""
    folder = Path(tempfile.mkdtemp(prefix="depot-write-probe-", dir=root))
    chunk = os.urandom(size)
    aligned = mmap.mmap(-1, size) if direct_io else None
    try:
        t0 = time.perf_counter()
        for i in range(total // size):
            write_new_file(folder, i, chunk, aligned)
        return gbps(total, time.perf_counter() - t0)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if aligned is not None:
            aligned.close()


@contextlib.contextmanager
def ufs_server(
    root: Path, first_byte_ms: float, rate_per_conn: str, rate_total: str = "0"
) -> Iterator[tuple[str, int]]:
    """``bench/ufs_server.py`` serving ``root``; yields (endpoint, pid)."""
    proc = subprocess.Popen(
        [PY, str(Path(__file__).resolve().parent / "ufs_server.py"), str(root),
         "--first-byte-ms", str(first_byte_ms), "--rate-per-conn", rate_per_conn,
         "--rate-total", rate_total],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        yield line.rsplit(" ", 1)[-1].strip(), proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def make_dataset(root: Path, small: int, large: int, large_mib: int) -> dict[str, int]:
    rnd = random.Random(7)
    sizes: dict[str, int] = {}
    for i in range(small):
        sizes[f"small/{i // 50:02d}/f{i:04d}.bin"] = rnd.randint(1 * MiB, 8 * MiB)
    for i in range(large):
        sizes[f"large/shard{i}.bin"] = large_mib * MiB + rnd.randint(0, MiB)
    for name, size in sizes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file(path, size)
    return sizes


def write_new_file(folder: Path, index: int, data: Any, aligned: mmap.mmap | None) -> None:
    """Create, write and rename one page-sized file; with ``aligned`` (a page-sized buffer of
    the calling thread), the data is copied there and written with ``O_DIRECT``."""
    tmp = folder / f".{index}.tmp"
    view = memoryview(data)
    if aligned is None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, view)
        finally:
            os.close(fd)
    else:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
        try:
            size = len(view) - len(view) % 4096
            aligned[:size] = view[:size]
            done = os.pwrite(fd, memoryview(aligned)[:size], 0) if size else 0
            if done < len(view):
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
                os.pwrite(fd, view[done:], done)
        finally:
            os.close(fd)
    os.rename(tmp, folder / str(index))


def direct_rate(
    endpoint: str,
    sizes: dict[str, int],
    page: int,
    concurrency: int,
    fill: Path | None = None,
    direct_io: bool = False,
) -> float:
    """obstore: every file in page-sized ranges, ``concurrency`` requests in flight.

    With ``fill``, each range is also written to a new file there (create, write, rename, on 8
    threads): what any preloader must at least do, without depot's index, checksums or HTTP;
    with ``direct_io`` as depot's load writes (``O_DIRECT`` from a reused aligned buffer).
    """
    import concurrent.futures
    import threading

    import obstore
    from obstore.store import S3Store

    store = S3Store("bucket", endpoint=endpoint, skip_signature=True, region="us-east-1",
                    client_options={"allow_http": True}, virtual_hosted_style_request=False)
    ranges = [(f"ds/{name}", s, min(page, size - s))
              for name, size in sizes.items() for s in range(0, size, page)]
    folder = Path(tempfile.mkdtemp(prefix="depot-direct-fill-", dir=fill)) if fill else None
    pool = concurrent.futures.ThreadPoolExecutor(8)
    buffers = threading.local()

    def store_page(index: int, data: Any) -> None:
        assert folder is not None
        aligned = None
        if direct_io:
            aligned = getattr(buffers, "page", None)
            if aligned is None:
                aligned = buffers.page = mmap.mmap(-1, page)
        write_new_file(folder, index, data, aligned)

    async def go() -> int:
        sem = asyncio.Semaphore(concurrency)
        loop = asyncio.get_running_loop()

        async def one(index: int, key: str, start: int, length: int) -> int:
            async with sem:
                data = await obstore.get_range_async(store, key, start=start, length=length)
                if folder is not None:
                    await loop.run_in_executor(pool, store_page, index, data)
                return len(data)

        return sum(await asyncio.gather(*(one(i, *r) for i, r in enumerate(ranges))))

    try:
        t0 = time.perf_counter()
        total = asyncio.run(go())
        return gbps(total, time.perf_counter() - t0)
    finally:
        pool.shutdown()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def workers(
    tmp: Path,
    name: str,
    count: int,
    s3: str,
    page: str,
    cache_root: Path | None = None,
    direct_io: bool = False,
    cache: dict[str, Any] | None = None,
) -> Iterator[tuple[list[str], list[int]]]:
    """``count`` worker processes (static membership when more than one); yields their
    endpoints and pids. ``direct_io``: their ``cache.preload_direct_io``; ``cache``: more of
    their ``cache:`` settings.

    The page store goes under ``cache_root`` (default: ``tmp``), and is deleted at the end.
    """
    ports = [free_port() for _ in range(count)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    procs = []
    scratch = Path(tempfile.mkdtemp(prefix="depot-load-cache-", dir=cache_root or tmp))
    try:
        for i, port in enumerate(ports):
            base = scratch / f"{name}-{i}"
            cfg: dict[str, Any] = {
                "worker": {"host": "127.0.0.1", "port": port},
                "cache": {"page_size": page, "preload_direct_io": direct_io,
                          "dirs": [{"path": str(base / "cache"), "size": "16GiB"}],
                          **(cache or {})},
                "mounts": [{"path": "/", "ufs": "s3://bucket", "metadata": "immutable", "options": {
                    "endpoint": s3, "region": "us-east-1", "skip_signature": "true",
                    "path_style": "true"}}],
                "log_level": "warning",
            }
            if count > 1:
                cfg["cluster"] = {"membership": "static", "workers": urls}
            base.mkdir(parents=True)
            (base / "config.yaml").write_text(yaml.safe_dump(cfg))
            proc = subprocess.Popen(
                [PY, "-m", "depot.cli.main", "worker", "--config", str(base / "config.yaml")],
                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if "listening on" not in line:
                raise RuntimeError(f"worker did not start: {line!r}")
        yield urls, [p.pid for p in procs]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        shutil.rmtree(scratch, ignore_errors=True)


def depot_load(endpoint: str, verify: bool = False) -> tuple[float, dict[str, Any]]:
    async def go() -> tuple[float, dict[str, Any]]:
        async with CacheClient(endpoint, ufs_fallback=False) as client:
            await client.cluster()
            t0 = time.perf_counter()
            doc = await client.load("/ds", recursive=True, verify=verify, poll_interval=0.05)
            return time.perf_counter() - t0, doc

    result: tuple[float, dict[str, Any]] = asyncio.run(go())
    return result


def read_all(endpoint: str, sizes: dict[str, int]) -> float:
    """Read every file of the dataset once through a client (8 MiB reads, default settings:
    short-circuit reads of the page files on this node); returns GB/s."""
    async def go() -> float:
        async with CacheClient(endpoint, ufs_fallback=False) as client:
            buf = memoryview(bytearray(8 * MiB))
            t0 = time.perf_counter()
            for name, size in sizes.items():
                for start in range(0, size, len(buf)):
                    end = min(size, start + len(buf))
                    await client.read_range_into(f"/ds/{name}", start, end, buf[: end - start])
            return gbps(sum(sizes.values()), time.perf_counter() - t0)

    result: float = asyncio.run(go())
    return result


def cached_pages(endpoints: list[str]) -> tuple[int, int]:
    """Pages cached by the workers, and the bytes they wrote with O_DIRECT."""
    async def go() -> tuple[int, int]:
        pages = direct = 0
        for ep in endpoints:
            async with CacheClient(ep, ufs_fallback=False) as client:
                stats = await client.cache_stats()
                pages += int(stats["pages"])
                direct += int(stats.get("direct_write_bytes", 0))
        return pages, direct

    result: tuple[int, int] = asyncio.run(go())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="depot preload benchmark")
    parser.add_argument("--small", type=int, default=200, help="files of 1-8 MiB")
    parser.add_argument("--large", type=int, default=3, help="large files")
    parser.add_argument("--large-mib", type=int, default=384)
    parser.add_argument("--page-size", default="4MiB")
    parser.add_argument("--ufs-concurrency", type=int, default=64,
                        help="requests in flight to the UFS (a worker's worker.ufs_concurrency)")
    parser.add_argument("--first-byte-ms", type=float, default=20.0)
    parser.add_argument("--rate-per-conn", default="100MB")
    parser.add_argument("--rate-total", default="0,1GB",
                        help="UFS server total rate caps to measure (0: none), comma-separated")
    parser.add_argument("--workers", default="1,2", help="cluster sizes to measure")
    parser.add_argument("--runs", type=int, default=2, help="best of N for the direct rate")
    parser.add_argument("--direct-io-load", action=argparse.BooleanOptionalAction,
                        default=True, help="also load with 1 worker that writes its pages with "
                        "O_DIRECT (cache.preload_direct_io: true)")
    parser.add_argument("--fast-cache", default="/dev/shm",
                        help="also measure with the page store here (tmpfs: a disk that is not "
                        "the bottleneck); '' to skip")
    args = parser.parse_args()
    page = 4 * MiB if args.page_size == "4MiB" else int(args.page_size)

    rows: list[tuple[str, str, str]] = []
    load_start = os.getloadavg()[0]

    def row(name: str, value: str, note: str = "") -> None:
        rows.append((name, value, note))
        print(f"  {name}: {value} {note}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="depot-load-bench-") as tmp_s:
        tmp = Path(tmp_s)
        data = tmp / "data"
        sizes = make_dataset(data / "bucket" / "ds", args.small, args.large, args.large_mib)
        os.sync()  # no writeback of the dataset during the measurements
        total = sum(sizes.values())
        pages = sum(-(-s // page) for s in sizes.values())
        row("dataset", f"{total / 2**30:.2f} GiB",
            f"{args.small} files of 1-8 MiB + {args.large} of {args.large_mib} MiB; "
            f"{pages} pages of {page // MiB} MiB")

        row("machine: loopback TCP, 1 stream (Python sendall->recv_into)",
            f"{max(loopback_tcp() for _ in range(args.runs)):.2f} GB/s")
        probe = data / "bucket" / "ds" / "large" / "shard0.bin"
        row("machine: page-cache read (pread, 8 MiB buffer)",
            f"{max(page_cache_read(probe) for _ in range(args.runs)):.2f} GB/s")
        places: list[tuple[str, Path]] = [("disk", tmp)]
        if args.fast_cache and Path(args.fast_cache).is_dir():
            places.append((f"tmpfs {args.fast_cache}", Path(args.fast_cache)))
        # How each place is filled: through the page cache, and with O_DIRECT where it can be
        # (as a worker's load does with cache.preload_direct_io: true).
        fill_modes = [(where, root, False) for where, root in places] + [
            (where, root, True) for where, root in places if takes_direct_io(root)
        ]
        for where, root, direct_io in fill_modes:
            rate = page_files_write(root, size=page, direct_io=direct_io)
            os.sync()
            how = "O_DIRECT " if direct_io else ""
            row(f"machine: cache fill on {where}: create+{how}write+rename {page // MiB} MiB "
                "files", f"{rate:.2f} GB/s")

        for cap in args.rate_total.split(","):
            with ufs_server(data, args.first_byte_ms, args.rate_per_conn, cap) as (s3, ufs_pid):
                direct, direct_cpu = 0.0, 0.0
                direct_rate(s3, sizes, page, args.ufs_concurrency)  # warm-up, not measured
                for _ in range(args.runs):
                    before = cpu_seconds(ufs_pid)
                    rate = direct_rate(s3, sizes, page, args.ufs_concurrency)
                    if rate > direct:
                        direct, direct_cpu = rate, cpu_seconds(ufs_pid) - before
                capped = f", at most {cap}/s in all" if cap not in ("", "0") else ""
                row(f"UFS: S3-like server ({args.first_byte_ms:.0f} ms first byte, "
                    f"{args.rate_per_conn}/s per connection{capped})", "", "")
                row(f"  direct: obstore, every file in {page // MiB} MiB ranges, "
                    f"{args.ufs_concurrency} in flight", f"{direct:.2f} GB/s",
                    f"UFS server {direct_cpu:.1f} CPU-s")
                fills: dict[tuple[str, bool], float] = {}
                for where, root, direct_io in fill_modes:
                    best, fill_cpu = 0.0, 0.0
                    for _ in range(args.runs):
                        before_cpu = cpu_seconds(os.getpid())
                        fill = direct_rate(s3, sizes, page, args.ufs_concurrency, root, direct_io)
                        if fill > best:
                            best, fill_cpu = fill, cpu_seconds(os.getpid()) - before_cpu
                        os.sync()
                    fills[where, direct_io] = best  # a load is compared with the same fill
                    how = " with O_DIRECT" if direct_io else ""
                    row(f"  direct + fill: the same, each range written to a new file on {where}"
                        f"{how}", f"{best:.2f} GB/s", f"what any preloader must do at least; "
                        f"CPU-s: reader {fill_cpu:.1f}")
                loads = [(int(c), False) for c in args.workers.split(",") if c]
                if args.direct_io_load:
                    loads.append((1, True))
                for where, root in places:
                    for count, direct_io in loads:
                        mode = " (preload_direct_io: true)" if direct_io else ""
                        name = f"w{count}-direct-io" if direct_io else f"w{count}"
                        with workers(tmp, name, count, s3, args.page_size, root,
                                     direct_io) as (eps, pids):
                            before = [cpu_seconds(p) for p in [ufs_pid, *pids]]
                            seconds, doc = depot_load(eps[0])
                            used = [cpu_seconds(p) - b for p, b in zip([ufs_pid, *pids], before,
                                                                         strict=True)]
                            assert doc["state"] == "completed" and not doc["failures"], doc
                            cached, direct_bytes = cached_pages(eps)
                            os.sync()
                            rate = gbps(total, seconds)
                            fill_rate = fills.get((where, direct_io), fills[where, False])
                            row(f"  depot load -r, {count} worker(s){mode}, empty cache on "
                                f"{where}", f"{rate:.2f} GB/s",
                                f"ratio {rate / direct:.2f} vs direct, {rate / fill_rate:.2f} vs "
                                f"direct + fill; {seconds:.1f} s; {cached}/{pages} pages "
                                f"cached ({direct_bytes / total:.0%} of the bytes with O_DIRECT); "
                                f"CPU-s: UFS server {used[0]:.1f}, worker(s) "
                                f"{sum(used[1:]):.1f}")
                            if count == 1:
                                first = read_all(eps[0], sizes)
                                row(f"  read of the loaded dataset right after{mode} ({where})",
                                    f"{first:.2f} GB/s", "a client on the same node, 8 MiB reads"
                                    + ("; the pages come from the disk" if direct_io else ""))
                            seconds, doc = depot_load(eps[0], verify=True)
                            assert doc["verify"]["missing"] == 0, doc
                            row(f"  depot load -r --verify, {count} worker(s){mode}, all cached "
                                f"({where})", f"{gbps(total, seconds):.2f} GB/s",
                                f"{seconds:.1f} s: a lookup per page, then every page read back")

        row("machine: load average (1 min) at start, at end",
            f"{load_start:.1f}, {os.getloadavg()[0]:.1f}",
            "2 vCPUs shared with other work: figures drift with it")

    print("\n| measurement | result | notes |\n|---|---|---|")
    for name, value, note in rows:
        print(f"| {name} | {value} | {note} |")


if __name__ == "__main__":
    main()
