"""The readers the suite measures next to depot, each on the same object of the same store.

Every function reads one object of ``bench/ufs_server.py`` (bucket ``bucket``, path-style,
unsigned) and returns what it read and how long it took; none of them keeps the bytes. A peer
whose package is missing is named by :func:`missing` with the command that installs it, so the
suite can report it instead of dropping it.

- one plain GET stream (``http.client``, the floor any S3 reader starts from);
- boto3 ``download_file`` with its default transfer settings (threads, 8 MiB parts);
- s3fs (fsspec's S3 filesystem) read directly, in 8 MiB reads;
- fsspec ``simplecache`` and ``blockcache`` over s3fs: a first (cold) and a second (hot) read;
- obstore: one ``get`` stream, and 16 concurrent 8 MiB ranges;
- Run:ai Model Streamer reading a safetensors file to CPU memory, in a process of its own
  (``python bench/peers.py runai-child s3://bucket/KEY ENDPOINT``), since it is configured by
  environment variables and starts its own threads (its S3 client sends absolute-form request
  targets, ``GET http://host:port/bucket/key``, which the store accepts).
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BENCH = Path(__file__).resolve().parent
PY = sys.executable
MiB = 1024 * 1024
BUCKET = "bucket"
REGION = "us-east-1"

#: peer -> (modules it needs, how to install them)
REQUIREMENTS: dict[str, tuple[tuple[str, ...], str]] = {
    "boto3": (("boto3",), "pip install boto3"),
    "s3fs": (("s3fs",), "pip install s3fs"),
    "simplecache": (("s3fs",), "pip install s3fs"),
    "blockcache": (("s3fs",), "pip install s3fs"),
    "obstore": (("obstore",), "pip install obstore"),
    "runai": (
        ("runai_model_streamer", "runai_model_streamer_s3", "torch"),
        "pip install runai-model-streamer runai-model-streamer-s3 torch (a CPU-only torch wheel "
        "is enough)",
    ),
}


def missing(peer: str) -> str | None:
    """``None`` if ``peer`` can run here, else ``not installed (pip install ...)``."""
    modules, hint = REQUIREMENTS[peer]
    if all(importlib.util.find_spec(m) is not None for m in modules):
        return None
    return f"not installed ({hint})"


def _timed(fn: Any) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = int(fn())
    return n, time.perf_counter() - t0


# one plain stream ----------------------------------------------------------------------------------

def plain_get(endpoint: str, key: str) -> tuple[int, float]:
    """One GET of the whole object on one connection, received into a reused 4 MiB buffer."""
    url = urlsplit(endpoint)
    buf = bytearray(4 * MiB)
    view = memoryview(buf)

    def go() -> int:
        conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=120)
        try:
            conn.request("GET", f"/{BUCKET}/{key}")
            resp = conn.getresponse()
            if resp.status != 200:
                raise OSError(f"GET {key}: HTTP {resp.status}")
            total = 0
            while n := resp.readinto(view):
                total += n
            return total
        finally:
            conn.close()

    return _timed(go)


# boto3 ---------------------------------------------------------------------------------------------

def _boto3_client(endpoint: str) -> Any:
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(signature_version=UNSIGNED, s3={"addressing_style": "path"})
    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION, config=config)


def boto3_download_file(endpoint: str, key: str, dest: Path) -> tuple[int, float]:
    """``download_file`` to a local file with boto3's default ``TransferConfig``."""
    client = _boto3_client(endpoint)
    try:
        t0 = time.perf_counter()
        client.download_file(BUCKET, key, str(dest))
        seconds = time.perf_counter() - t0
        return dest.stat().st_size, seconds
    finally:
        dest.unlink(missing_ok=True)
        client.close()


# fsspec: s3fs and the caches over it ---------------------------------------------------------------

def _s3_options(endpoint: str) -> dict[str, Any]:
    return {"anon": True, "endpoint_url": endpoint, "client_kwargs": {"region_name": REGION}}


def _read_loop(fs: Any, path: str, chunk: int = 8 * MiB) -> int:
    total = 0
    with fs.open(path, "rb") as f:
        while data := f.read(chunk):
            total += len(data)
    return total


def s3fs_read(endpoint: str, key: str) -> tuple[int, float]:
    """s3fs read directly, ``open().read(8 MiB)`` in a loop (its default block size and cache)."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **_s3_options(endpoint))
    return _timed(lambda: _read_loop(fs, f"{BUCKET}/{key}"))


def fsspec_cache_reads(
    protocol: str, endpoint: str, key: str, cache_dir: Path
) -> tuple[tuple[int, float], tuple[int, float]]:
    """``simplecache`` or ``blockcache`` over s3fs: (first read, cold), (second read, hot)."""
    import fsspec

    cache_dir.mkdir(parents=True, exist_ok=True)
    fs = fsspec.filesystem(
        protocol, target_protocol="s3", target_options=_s3_options(endpoint),
        cache_storage=str(cache_dir), skip_instance_cache=True,
    )  # fmt: skip
    path = f"s3://{BUCKET}/{key}"
    cold = _timed(lambda: _read_loop(fs, path))
    hot = _timed(lambda: _read_loop(fs, path))
    return cold, hot


# obstore -------------------------------------------------------------------------------------------

def obstore_get(endpoint: str, key: str) -> tuple[int, float]:
    """obstore ``get`` of the whole object: one stream, consumed chunk by chunk."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(BUCKET, endpoint=endpoint, skip_signature=True, region=REGION,
                    client_options={"allow_http": True}, virtual_hosted_style_request=False)  # fmt: skip

    def go() -> int:
        return sum(len(chunk) for chunk in obstore.get(store, key).stream(min_chunk_size=8 * MiB))

    return _timed(go)


# Run:ai Model Streamer -----------------------------------------------------------------------------

def runai_env(endpoint: str) -> dict[str, str]:
    """What the streamer needs to read an unsigned, path-style S3-compatible endpoint."""
    return {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
        "RUNAI_STREAMER_S3_UNSIGNED": "1",
        "RUNAI_STREAMER_LOG_LEVEL": "WARNING",
    }


def runai_stream(endpoint: str, key: str, timeout: float = 1800) -> dict[str, Any]:
    """Stream ``s3://bucket/KEY`` to CPU tensors with the streamer's default settings, in a
    child process; returns ``{"bytes", "seconds", "tensors"}`` (the time covers the file's
    header and every tensor, not the child's imports)."""
    proc = subprocess.run(
        [PY, str(BENCH / "peers.py"), "runai-child", f"s3://{BUCKET}/{key}"],
        env=runai_env(endpoint), capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"runai streamer exited {proc.returncode}: {' | '.join(tail)}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _runai_child(uri: str) -> None:
    import torch  # noqa: F401  (the streamer yields torch tensors)
    from runai_model_streamer import SafetensorsStreamer

    total = 0
    tensors = 0
    t0 = time.perf_counter()
    with SafetensorsStreamer() as streamer:
        streamer.stream_file(uri, device="cpu")
        for _name, tensor in streamer.get_tensors():
            total += tensor.numel() * tensor.element_size()
            tensors += 1
    seconds = time.perf_counter() - t0
    print(json.dumps({"bytes": total, "seconds": seconds, "tensors": tensors}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "runai-child":
        _runai_child(sys.argv[2])
    else:
        sys.exit("usage: python bench/peers.py runai-child s3://bucket/KEY  (used by the suite)")
