"""Write-path benchmark: a checkpoint-like file (and a sharded variant) written through fsspec
to a worker in ``write-back`` mode, against a direct local-disk write measured in the same run
and against ``through`` mode.

Prints a table: seconds and GB/s to close (the write is acknowledged: fsync'd on the worker and
journaled), seconds from close to durable in the under store (``sync``), the background upload
rate, and the under store's own write rate (a direct copy into its directory). The under store
is a local directory (``file://``) on the same disk: ``through`` pays the full upload before
close, write-back pays a local fsync'd copy.

Run: ``python bench/write_bench.py --size-mib 2048 --shards 8``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from read_bench import depot_fs, gbps, worker_process  # noqa: E402

MiB = 1024 * 1024
BLOCK = 8 * MiB


def _payload() -> bytes:
    return os.urandom(BLOCK)


def local_write(path: Path, size: int, block: bytes) -> float:
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def fs_write(fs: Any, path: str, size: int, block: bytes) -> float:
    t0 = time.perf_counter()
    with fs.open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description="depot write-path benchmark")
    parser.add_argument("--size-mib", type=int, default=2048, help="checkpoint size")
    parser.add_argument("--shards", type=int, default=8, help="files of the sharded variant")
    parser.add_argument("--dir", default=None, help="scratch directory (default: system temp)")
    args = parser.parse_args()
    size = args.size_mib * MiB
    block = _payload()
    rows: list[tuple[str, str, str]] = []

    def row(name: str, value: str, note: str = "") -> None:
        rows.append((name, value, note))
        print(f"{name:<48} {value:>12}  {note}", flush=True)

    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}, "
          f"file {args.size_mib} MiB, {args.shards} shards")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp_name:
        tmp = Path(tmp_name)
        local = tmp / "local.bin"
        t = local_write(local, size, block)
        row("direct local write + fsync", f"{gbps(size, t):.2f} GB/s", f"{t:.2f} s")
        local.unlink()
        ufs = tmp / "ufs"
        ufs.mkdir()
        mounts = [
            {"path": "/", "ufs": ufs.as_uri(), "write_mode": "write-back"},
            {"path": "/through", "ufs": (tmp / "ufs-through").as_uri()},
        ]
        (tmp / "ufs-through").mkdir()
        with worker_process(tmp, "w", mounts) as endpoint:
            fs = depot_fs(endpoint)
            from depot.client import CacheClient
            from depot.core.config import DepotConfig

            async def sync() -> None:
                async with CacheClient(endpoint, config=DepotConfig()) as c:
                    await c.sync(wait=True)

            import asyncio

            for label, files in (("1 file", 1), (f"{args.shards} shards", args.shards)):
                each = size // files
                t0 = time.perf_counter()
                for i in range(files):
                    fs_write(fs, f"/ckpt-{files}/part-{i}.bin", each, block)
                closed = time.perf_counter() - t0
                t1 = time.perf_counter()
                asyncio.run(sync())
                durable = time.perf_counter() - t1
                row(f"write-back, {label}: to close", f"{gbps(size, closed):.2f} GB/s",
                    f"{closed:.2f} s ({closed and t / closed:.2f}x of local write time)")
                row(f"write-back, {label}: close -> durable in UFS", f"{durable:.2f} s",
                    f"background upload {gbps(size, closed + durable):.2f} GB/s end to end")
                t0 = time.perf_counter()
                for i in range(files):
                    fs_write(fs, f"/through/ckpt-{files}/part-{i}.bin", each, block)
                through = time.perf_counter() - t0
                row(f"through, {label}: to close (= durable)", f"{gbps(size, through):.2f} GB/s",
                    f"{through:.2f} s; write-back is {through / closed:.2f}x faster to close")
            t0 = time.perf_counter()
            with contextlib.suppress(FileNotFoundError):
                shutil.copyfile(ufs / "ckpt-1" / "part-0.bin", tmp / "copy.bin")
                os.sync()
            own = time.perf_counter() - t0
            row("UFS own write rate (file copy into it + sync)", f"{gbps(size, own):.2f} GB/s",
                f"{own:.2f} s")
    print("\n| measurement | value | note |\n|---|---|---|")
    for name, value, note in rows:
        print(f"| {name} | {value} | {note} |")


if __name__ == "__main__":
    main()
