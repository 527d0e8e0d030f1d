"""Write-path benchmark: a checkpoint written through depot, with this machine's limits.

The checkpoint is a safetensors file of many tensors (``--layers`` transformer layers of
float16 weights, plus an embedding, adding up to ``--size``) and a sharded variant of the same
tensors (``--shards`` files, cut as ``save_pretrained`` cuts them). Each is written through the
fsspec client (``fs.open(path, "wb")``, files one after the other) to one worker process, and
measured against what the machine and the under store do on their own in the same run:

- machine: loopback TCP, and a direct local-disk write + fsync of the same bytes (the floor of
  any write that is acknowledged as durable on this node), in ``--pairs`` rounds with the two
  write-back writes below, the order turned around each round (the later of big writes in a row
  pays this VM's cost of faulting in memory the hypervisor took back), and once an ``O_DIRECT``
  write + fsync (the disk without the page cache, what depot's local writes use);
- under store = a local directory (``file://``, same disk): ``write-back`` (time to close, i.e.
  acknowledged: fsync'd and journaled on the worker; then close -> durable in the under store,
  ``sync --wait``) and ``through`` (close = durable);
- under store = ``bench/ufs_server.py``, an emulated cloud object store (S3 API, ``--first-byte-ms``
  before each answer, ``--rate-per-conn`` per connection in either direction; defaults 20 ms and
  50 MB/s): its own PUT rate (obstore putting the same bytes directly with the calls depot's
  uploader makes: multipart, obstore's 12 parts in flight, as many files at once as depot's
  uploader runs), then
  ``through`` and ``write-back`` to it: the background upload's rate against the store's own, and
  how much sooner write-back returns than through. The fsspec client stages write-back writes
  itself (local writes, docs/writes.md) unless ``--http-writes``;
- the same files written through ``depot mount -o rw`` (plain ``open``/``write``/``close``) onto
  the write-back mount over the local directory, in the same rounds (``--no-fuse`` leaves it
  out; skipped where FUSE is not usable);
- S3 PUT of 4 KiB objects through depot's S3 gateway (in the worker) onto a write-back mount over
  the emulated store: p50 / p99 over ``--puts`` boto3 PUTs on keep-alive connections, and the
  floors of the machine: any acknowledged small write here (create + write + fsync + rename of a
  4 KiB file), and boto3's own cost per PUT against a server that only answers 200.

The worker (with its S3 gateway) and the emulated store run as their own processes; all share
the machine's cores. Data lives in a temp dir deleted at the end.
Run: ``.venv/bin/python bench/write_bench.py --size 2GiB --shards 8``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from read_bench import gbps, loopback_tcp, pct  # noqa: E402
from s3_bench import AK, SK, deployment  # noqa: E402

from depot.core.config import DepotConfig  # noqa: E402
from depot.core.types import parse_size  # noqa: E402

PY = sys.executable
MiB = 1024 * 1024
BLOCK = 8 * MiB  # what the writer hands to f.write at a time
BUCKET = "bucket"


# the checkpoint -----------------------------------------------------------------------------------

def make_tensors(size: int, layers: int) -> dict[str, Any]:
    """float16 tensors shaped like a transformer's (q, k, v, o, MLP up/down, two norms per layer,
    plus an embedding taking the rest), about ``size`` bytes in all. They are views over one
    random buffer: they cost no memory of their own, and the bytes do not compress."""
    import numpy as np

    per_layer = lambda d: 2 * (4 * d * d + 8 * d * d + 2 * d)  # noqa: E731
    d = max(64, int(math.sqrt(size / (24 * layers))) // 64 * 64)
    while layers and d > 64 and per_layer(d) * layers > size * 0.95:
        d -= 64
    shapes: list[tuple[str, tuple[int, ...]]] = []
    rest = size - per_layer(d) * layers
    vocab = max(1, rest // (2 * d))
    shapes.append(("model.embed_tokens.weight", (vocab, d)))
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{n}_proj.weight", (d, d)) for n in "qkvo"]
        shapes += [(p + "mlp.up_proj.weight", (4 * d, d)), (p + "mlp.down_proj.weight", (d, 4 * d)),
                   (p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,))]
    largest = max(2 * math.prod(s) for _, s in shapes)
    pool = np.frombuffer(os.urandom(max(64 * MiB, largest)), dtype=np.uint8)
    tensors: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if offset + nbytes > len(pool):
            offset = 0
        tensors[name] = pool[offset:offset + nbytes].view(np.float16).reshape(shape)
        offset += nbytes + 2 * 4099  # shift, so that tensors do not all hold the same bytes
    return tensors


def shard(tensors: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """Cut the tensors, in order, into ``count`` groups of about equal bytes."""
    total = sum(t.nbytes for t in tensors.values())
    groups: list[dict[str, Any]] = [{}]
    done = 0
    for name, tensor in tensors.items():
        if groups[-1] and done >= total * len(groups) / count and len(groups) < count:
            groups.append({})
        groups[-1][name] = tensor
        done += tensor.nbytes
    return groups


def serialize(groups: list[dict[str, Any]]) -> tuple[list[bytes], float]:
    from safetensors.numpy import save

    t0 = time.perf_counter()
    files = [save(g, metadata={"format": "np"}) for g in groups]
    return files, time.perf_counter() - t0


def names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


# writers ------------------------------------------------------------------------------------------

def file_write(folder: Path, files: list[bytes], *, fsync: bool = False) -> float:
    """The files written like any local file (``open(.., "wb")``, ``write``, with ``fsync``
    an fsync, ``close``), one after the other; seconds to the last close. Through a mount the
    close is the acknowledgement."""
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for name, data in zip(names(len(files)), files, strict=True):
        with open(folder / name, "wb") as f:
            view = memoryview(data)
            for pos in range(0, len(view), BLOCK):
                f.write(view[pos:pos + BLOCK])
            if fsync:
                f.flush()
                os.fsync(f.fileno())
    return time.perf_counter() - t0


def local_write(folder: Path, files: list[bytes]) -> float:
    """The same files written to local disk, each fsync'd (and its directory): durable here."""
    t0 = time.perf_counter()
    file_write(folder, files, fsync=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def direct_write(folder: Path, files: list[bytes]) -> float:
    """The same files written with O_DIRECT from one aligned buffer (the tail through the page
    cache), each fsync'd, and the directory: what this disk takes with no page cache in the
    way. None of depot's code is used."""
    import mmap

    folder.mkdir(parents=True, exist_ok=True)
    buffer = mmap.mmap(-1, BLOCK)
    view = memoryview(buffer)
    t0 = time.perf_counter()
    for name, data in zip(names(len(files)), files, strict=True):
        path = folder / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
        try:
            src = memoryview(data)
            pos = 0
            while len(src) - pos >= 4096:
                count = min(BLOCK, len(src) - pos)
                count -= count % 4096
                view[:count] = src[pos:pos + count]
                os.pwrite(direct, view[:count], pos)
                pos += count
            if pos < len(src):
                os.pwrite(fd, src[pos:], pos)
            os.fsync(fd)
        finally:
            os.close(direct)
            os.close(fd)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    elapsed = time.perf_counter() - t0
    view.release()
    buffer.close()
    return elapsed


def writer_fs(endpoint: str, local_writes: bool) -> Any:
    """The fsspec client of the writes: with local writes (a write-back write stages the
    worker's file itself, docs/writes.md) or every write streamed over HTTP."""
    from depot.core.config import load_config

    client = {"short_circuit": local_writes, "local_writes": local_writes}
    config = load_config(environ={}, overrides={"client": client})
    return fsspec.filesystem("depot", endpoint=endpoint, config=config, skip_instance_cache=True,
                             ufs_fallback=False)


@contextlib.contextmanager
def fuse_mount(point: Path, endpoint: str, log: Path) -> Iterator[Path | None]:
    """The worker mounted read-write at ``point`` (``depot mount -o rw``); None where FUSE is
    not usable here."""
    if not os.path.exists("/dev/fuse"):
        yield None
        return
    point.mkdir(parents=True, exist_ok=True)
    cmd = [PY, "-m", "depot.cli.mount"]
    started = subprocess.run(
        [*cmd, "mount", str(point), "--endpoint", endpoint, "-o", "rw", "--log-file", str(log)],
        capture_output=True, text=True, timeout=120,
    )
    if started.returncode != 0:
        print(f"(no FUSE rows: depot mount failed: {started.stderr.strip()})", file=sys.stderr)
        yield None
        return
    try:
        yield point
    finally:
        subprocess.run([*cmd, "unmount", str(point)], capture_output=True, timeout=60)


def write_counters(endpoint: str) -> dict[str, int]:
    """The worker's write counters (``writes`` of its stats document)."""
    with urllib.request.urlopen(f"{endpoint}/api/v1/cache/stats", timeout=30) as response:
        doc: dict[str, int] = json.loads(response.read())["writes"]
        return doc


def fs_write(fs: Any, folder: str, files: list[bytes]) -> tuple[float, float]:
    """Write the files through fsspec, one after the other; (seconds to the last close,
    seconds to the first close)."""
    first = 0.0
    t0 = time.perf_counter()
    for i, (name, data) in enumerate(zip(names(len(files)), files, strict=True)):
        with fs.open(f"{folder}/{name}", "wb") as f:
            view = memoryview(data)
            for pos in range(0, len(view), BLOCK):
                f.write(view[pos:pos + BLOCK])
        if i == 0:
            first = time.perf_counter() - t0
    return time.perf_counter() - t0, first


def sync(endpoint: str) -> float:
    """``depot sync --wait``: seconds until every pending write of the worker is in the UFS."""
    from depot.client import CacheClient

    async def go() -> None:
        async with CacheClient(endpoint, config=DepotConfig()) as client:
            answer = await client.sync(wait=True, deadline=900)
            if not answer.get("synced"):
                raise RuntimeError(f"sync did not complete: {answer}")

    t0 = time.perf_counter()
    asyncio.run(go())
    return time.perf_counter() - t0


def s3_store(endpoint: str) -> Any:
    from obstore.store import S3Store

    return S3Store(BUCKET, endpoint=endpoint, skip_signature=True, region="us-east-1",
                   virtual_hosted_style_request=False,
                   client_options={"allow_http": True, "pool_max_idle_per_host": "64"})


def direct_put(endpoint: str, prefix: str, files: list[bytes]) -> float:
    """The emulated store's own write rate for these files: obstore puts them with the calls
    depot's uploader makes (``put`` up to its multipart threshold, which obstore itself cuts
    into 5 MiB parts above 5 MiB; above the threshold, parts of depot's part size; obstore's
    default 12 parts in flight; as many files at once as depot's ``writeback.concurrency``)."""
    import obstore

    wb = DepotConfig().writeback
    store = s3_store(endpoint)

    async def go() -> None:
        lanes = asyncio.Semaphore(wb.concurrency)

        async def one(name: str, data: bytes) -> None:
            async with lanes:
                if len(data) > wb.multipart_threshold:
                    await obstore.put_async(store, f"{prefix}/{name}", data, use_multipart=True,
                                            chunk_size=max(wb.part_size, 5 * MiB))
                else:
                    await obstore.put_async(store, f"{prefix}/{name}", data)

        await asyncio.gather(*(one(n, d) for n, d in zip(names(len(files)), files, strict=True)))

    obstore.put(store, f"{prefix}/.warm", b"x")  # the client and a connection up, untimed
    t0 = time.perf_counter()
    asyncio.run(go())
    return time.perf_counter() - t0


def check_objects(folder: Path, files: list[bytes]) -> None:
    """What landed in a store is the bytes written (sizes, and head and tail of each)."""
    for name, data in zip(names(len(files)), files, strict=True):
        path = folder / name
        if path.stat().st_size != len(data):
            raise RuntimeError(f"{path}: {path.stat().st_size} bytes, wrote {len(data)}")
        with open(path, "rb") as f:
            head = f.read(MiB)
            f.seek(max(0, len(data) - MiB))
            tail = f.read()
        if head != data[:MiB] or tail != data[max(0, len(data) - MiB):]:
            raise RuntimeError(f"{path}: bytes differ from what was written")


def small_file_fsync(folder: Path, count: int = 200) -> list[float]:
    """Create + write 4 KiB + fsync + rename + fsync of the directory: the least an acknowledged
    small write costs on this disk."""
    folder.mkdir(parents=True, exist_ok=True)
    body = os.urandom(4096)
    dir_fd = os.open(folder, os.O_RDONLY)
    out = []
    try:
        for i in range(count):
            t0 = time.perf_counter()
            tmp = folder / f".{i}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, folder / f"{i}.bin")
            os.fsync(dir_fd)
            out.append(time.perf_counter() - t0)
    finally:
        os.close(dir_fd)
    return out


def boto3_puts(endpoint: str, bucket: str, count: int) -> list[float]:
    """4 KiB PUTs of new keys with boto3 (its pool keeps the connection alive); seconds each."""
    import boto3
    from botocore.config import Config

    s3 = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=AK, aws_secret_access_key=SK,
        region_name="us-east-1",
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                      retries={"max_attempts": 1}),
    )
    body = os.urandom(4096)
    for i in range(20):  # connection up, code paths warm
        s3.put_object(Bucket=bucket, Key=f"warm/{i}.bin", Body=body)
    out = []
    for i in range(count):
        t0 = time.perf_counter()
        s3.put_object(Bucket=bucket, Key=f"small/{i:05d}.bin", Body=body)
        out.append(time.perf_counter() - t0)
    return out


@contextlib.contextmanager
def null_s3() -> Iterator[str]:
    """An HTTP server that reads each PUT's body and answers 200 with an ETag, doing nothing
    else: what boto3 itself costs per PUT here."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("ETag", '"0"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def emulated_store(root: Path, first_byte_ms: float, rate_per_conn: str, rate_total: str,
                   etag: str = "md5") -> Iterator[str]:
    import subprocess

    (root / BUCKET).mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [PY, str(ROOT / "bench" / "ufs_server.py"), str(root), "--first-byte-ms", str(first_byte_ms),
         "--rate-per-conn", rate_per_conn, "--rate-total", rate_total, "--etag", etag],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"ufs_server did not start: {line!r}")
        yield line.rsplit(" ", 1)[-1].strip()
    finally:
        proc.terminate()
        proc.wait(30)


# main ---------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description="depot write-path benchmark")
    parser.add_argument("--size", default="512MiB", help="checkpoint size (the issue's figure: 2GiB)")
    parser.add_argument("--size-mib", type=int, default=None, help=argparse.SUPPRESS)  # older flag
    parser.add_argument("--shards", type=int, default=8, help="files of the sharded variant")
    parser.add_argument("--defer-uploads", default=None,
                        help="the worker's writeback.defer_uploads (default: its default, 5s)")
    parser.add_argument("--no-fuse", dest="fuse", action="store_false",
                        help="leave out the writes through a FUSE mount")
    parser.add_argument("--http-writes", action="store_true",
                        help="stream every write to the worker over HTTP (client.local_writes off)")
    parser.add_argument("--pairs", type=int, default=2,
                        help="rounds of local write + write-back to a local-dir UFS and to the store, order turned around each round")
    parser.add_argument("--layers", type=int, default=32, help="transformer layers of the checkpoint")
    parser.add_argument("--first-byte-ms", type=float, default=20.0, help="emulated store: time to first byte")
    parser.add_argument("--rate-per-conn", default="50MB", help="emulated store: bytes/s per connection")
    parser.add_argument("--rate-total", default="0", help="emulated store: bytes/s in all (0: no cap)")
    parser.add_argument("--store-etag", choices=("md5", "xxh3"), default="xxh3",
                        help="emulated store: ETag hash (md5 as S3 does costs it ~1 CPU-s per GB "
                             "of these cores, which a remote store would not take)")
    parser.add_argument("--puts", type=int, default=500, help="4 KiB S3 PUTs of the latency row")
    parser.add_argument("--dir", default=None, help="scratch directory (default: system temp)")
    args = parser.parse_args()
    size = args.size_mib * MiB if args.size_mib else parse_size(args.size)
    wb = DepotConfig().writeback

    rows: list[tuple[str, str, str]] = []

    def row(name: str, value: str, note: str = "") -> None:
        rows.append((name, value, note))
        print(f"  {name}: {value} {note}", file=sys.stderr, flush=True)

    store_label = (f"{args.first_byte_ms:g} ms first byte, {args.rate_per_conn}/s per connection"
                   + (f", at most {args.rate_total}/s in all" if args.rate_total not in ("0", "") else "")
                   + f", {args.store_etag} ETags")
    load_start = os.getloadavg()[0]
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    row("machine", f"Python {platform.python_version()}", f"{platform.machine()}, {usable} usable cores of {cores}")
    loop_bw = loopback_tcp(min(2048 * MiB, max(256 * MiB, size)))
    row("machine: loopback TCP, 1 stream (Python sendall->recv_into)", f"{loop_bw:.2f} GB/s")

    tensors = make_tensors(size, args.layers)
    variants: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("1 file", lambda: [tensors]),
        (f"{args.shards} shards", lambda: shard(tensors, args.shards)),
    ]
    with tempfile.TemporaryDirectory(prefix="depot-write-bench-", dir=args.dir) as tmp_name:
        tmp = Path(tmp_name)
        ufs_local, ufs_through = tmp / "ufs-local", tmp / "ufs-through"
        ufs_local.mkdir()
        ufs_through.mkdir()
        s3_root = tmp / "s3"
        with emulated_store(s3_root, args.first_byte_ms, args.rate_per_conn, args.rate_total,
                            args.store_etag) as s3_ep:
            options = {"endpoint": s3_ep, "region": "us-east-1", "skip_signature": "true", "path_style": "true"}
            cfg = {
                "worker": {"host": "127.0.0.1", "port": 0},
                "cache": {"page_size": "4MiB", "dirs": [{"path": str(tmp / "cache"), "size": "8GiB"}]},
                "mounts": [
                    {"path": "/", "ufs": ufs_local.as_uri(), "write_mode": "write-back"},
                    {"path": "/through", "ufs": ufs_through.as_uri()},
                    {"path": "/s3wb", "ufs": f"s3://{BUCKET}/wb", "write_mode": "write-back", "options": options},
                    {"path": "/s3through", "ufs": f"s3://{BUCKET}/through", "options": options},
                ],
                "log_level": "warning",
            }
            if args.defer_uploads is not None:
                cfg["writeback"] = {"defer_uploads": args.defer_uploads}
            import yaml

            cfg_file = tmp / "worker.yaml"
            cfg_file.write_text(yaml.safe_dump(cfg))
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "DEPOT_S3_ACCESS_KEY": AK, "DEPOT_S3_SECRET_KEY": SK}
            with contextlib.ExitStack() as stack, deployment("in-worker", cfg_file, env) as (
                s3_gateway, endpoint
            ):
                fs = writer_fs(endpoint, local_writes=not args.http_writes)
                mounted = stack.enter_context(
                    fuse_mount(tmp / "mnt", endpoint, tmp / "mount.log")
                ) if args.fuse else None
                for mount in ("", "/through", "/s3wb", "/s3through"):
                    fs.pipe_file(f"{mount}/warm/x.bin", b"x")  # each mount's under store up, untimed
                sync(endpoint)
                for label, groups in variants:
                    parts = groups()
                    files, ser = serialize(parts)
                    total = sum(len(f) for f in files)
                    row(f"checkpoint, {label}", f"{total / MiB:.0f} MiB",
                        f"{sum(len(g) for g in parts)} float16 tensors, safetensors; "
                        f"serialized in memory at {gbps(total, ser):.2f} GB/s")
                    folder = label.replace(" ", "-")
                    # The local write and the write-back writes (to a local-dir UFS and to the
                    # store), in rounds whose order turns around each time (on this VM the later
                    # of big writes in a row runs on memory the hypervisor took back in between,
                    # and pays to fault it in again).
                    locals_: list[float] = []
                    closes: list[float] = []
                    durables: list[float] = []
                    s3_closes: list[float] = []
                    s3_durables: list[float] = []
                    fuses: list[float] = []
                    s3_wb = s3_root / BUCKET / "wb"
                    for run in range(args.pairs):
                        order = ("local", "wb", "s3wb", "fuse") if mounted else ("local", "wb", "s3wb")
                        for what in order if run % 2 == 0 else order[::-1]:
                            if what == "local":
                                locals_.append(local_write(tmp / "local" / folder, files))
                                shutil.rmtree(tmp / "local")
                            elif what == "wb":
                                closed, _ = fs_write(fs, f"/ckpt-{folder}-{run}", files)
                                durables.append(sync(endpoint))
                                check_objects(ufs_local / f"ckpt-{folder}-{run}", files)
                                closes.append(closed)
                                fs.rm(f"/ckpt-{folder}-{run}", recursive=True)
                            elif what == "fuse":
                                assert mounted is not None
                                fuses.append(file_write(mounted / f"fuse-{folder}-{run}", files))
                                sync(endpoint)
                                check_objects(ufs_local / f"fuse-{folder}-{run}", files)
                                fs.rm(f"/fuse-{folder}-{run}", recursive=True)
                            else:
                                closed, _ = fs_write(fs, f"/s3wb/ckpt-{folder}-{run}", files)
                                s3_durables.append(sync(endpoint))
                                check_objects(s3_wb / f"ckpt-{folder}-{run}", files)
                                s3_closes.append(closed)
                                shutil.rmtree(s3_wb / f"ckpt-{folder}-{run}")
                    local = statistics.mean(locals_)

                    def rates(times: list[float], total: int = total) -> str:
                        return ", ".join(f"{gbps(total, x):.2f}" for x in times)

                    def rounds(times: list[float], locals_: list[float] = locals_) -> str:
                        return ", ".join(
                            f"{'local first' if run % 2 == 0 else 'local last'} {lw / x:.2f}"
                            for run, (lw, x) in enumerate(zip(locals_, times, strict=True)))

                    row(f"  machine: direct local write + fsync, {label}", f"{gbps(total, local):.2f} GB/s",
                        f"{local:.2f} s (mean of {len(locals_)}: {rates(locals_)} GB/s): the floor "
                        "of a write acknowledged as durable here")
                    odirect = direct_write(tmp / "odirect" / folder, files)
                    shutil.rmtree(tmp / "odirect")
                    row(f"  machine: O_DIRECT local write + fsync, {label}", f"{gbps(total, odirect):.2f} GB/s",
                        f"{odirect:.2f} s, once after the rounds: the disk without the page cache "
                        "(what depot's local writes use, docs/writes.md#local-writes)")

                    # under store: a local directory on the same disk
                    closed = statistics.mean(closes)
                    row(f"  local-dir UFS, write-back, {label}: to close", f"{gbps(total, closed):.2f} GB/s",
                        f"{closed:.2f} s (mean of {len(closes)}: {rates(closes)} GB/s); "
                        f"{local / closed:.2f} x the local write's rate (means; rounds: {rounds(closes)})")
                    row(f"  local-dir UFS, write-back, {label}: close -> durable in UFS",
                        f"{statistics.mean(durables):.2f} s", "")
                    if fuses:
                        through_fuse = statistics.mean(fuses)
                        row(f"  local-dir UFS, write-back through FUSE, {label}: to close",
                            f"{gbps(total, through_fuse):.2f} GB/s",
                            f"{through_fuse:.2f} s (mean of {len(fuses)}: {rates(fuses)} GB/s); "
                            f"{local / through_fuse:.2f} x the local write's rate (means; rounds: "
                            f"{rounds(fuses)}); open(.., 'wb') + write + close on `depot mount -o rw`")
                    through = fs_write(fs, f"/through/ckpt-{folder}", files)[0]
                    check_objects(ufs_through / f"ckpt-{folder}", files)
                    row(f"  local-dir UFS, through, {label}: to close (= durable)", f"{gbps(total, through):.2f} GB/s",
                        f"{through:.2f} s; write-back is {through / closed:.2f} x faster to close")
                    shutil.rmtree(ufs_through / f"ckpt-{folder}")

                    # under store: the emulated cloud object store
                    direct = direct_put(s3_ep, f"direct/{folder}", files)
                    check_objects(s3_root / BUCKET / "direct" / folder, files)
                    shutil.rmtree(s3_root / BUCKET / "direct" / folder)
                    lanes = min(wb.concurrency, len(files))
                    row(f"  S3-like store, direct obstore PUT, {label}", f"{gbps(total, direct):.2f} GB/s",
                        f"{direct:.2f} s; the store's own rate: {lanes} file(s) at once, "
                        f"parts of {wb.part_size // MiB} MiB over {wb.multipart_threshold // MiB} MiB "
                        f"(5 MiB below), 12 in flight each")
                    s3_through = fs_write(fs, f"/s3through/ckpt-{folder}", files)[0]
                    check_objects(s3_root / BUCKET / "through" / f"ckpt-{folder}", files)
                    row(f"  S3-like store, through, {label}: to close (= durable)", f"{gbps(total, s3_through):.2f} GB/s",
                        f"{s3_through:.2f} s; {direct / s3_through:.2f} x the store's own rate")
                    wb_closed = statistics.mean(s3_closes)
                    row(f"  S3-like store, write-back, {label}: to close", f"{gbps(total, wb_closed):.2f} GB/s",
                        f"{wb_closed:.2f} s (mean of {len(s3_closes)}: {rates(s3_closes)} GB/s); "
                        f"{local / wb_closed:.2f} x the local write's rate (means; rounds: "
                        f"{rounds(s3_closes)}); {s3_through / wb_closed:.2f} x faster to close than through")
                    # The sync right after the last close starts every upload still held back
                    # (writeback.defer_uploads): its time is the upload's.
                    wb_durable = statistics.mean(s3_durables)
                    upload = gbps(total, wb_durable)
                    row(f"  S3-like store, write-back, {label}: close -> durable in UFS", f"{wb_durable:.2f} s",
                        f"mean of {len(s3_durables)}; upload {upload:.2f} GB/s = "
                        f"{upload / gbps(total, direct):.2f} x the store's own PUT rate")
                    shutil.rmtree(s3_root / BUCKET / "through")
                    del files, parts

                # small objects through the S3 gateway, write-back
                floor = small_file_fsync(tmp / "fsync-probe")
                row("machine: create + write 4 KiB + fsync + rename + fsync dir (p50 / p99)",
                    f"{pct(floor, 0.5) * 1e3:.3f} / {pct(floor, 0.99) * 1e3:.3f} ms",
                    f"{len(floor)} files: the floor of an acknowledged small write")
                with null_s3() as null_endpoint:
                    nulls = boto3_puts(null_endpoint, "null", args.puts)
                row("machine: boto3 PUT 4 KiB to a server that only answers 200 (p50 / p99)",
                    f"{pct(nulls, 0.5) * 1e3:.3f} / {pct(nulls, 0.99) * 1e3:.3f} ms",
                    "the client's own cost per PUT (signing, checksums, HTTP) on this machine")
                puts = boto3_puts(s3_gateway, "s3wb", args.puts)
                p50, p99 = pct(puts, 0.5) * 1e3, pct(puts, 0.99) * 1e3
                row("S3 gateway PUT 4 KiB, write-back over the S3-like store, boto3 (p50 / p99)",
                    f"{p50:.3f} / {p99:.3f} ms",
                    f"{args.puts} PUTs of new keys, keep-alive; Alluxio's S3 write cache: 4-6 ms")
                drained = sync(endpoint)
                landed = len(list((s3_root / BUCKET / "wb" / "small").iterdir()))
                row("  after the last PUT: all durable in the UFS", f"{drained:.2f} s",
                    f"{landed} of {args.puts} objects in the store")
                counters = write_counters(endpoint)
                row("writes the fsspec client staged itself (local writes)",
                    f"{counters['local_writes']} of {counters['writes']}",
                    "write-back writes to this node's worker (docs/writes.md#local-writes); "
                    "the rest went over HTTP" + (" (--http-writes)" if args.http_writes else ""))
    row("machine: load average (1 min) at start, at end", f"{load_start:.1f}, {os.getloadavg()[0]:.1f}",
        "shared cores: figures drift with it")
    print(f"\nUFS: S3-like store = bench/ufs_server.py ({store_label})")
    print("\n| measurement | result | notes |\n|---|---|---|")
    for name, value, note in rows:
        print(f"| {name} | {value} | {note} |")


if __name__ == "__main__":
    main()
