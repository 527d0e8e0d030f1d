"""Cluster benchmark: failover stalls and single flight over 3 worker processes and etcd.

Prints one table (markdown) with this machine's limits measured in the same run:

- loopback TCP bandwidth (one Python stream) and the S3-like under store read directly;
- **failover**: R readers stream one large file in 8 MiB chunks (each its own ``CacheClient``,
  default client settings); when they are ``--kill-at`` of the way through, the worker that owns
  the segment they are reading is SIGKILLed. Reported: the longest stall any reader saw (the
  largest gap between two successive chunk completions), against the largest gap before the
  kill, for a cold file and for a hot (cached) one; failed reads and sha256 of every reader;
- **hung worker**: the same, but the owner is SIGSTOPped (a host behind a partition: connections
  stay open, nothing answers), the case that the client's timeouts bound;
- **single flight**: 8 concurrent cold readers of one file; bytes the object store sent, counted
  by the store itself (``/__stats`` of ``bench/ufs_server.py``), over the file size.

Setup: ``bench/ufs_server.py`` as the under store (20 ms first byte, 100 MB/s per connection),
a ``LocalCluster`` of 3 ``depot worker`` processes with etcd membership (lease TTL 10 s, the
default), pages of 4 MiB, segments of 64 MiB. Everything runs on this machine; data goes to a
temp dir removed at the end.

Run: ``.venv/bin/python bench/cluster_bench.py [--size-mib 512] [--readers 4] [--no-hung]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from read_bench import loopback_tcp

from depot.client import CacheClient
from depot.core.config import DepotConfig
from depot.placement.view import ClusterView
from depot.testing.cluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MiB = 1024 * 1024
CHUNK = 8 * MiB


@contextlib.contextmanager
def ufs_server(root: Path, first_byte_ms: float, rate_per_conn: str) -> Iterator[str]:
    proc = subprocess.Popen(
        [PY, str(ROOT / "bench" / "ufs_server.py"), str(root), "--first-byte-ms",
         str(first_byte_ms), "--rate-per-conn", rate_per_conn],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        yield line.rsplit(" ", 1)[-1].strip()
    finally:
        proc.terminate()
        proc.wait(30)


def ufs_bytes(endpoint: str) -> int:
    with urllib.request.urlopen(endpoint + "/__stats", timeout=5) as resp:
        return int(json.loads(resp.read())["bytes_sent"])


def write_file(path: Path, size: int) -> str:
    """Random bytes; returns their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left > 0:
            data = os.urandom(min(left, 16 * MiB))
            digest.update(data)
            f.write(data)
            left -= len(data)
    return digest.hexdigest()


def direct_ranges(endpoint: str, key: str, size: int) -> float:
    """The under store read directly: 16 concurrent 8 MiB ranges (obstore), GB/s."""
    import obstore
    from obstore.store import S3Store

    store = S3Store("bucket", endpoint=endpoint, skip_signature=True, region="us-east-1",
                    client_options={"allow_http": True}, virtual_hosted_style_request=False)  # fmt: skip

    async def go() -> int:
        sem = asyncio.Semaphore(16)

        async def one(start: int) -> int:
            async with sem:
                length = min(CHUNK, size - start)
                return len(await obstore.get_range_async(store, key, start=start, length=length))

        return sum(await asyncio.gather(*(one(s) for s in range(0, size, CHUNK))))

    t0 = time.perf_counter()
    n = asyncio.run(go())
    return n / (time.perf_counter() - t0) / 1e9


@dataclass
class Run:
    """What the readers of one scenario saw."""

    gaps: list[list[tuple[float, float]]] = field(default_factory=list)  # (done at, gap)
    digests: dict[int, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    event_at: float | None = None
    victim: int | None = None
    elapsed: float = 0.0

    @property
    def stall(self) -> float:
        return max(g for reader in self.gaps for _, g in reader)

    def before_event(self) -> float:
        at = self.event_at if self.event_at is not None else float("inf")
        before = [g for reader in self.gaps for t, g in reader if t < at]
        return max(before) if before else 0.0

    def median(self) -> float:
        return statistics.median(g for reader in self.gaps for _, g in reader)


async def stream(
    cluster: LocalCluster,
    path: str,
    size: int,
    readers: int,
    *,
    action: str | None = None,
    at: float = 0.3,
) -> Run:
    """``readers`` clients read ``path`` in CHUNK steps; ``action`` (kill/pause) hits the owner
    of the segment they are in once they are ``at`` of the way through."""
    run = Run(gaps=[[] for _ in range(readers)])
    progress = [0] * readers
    view = ClusterView.from_document(cluster.documents()[cluster.running[0].index])
    file_key = view.file_key(path)
    assert file_key is not None

    async def reader(i: int) -> None:
        async with CacheClient(cluster.endpoint, config=DepotConfig()) as client:
            status = await client.stat(path)
            digest = hashlib.sha256()
            last = time.monotonic()
            try:
                for offset in range(0, size, CHUNK):
                    data = await client.read_range(
                        path, offset, offset + CHUNK, version=status.entity_tag, size=size
                    )
                    now = time.monotonic()
                    run.gaps[i].append((now, now - last))
                    last = now
                    digest.update(data)
                    progress[i] = offset + len(data)
            except Exception as exc:
                run.errors.append(f"reader {i}: {exc!r}")
                return
            run.digests[i] = digest.hexdigest()

    async def trigger() -> None:
        if action is None:
            return
        while sum(progress) / readers < at * size:
            await asyncio.sleep(0.005)
        position = min(progress)  # the segment the slowest reader is in
        owner = view.route(file_key, position)[0].endpoint
        run.victim = cluster.index_of(owner)
        run.event_at = time.monotonic()
        if action == "kill":
            await asyncio.to_thread(cluster.kill, run.victim)
        else:
            cluster.pause(run.victim)  # the caller resumes it once the readers are done

    t0 = time.monotonic()
    tasks = [asyncio.create_task(reader(i)) for i in range(readers)]
    await asyncio.gather(trigger(), *tasks)
    run.elapsed = time.monotonic() - t0
    return run


async def warm(cluster: LocalCluster, path: str) -> None:
    async with CacheClient(cluster.endpoint, config=DepotConfig()) as client:
        await client.read_range(path, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description="depot cluster benchmark")
    parser.add_argument("--size-mib", type=int, default=512, help="failover file size")
    parser.add_argument("--sf-mib", type=int, default=256, help="single-flight file size")
    parser.add_argument("--readers", type=int, default=4, help="failover readers")
    parser.add_argument("--sf-readers", type=int, default=8, help="single-flight readers")
    parser.add_argument("--kill-at", type=float, default=0.3)
    parser.add_argument("--first-byte-ms", type=float, default=20.0)
    parser.add_argument("--rate-per-conn", default="100MB")
    parser.add_argument("--segment-size", default="64MiB")
    parser.add_argument("--lease-ttl", type=float, default=10.0)
    parser.add_argument("--no-hung", action="store_true", help="skip the SIGSTOP scenario")
    args = parser.parse_args()

    rows: list[tuple[str, str, str]] = []

    def row(name: str, value: str, note: str = "") -> None:
        rows.append((name, value, note))
        print(f"  {name}: {value} {note}", file=sys.stderr, flush=True)

    size = args.size_mib * MiB
    sf_size = args.sf_mib * MiB
    with tempfile.TemporaryDirectory(prefix="depot-cluster-bench-") as tmp_s:
        tmp = Path(tmp_s)
        bucket = tmp / "data" / "bucket"
        bucket.mkdir(parents=True)
        digests = {name: write_file(bucket / name, size)
                   for name in ("cold.bin", "hot.bin", "hung.bin")}  # fmt: skip
        sf_digest = write_file(bucket / "sf.bin", sf_size)

        loop_bw = max(loopback_tcp() for _ in range(2))
        row("machine: loopback TCP, 1 stream (Python sendall->recv_into)", f"{loop_bw:.2f} GB/s")
        row("machine: CPU cores usable", str(len(os.sched_getaffinity(0))))

        with ufs_server(tmp / "data", args.first_byte_ms, args.rate_per_conn) as s3:
            direct = direct_ranges(s3, "sf.bin", sf_size)
            row(f"UFS: S3-like server ({args.first_byte_ms:.0f} ms first byte, "
                f"{args.rate_per_conn}/s per connection), read directly",
                f"{direct:.2f} GB/s", "obstore, 16 concurrent 8 MiB ranges")  # fmt: skip
            mounts = [{"path": "/", "ufs": "s3://bucket", "metadata": "immutable", "options": {
                "endpoint": s3, "region": "us-east-1", "skip_signature": "true",
                "path_style": "true"}}]  # fmt: skip
            defaults = DepotConfig()
            with LocalCluster(
                tmp / "cluster", 3, mounts=mounts, lease_ttl=args.lease_ttl, page_size="4MiB",
                segment_size=args.segment_size, cache_size="8GiB", log_level="warning",
            ) as cluster:  # fmt: skip
                row("cluster", f"3 workers, etcd, lease TTL {args.lease_ttl:g} s",
                    f"pages 4 MiB, segments {args.segment_size}; client defaults: connect "
                    f"timeout {defaults.client.connect_timeout:g} s, request timeout "
                    f"{defaults.client.timeout:g} s, view refresh "
                    f"{defaults.cluster.refresh_interval:g} s")  # fmt: skip

                def report(name: str, run: Run, digest: str, what: str) -> None:
                    bad = sum(1 for d in run.digests.values() if d != digest)
                    failed = len(run.errors) + (args.readers - len(run.digests) - len(run.errors))
                    ok = "0 failed reads, all sha256 equal" if not bad and not failed else (
                        f"{failed} failed reads, {bad} wrong digests: {run.errors[:2]}")  # fmt: skip
                    row(name, f"longest stall {run.stall:.2f} s",
                        f"{what} of worker {run.victim} at {args.kill_at:.0%}; largest gap before "
                        f"it {run.before_event():.2f} s, median chunk {run.median() * 1e3:.0f} ms; "
                        f"{ok}; {run.elapsed:.1f} s in all")  # fmt: skip

                what = f"{args.readers} readers x {args.size_mib} MiB, 8 MiB chunks"
                run = asyncio.run(stream(cluster, "/cold.bin", size, args.readers,
                                         action="kill", at=args.kill_at))  # fmt: skip
                report(f"failover, cold file ({what})", run, digests["cold.bin"], "SIGKILL")
                assert run.victim is not None
                cluster.restart(run.victim)
                cluster.wait_ready()

                asyncio.run(warm(cluster, "/hot.bin"))
                baseline = asyncio.run(stream(cluster, "/hot.bin", size, args.readers))
                row(f"hot read, no failure ({what})", f"longest gap {baseline.stall:.2f} s",
                    f"median chunk {baseline.median() * 1e3:.0f} ms; "
                    f"{size * args.readers / baseline.elapsed / 1e9:.2f} GB/s in all")  # fmt: skip
                run = asyncio.run(stream(cluster, "/hot.bin", size, args.readers,
                                         action="kill", at=args.kill_at))  # fmt: skip
                report(f"failover, hot file ({what})", run, digests["hot.bin"], "SIGKILL")
                assert run.victim is not None
                cluster.restart(run.victim)
                cluster.wait_ready()

                if not args.no_hung:
                    asyncio.run(warm(cluster, "/hung.bin"))
                    run = asyncio.run(stream(cluster, "/hung.bin", size, args.readers,
                                             action="pause", at=args.kill_at))  # fmt: skip
                    assert run.victim is not None
                    cluster.resume(run.victim)
                    report(f"hung worker, hot file ({what})", run, digests["hung.bin"],
                           "SIGSTOP (until the readers are done)")  # fmt: skip
                    cluster.wait_ready(timeout=60)

                # single flight
                before = ufs_bytes(s3)
                counters = {w.index: cluster.stats(w.index)["ufs_reads"] for w in cluster.running}
                sf = asyncio.run(stream(cluster, "/sf.bin", sf_size, args.sf_readers))
                sent = ufs_bytes(s3) - before
                pages = -(-sf_size // (4 * MiB))
                reads = sum(cluster.stats(w.index)["ufs_reads"] - counters[w.index]
                            for w in cluster.running)  # fmt: skip
                good = not sf.errors and list(sf.digests.values()) == [sf_digest] * args.sf_readers
                row(f"single flight: {args.sf_readers} concurrent cold readers of one "
                    f"{args.sf_mib} MiB file", f"UFS bytes / file size = {sent / sf_size:.3f}",
                    f"counted at the UFS server; {reads} page reads for {pages} pages; "
                    f"{sf_size * args.sf_readers / sf.elapsed / 1e9:.2f} GB/s delivered in all, "
                    f"{sf_size / sf.elapsed / 1e9:.2f} GB/s from the UFS; "
                    f"{'all readers complete' if good else sf.errors[:2]}")  # fmt: skip

    print("\n| measurement | result | notes |\n|---|---|---|")
    for name, value, note in rows:
        print(f"| {name} | {value} | {note} |")


if __name__ == "__main__":
    main()
