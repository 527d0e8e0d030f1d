"""S3 gateway benchmark: hot GETs through real S3 clients, with this machine's limits.

Prints one markdown table; every figure is measured in the same run, so each is also a ratio:

- loopback TCP (one Python stream, sendall -> recv_into: the same limit bench/read_bench.py uses);
- GET of a hot 1 GiB object with 8 concurrent ranged requests (8 MiB each), with obstore
  (``get_range_async`` x 8 in flight) and with boto3's transfer manager (``download_fileobj``,
  ``max_concurrency=8``) into a discarding sink; best of ``--runs``;
- GET of a hot 4 KiB object with a keep-alive raw HTTP client (one connection, signed request):
  p50 / p99 over ``--requests`` GETs; the same through the worker's own HTTP API as the floor;
- the client's own ceiling: the same obstore reads from a process that serves the bytes from memory
  with the same HTTP server and nothing else, and from nginx serving the file from the page cache
  (when nginx is installed: ``make bench`` installs it as root), a server that spends far less CPU
  per byte than any Python one.

Two deployments are measured: the gateway inside the worker process (``worker.s3_port``: one
process, one event loop serves S3 and the worker API) and standalone (``depot s3``, its own
process, in front of a worker process). The client always runs in this process. Data lives in a
temp dir deleted at the end. Run: ``.venv/bin/python bench/s3_bench.py [--size-mib 1024]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MiB = 1024 * 1024
AK, SK = "BENCHACCESSKEY", "bench/secret/key"






# machine limit: the same measurement as the read-path bench, so the tables compare
sys.path.insert(0, str(Path(__file__).resolve().parent))
from read_bench import gbps, loopback_tcp, pct  # noqa: E402

# servers ------------------------------------------------------------------------------------------

def serve(config_path: str, with_gateway: bool) -> None:
    """Child process: a worker (and the gateway in its loop, as ``worker.s3_port`` runs it)."""
    from depot.client.client import CacheClient
    from depot.core.config import load_config
    from depot.s3.server import start_gateway
    from depot.worker.daemon import Worker

    async def main() -> None:
        cfg = load_config(config_path)
        worker = Worker(cfg)
        await worker.start()
        info: dict[str, str] = {"worker": worker.endpoint}
        if with_gateway:
            client = CacheClient(worker.endpoint, config=cfg)
            gateway = await start_gateway(cfg, client, "127.0.0.1", 0)
            info["s3"] = gateway.endpoint
        print(json.dumps(info), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


@contextlib.contextmanager
def nginx(root: Path, tmp: Path) -> Iterator[str | None]:
    """nginx (C, epoll, sendfile off: read + write, which measured faster than sendfile on this
    VM's loopback) serving ``root`` on a free port, or None when nginx is not installed. A second
    ceiling for the client with a server that spends far less CPU per byte than any Python one."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if binary is None:
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"worker_processes 1; daemon off; pid {tmp / 'nginx.pid'}; error_log {tmp / 'nginx.err'};\n"
        "events { worker_connections 256; }\n"
        f"http {{ access_log off; sendfile off; output_buffers 2 4m; keepalive_requests 100000;\n"
        f"  client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp};\n"
        f"  uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n"
        f"  server {{ listen 127.0.0.1:{port}; root {root}; }} }}\n"
    )
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(tmp)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    yield None
                    return
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def serve_memory(size: int) -> None:
    """Child process: the same HTTP server answering ranged GETs from memory (no depot, no auth).

    What an S3 client can pull from one Python process on this machine: the ceiling that any
    Python server, depot's included, could reach with this client.
    """
    from depot.worker.http import HttpServer, Request, ResponseWriter

    data = memoryview(os.urandom(size))

    async def handler(request: Request, writer: ResponseWriter) -> None:
        spec = (request.header("range") or f"bytes=0-{size - 1}").removeprefix("bytes=")
        first, _, last = spec.partition("-")
        start, end = int(first), min(size, int(last) + 1)
        headers = [("Content-Range", f"bytes {start}-{end - 1}/{size}"), ("ETag", '"x"'),
                   ("Last-Modified", "Tue, 14 Nov 2023 22:13:20 GMT")]
        writer.start(206, headers, end - start)
        writer.write(data[start:end])
        await writer.flush()

    async def main() -> None:
        server = HttpServer(handler)
        port = await server.start("127.0.0.1", 0)
        print(json.dumps({"s3": f"http://127.0.0.1:{port}"}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str]) -> Iterator[str]:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{args} did not start")
        yield line.strip()
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def deployment(mode: str, cfg_file: Path, env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(S3 endpoint, worker endpoint) of a running deployment."""
    if mode == "in-worker":
        with process([PY, __file__, "--serve", str(cfg_file), "--with-gateway"], env) as line:
            info = json.loads(line)
            yield info["s3"], info["worker"]
        return
    with process([PY, __file__, "--serve", str(cfg_file)], env) as line:
        worker = json.loads(line)["worker"]
        code = "from depot.cli.s3 import s3_command; s3_command()"
        args = [PY, "-c", code, "--port", "0", "--endpoint", worker, "--config", str(cfg_file)]
        with process(args, env) as banner:
            yield banner.split(" listening on ", 1)[1].split(" ", 1)[0], worker


# clients ------------------------------------------------------------------------------------------

def obstore_ranges(endpoint: str, key: str, size: int, chunk: int = 8 * MiB, lanes: int = 8) -> float:
    import obstore as obs
    from obstore.store import S3Store

    bucket, _, path = key.partition("/")
    store = S3Store(
        bucket, endpoint=endpoint, access_key_id=AK, secret_access_key=SK, region="us-east-1",
        virtual_hosted_style_request=False, client_options={"allow_http": True, "pool_max_idle_per_host": "16"},
    )

    async def run() -> int:
        starts = list(range(0, size, chunk))
        it = iter(starts)
        total = 0

        async def lane() -> None:
            nonlocal total
            for start in it:
                data = await obs.get_range_async(store, path, start=start, end=min(size, start + chunk))
                total += len(memoryview(data))

        await asyncio.gather(*(lane() for _ in range(lanes)))
        return total

    asyncio.run(run())  # connections up
    t0 = time.perf_counter()
    total = asyncio.run(run())
    dt = time.perf_counter() - t0
    assert total == size, (total, size)
    return gbps(total, dt)


class Sink:
    """A seekable file that keeps nothing (what a download writes into, minus the disk)."""

    def __init__(self) -> None:
        self.pos = 0
        self.total = 0

    def write(self, data: bytes) -> int:
        self.total += len(data)
        self.pos += len(data)
        return len(data)

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos
        return self.pos

    def tell(self) -> int:
        return self.pos


def boto3_transfer(endpoint: str, key: str, size: int) -> float:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    s3 = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=AK, aws_secret_access_key=SK,
        region_name="us-east-1", config=Config(signature_version="s3v4", max_pool_connections=16),
    )
    config = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=8)
    bucket, _, path = key.partition("/")
    s3.download_fileobj(bucket, path, Sink(), Config=config)  # connections up
    sink = Sink()
    t0 = time.perf_counter()
    s3.download_fileobj(bucket, path, sink, Config=config)
    dt = time.perf_counter() - t0
    assert sink.total == size
    return gbps(size, dt)


def raw_latencies(
    endpoint: str, target: str, headers: dict[str, str], count: int, method: str = "GET", body: bytes = b""
) -> list[float]:
    """``method`` ``target`` ``count`` times on one keep-alive connection; seconds per request."""
    host, port = endpoint.rsplit("/", 1)[-1].split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}"] + [f"{k}: {v}" for k, v in headers.items()]
    if method == "PUT":
        lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        sock.sendall(request)
        filled = 0
        while True:
            n = sock.recv_into(view[filled:])
            if not n:
                raise RuntimeError("connection closed")
            filled += n
            end = buf.find(b"\r\n\r\n", 0, filled)
            if end >= 0:
                break
        head = bytes(buf[:end]).decode("latin-1")
        if not head.startswith("HTTP/1.1 200"):
            raise RuntimeError(head.split("\r\n", 1)[0])
        length = int(head.lower().split("content-length:", 1)[1].split("\r\n", 1)[0])
        while filled < end + 4 + length:
            filled += sock.recv_into(view[filled:])
        out.append(time.perf_counter() - t0)
    sock.close()
    return out


def small_get(endpoint: str, key: str, count: int) -> list[float]:
    from depot.s3.sigv4 import Credentials, sign_headers

    host = endpoint.rsplit("/", 1)[-1]
    path = "/" + key
    headers = sign_headers(Credentials(AK, SK), "GET", path, "", {"host": host})
    raw_latencies(endpoint, path, headers, 200)
    return raw_latencies(endpoint, path, headers, count)


def small_put(endpoint: str, key: str, count: int) -> list[float]:
    """PUT 4 KiB (signed, x-amz-content-sha256 a hex digest, as boto3 sends over http)."""
    import hashlib

    from depot.s3.sigv4 import Credentials, sign_headers

    host = endpoint.rsplit("/", 1)[-1]
    path = "/" + key
    body = os.urandom(4096)
    digest = hashlib.sha256(body).hexdigest()
    headers = sign_headers(Credentials(AK, SK), "PUT", path, "", {"host": host}, payload_hash=digest)
    raw_latencies(endpoint, path, headers, 50, "PUT", body)
    return raw_latencies(endpoint, path, headers, count, "PUT", body)


def worker_small_get(endpoint: str, path: str, count: int) -> list[float]:
    from urllib.parse import quote

    target = f"/api/v1/read?path={quote(path, safe='')}"
    raw_latencies(endpoint, target, {}, 200)
    return raw_latencies(endpoint, target, {}, count)


# main ---------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description="depot S3 gateway benchmark")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--requests", type=int, default=5000, help="4 KiB GETs per latency row")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default="in-worker,standalone")
    parser.add_argument("--puts", type=int, default=1000, help="4 KiB PUTs per latency row")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--with-gateway", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-memory", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.with_gateway)
        return
    if args.serve_memory:
        serve_memory(args.serve_memory)
        return

    import yaml

    rows: list[tuple[str, str, str]] = []

    def row(name: str, value: str, note: str = "") -> None:
        rows.append((name, value, note))
        print(f"  {name}: {value} {note}", file=sys.stderr, flush=True)

    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="depot-s3-bench-") as tmp_s:
        tmp = Path(tmp_s)
        data = tmp / "data" / "bench"
        data.mkdir(parents=True)
        with open(data / "big.bin", "wb") as f:
            block = os.urandom(16 * MiB)
            for _ in range(size // len(block)):
                f.write(block)
            f.write(block[: size % len(block)])
        (data / "small.bin").write_bytes(os.urandom(4096))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "DEPOT_S3_ACCESS_KEY": AK, "DEPOT_S3_SECRET_KEY": SK}

        cores = os.cpu_count() or 0
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
        row("machine", f"Python {platform.python_version()}", f"{platform.processor() or platform.machine()}, {usable} usable cores of {cores}")
        loop_bw = max(loopback_tcp() for _ in range(args.runs))
        row("machine: loopback TCP, 1 stream (Python sendall->recv_into)", f"{loop_bw:.2f} GB/s", "best of runs")
        with process([PY, __file__, "--serve-memory", str(size)], env) as line:
            ceiling = max(obstore_ranges(json.loads(line)["s3"], "bench/big.bin", size) for _ in range(args.runs))
        row(f"machine: obstore 8 x 8 MiB ranges of {args.size_mib} MiB from memory, same HTTP server, no depot",
            f"{ceiling:.2f} GB/s", f"{ceiling / loop_bw:.2f} x loopback: this client's ceiling here")
        with nginx(tmp / "data", tmp) as url:
            if url is None:
                row("machine: obstore 8 x 8 MiB ranges from nginx", "n/a", "nginx not installed")
            else:
                native = max(obstore_ranges(url, "bench/big.bin", size) for _ in range(args.runs))
                row(f"machine: obstore 8 x 8 MiB ranges of {args.size_mib} MiB from nginx (page cache)",
                    f"{native:.2f} GB/s", f"{native / loop_bw:.2f} x loopback: the same client with a C server")

        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            cfg = {
                "worker": {"host": "127.0.0.1", "port": 0},
                "cache": {"page_size": "4MiB", "dirs": [{"path": str(tmp / f"cache-{mode}"), "size": "4GiB"}]},
                "mounts": [{"path": "/", "ufs": (tmp / "data").as_uri(), "metadata": "max-age=600s",
                            "write_mode": "cache-through"}],
                "log_level": "warning",
            }
            cfg_file = tmp / f"{mode}.yaml"
            cfg_file.write_text(yaml.safe_dump(cfg))
            with deployment(mode, cfg_file, env) as (s3, worker):
                t0 = time.perf_counter()
                obstore_ranges(s3, "bench/big.bin", size)  # warms: every page filled once
                row(f"[{mode}] cold fill of {args.size_mib} MiB (obstore, 8 x 8 MiB ranges; UFS = local dir in page cache)",
                    f"{time.perf_counter() - t0:.2f} s", "includes one warm-up pass")

                def best(fn: Callable[[], float]) -> float:
                    return max(fn() for _ in range(args.runs))

                ob = best(lambda: obstore_ranges(s3, "bench/big.bin", size))
                row(f"[{mode}] hot GET {args.size_mib} MiB, obstore 8 concurrent 8 MiB ranges", f"{ob:.2f} GB/s",
                    f"{ob / loop_bw:.2f} x loopback (target >= 0.7); {ob / ceiling:.2f} x the client's ceiling")
                bt = best(lambda: boto3_transfer(s3, "bench/big.bin", size))
                row(f"[{mode}] hot GET {args.size_mib} MiB, boto3 download_fileobj (8 threads x 8 MiB)", f"{bt:.2f} GB/s",
                    f"{bt / loop_bw:.2f} x loopback (target >= 0.7)")
                lat = small_get(s3, "bench/small.bin", args.requests)
                p50, p99 = pct(lat, 0.5) * 1e3, pct(lat, 0.99) * 1e3
                ok = "met" if p50 <= 0.5 and p99 <= 2.0 else "NOT met"
                row(f"[{mode}] hot GET 4 KiB, raw keep-alive client, signed (p50 / p99)", f"{p50:.3f} / {p99:.3f} ms",
                    f"{args.requests} GETs; target 0.5 / 2 ms: {ok}")
                puts = small_put(s3, "bench/put.bin", args.puts)
                p50, p99 = pct(puts, 0.5) * 1e3, pct(puts, 0.99) * 1e3
                ok = "met" if p50 <= 5.0 else "NOT met"
                row(f"[{mode}] PUT 4 KiB, cache-through to a local-dir UFS, raw keep-alive client, signed (p50 / p99)",
                    f"{p50:.3f} / {p99:.3f} ms", f"{args.puts} PUTs of one key; target p50 5 ms: {ok}")
                floor = worker_small_get(worker, "/bench/small.bin", args.requests)
                row(f"[{mode}] floor: 4 KiB through the worker API, same client (p50 / p99)",
                    f"{pct(floor, 0.5) * 1e3:.3f} / {pct(floor, 0.99) * 1e3:.3f} ms", "no S3, no second hop")

    print("\n| measurement | result | notes |\n|---|---|---|")
    for name, value, note in rows:
        print(f"| {name} | {value} | {note} |")


if __name__ == "__main__":
    main()
