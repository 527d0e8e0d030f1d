"""The S3 gateway with real S3 clients: boto3, the aws CLI, s3fs, pyarrow, obstore, rclone.

One worker over a local-directory UFS and one gateway in front of it (the way ``worker.s3_port``
runs it: a ``CacheClient`` of the worker's own endpoint), shared by the module. Each client lists,
stats and reads, including large objects, ranged reads, thousands of keys with paging,
conditional requests, presigned URLs, wrong keys and write attempts.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from depot.client.client import CacheClient
from depot.core.config import DepotConfig, load_config
from depot.s3.server import GatewayServer, start_gateway
from depot.testing.local import LocalWorker

from .conftest import missing

pytestmark = pytest.mark.integration

AK = "DEPOTTESTACCESSKEY"
SK = "depot/test+secret/key"
REGION = "us-east-1"
MiB = 1024 * 1024
BIG_SIZE = 48 * MiB + 12345
MANY = 2500


def _big() -> bytes:
    block = hashlib.sha256(b"depot").digest() * (MiB // 32)
    return b"".join(bytes([i]) + block[1:] for i in range(BIG_SIZE // MiB + 1))[:BIG_SIZE]


BIG = _big()


@dataclass
class Gateway:
    endpoint: str
    port: int
    data: Path
    worker: LocalWorker
    running: GatewayServer


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("s3ufs")
    bucket = data / "bkt"
    (bucket / "dir" / "sub").mkdir(parents=True)
    (bucket / "hello.txt").write_bytes(b"hello depot\n")
    (bucket / "empty").write_bytes(b"")
    (bucket / "dir" / "a.json").write_bytes(b'{"a": 1}')
    (bucket / "dir" / "sub" / "b.csv").write_bytes(b"x,y\n1,2\n")
    (bucket / "odd name+&.txt").write_bytes(b"odd")
    (bucket / "big.bin").write_bytes(BIG)
    table = pa.table({"id": list(range(10_000)), "name": [f"n{i}" for i in range(10_000)]})
    pq.write_table(table, bucket / "t.parquet", row_group_size=2500)
    many = data / "many"
    for i in range(MANY):
        sub = many / f"d{i % 5}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05d}.txt").write_bytes(b"%d\n" % i)
    (data / "other").mkdir()
    (data / "other" / "x").write_bytes(b"x")
    cache = tmp_path_factory.mktemp("s3cache")
    with LocalWorker(ufs_uri=data.as_uri(), cache_dir=cache, cache_size="512MiB") as worker:
        config = load_config(
            environ={},
            overrides={
                "s3": {"access_key": AK, "secret_key": SK, "region": REGION},
                "mounts": [{"path": "/", "ufs": data.as_uri()}],
            },
        )

        async def start() -> GatewayServer:
            client = CacheClient(worker.endpoint, config=config)
            return await start_gateway(config, client, "127.0.0.1", 0, environ={})

        running: GatewayServer = worker.call(start())
        try:
            yield Gateway(running.endpoint, running.port, data, worker, running)
        finally:
            worker.call(running.stop())


# --- boto3 -------------------------------------------------------------------------------------------


def boto(gw: Gateway, key: str = AK, secret: str = SK, **config: Any) -> Any:
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]

    return boto3.client(
        "s3",
        endpoint_url=gw.endpoint,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name=REGION,
        config=Config(signature_version="s3v4", retries={"max_attempts": 1}, **config),
    )


def test_boto3_buckets_and_objects(gateway: Gateway) -> None:
    from botocore.exceptions import ClientError  # type: ignore[import-untyped]

    s3 = boto(gateway)
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["bkt", "many", "other"]
    s3.head_bucket(Bucket="bkt")
    assert s3.get_bucket_location(Bucket="bkt")["LocationConstraint"] is None
    with pytest.raises(ClientError) as info:
        s3.head_bucket(Bucket="nope")
    assert info.value.response["Error"]["Code"] == "404"
    head = s3.head_object(Bucket="bkt", Key="hello.txt")
    assert head["ContentLength"] == 12 and head["ContentType"] == "text/plain"
    got = s3.get_object(Bucket="bkt", Key="hello.txt")
    assert got["Body"].read() == b"hello depot\n" and got["ETag"] == head["ETag"]
    assert got["LastModified"] == head["LastModified"]
    assert s3.get_object(Bucket="bkt", Key="odd name+&.txt")["Body"].read() == b"odd"
    assert s3.get_object(Bucket="bkt", Key="empty")["Body"].read() == b""
    # ranges: closed, open, suffix
    r = s3.get_object(Bucket="bkt", Key="big.bin", Range="bytes=1000-1999")
    assert r["Body"].read() == BIG[1000:2000] and r["ContentRange"] == f"bytes 1000-1999/{BIG_SIZE}"
    assert s3.get_object(Bucket="bkt", Key="big.bin", Range=f"bytes={BIG_SIZE - 10}-")["Body"].read() == BIG[-10:]
    assert s3.get_object(Bucket="bkt", Key="big.bin", Range="bytes=-7")["Body"].read() == BIG[-7:]
    with pytest.raises(ClientError) as info:
        s3.get_object(Bucket="bkt", Key="big.bin", Range=f"bytes={BIG_SIZE}-")
    assert info.value.response["Error"]["Code"] == "InvalidRange"
    for key, code in [("nope", "NoSuchKey"), ("dir", "NoSuchKey"), ("../other/x", "InvalidArgument")]:
        with pytest.raises(ClientError) as info:
            s3.get_object(Bucket="bkt", Key=key)
        assert info.value.response["Error"]["Code"] == code
    with pytest.raises(ClientError) as info:
        s3.get_object(Bucket="nope", Key="x")
    assert info.value.response["Error"]["Code"] == "NoSuchBucket"


def test_boto3_conditional_requests(gateway: Gateway) -> None:
    from botocore.exceptions import ClientError

    s3 = boto(gateway)
    head = s3.head_object(Bucket="bkt", Key="hello.txt")
    etag, modified = head["ETag"], head["LastModified"]
    assert s3.get_object(Bucket="bkt", Key="hello.txt", IfMatch=etag)["Body"].read() == b"hello depot\n"
    with pytest.raises(ClientError) as info:
        s3.get_object(Bucket="bkt", Key="hello.txt", IfNoneMatch=etag)
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 304
    with pytest.raises(ClientError) as info:
        s3.get_object(Bucket="bkt", Key="hello.txt", IfMatch='"not-it"')
    assert info.value.response["Error"]["Code"] == "PreconditionFailed"
    with pytest.raises(ClientError) as info:
        s3.get_object(Bucket="bkt", Key="hello.txt", IfModifiedSince=modified)
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 304
    with pytest.raises(ClientError) as info:
        s3.head_object(Bucket="bkt", Key="hello.txt", IfUnmodifiedSince=modified.replace(year=2000))
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    # the connection pool is still usable after a 304 without a body
    assert s3.get_object(Bucket="bkt", Key="hello.txt")["Body"].read() == b"hello depot\n"


def test_boto3_listing_thousands_with_paging(gateway: Gateway) -> None:
    s3 = boto(gateway)
    pages = list(s3.get_paginator("list_objects_v2").paginate(Bucket="many"))
    keys = [c["Key"] for p in pages for c in p.get("Contents", [])]
    assert len(pages) == 3 and len(keys) == MANY and keys == sorted(keys)
    assert keys[0] == "d0/f00000.txt" and keys[-1] == "d4/f02499.txt"
    small = list(s3.get_paginator("list_objects_v2").paginate(Bucket="many", Prefix="d3/", PaginationConfig={"PageSize": 170}))
    assert sum(p["KeyCount"] for p in small) == MANY // 5 and len(small) == 3
    v1 = list(s3.get_paginator("list_objects").paginate(Bucket="many", PaginationConfig={"PageSize": 400}))
    assert [c["Key"] for p in v1 for c in p["Contents"]] == keys
    top = s3.list_objects_v2(Bucket="bkt", Delimiter="/")
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["dir/"]
    assert "odd name+&.txt" in [c["Key"] for c in top["Contents"]]  # url-encoded on the wire, decoded by botocore
    listed = {c["Key"]: c for c in s3.list_objects_v2(Bucket="bkt", Prefix="hello")["Contents"]}
    assert listed["hello.txt"]["ETag"] == s3.head_object(Bucket="bkt", Key="hello.txt")["ETag"]
    after = s3.list_objects_v2(Bucket="many", StartAfter="d4/f02490.txt")
    assert [c["Key"] for c in after["Contents"]] == ["d4/f02494.txt", "d4/f02499.txt"]
    v1_delim = s3.list_objects(Bucket="many", Delimiter="/", MaxKeys=2)
    assert [p["Prefix"] for p in v1_delim["CommonPrefixes"]] == ["d0/", "d1/"]
    assert v1_delim["IsTruncated"] and v1_delim["NextMarker"] == "d1/"


def test_boto3_large_download_with_transfer(gateway: Gateway, tmp_path: Path) -> None:
    from boto3.s3.transfer import TransferConfig  # type: ignore[import-untyped]

    s3 = boto(gateway, max_pool_connections=16)
    target = tmp_path / "big.bin"
    config = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB, max_concurrency=8)
    s3.download_file("bkt", "big.bin", str(target), Config=config)
    assert target.read_bytes() == BIG


def test_boto3_presigned_urls(gateway: Gateway) -> None:
    s3 = boto(gateway)
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "bkt", "Key": "hello.txt"}, ExpiresIn=60)
    assert "X-Amz-Signature=" in url
    with urllib.request.urlopen(url) as response:
        assert response.read() == b"hello depot\n"
    ranged = urllib.request.Request(url, headers={"Range": "bytes=0-4"})
    with urllib.request.urlopen(ranged) as response:
        assert response.status == 206 and response.read() == b"hello"
    override = s3.generate_presigned_url(
        "get_object", Params={"Bucket": "bkt", "Key": "hello.txt", "ResponseContentType": "x/y"}, ExpiresIn=60
    )
    with urllib.request.urlopen(override) as response:
        assert response.headers["Content-Type"] == "x/y"
    for bad_url, code in [
        (url.replace("hello.txt", "empty"), "SignatureDoesNotMatch"),
        (url.replace("X-Amz-Expires=60", "X-Amz-Expires=61"), "SignatureDoesNotMatch"),
        (boto(gateway, secret="wrong").generate_presigned_url("get_object", Params={"Bucket": "bkt", "Key": "hello.txt"}), "SignatureDoesNotMatch"),
    ]:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(bad_url)
        assert info.value.code == 403 and f"<Code>{code}</Code>".encode() in info.value.read()
    short = s3.generate_presigned_url("get_object", Params={"Bucket": "bkt", "Key": "hello.txt"}, ExpiresIn=1)
    time.sleep(2.1)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(short)
    body = info.value.read()
    assert info.value.code == 403 and b"<Code>AccessDenied</Code>" in body and b"expired" in body


def test_boto3_wrong_keys_and_writes(gateway: Gateway) -> None:
    from botocore.exceptions import ClientError

    for client, code in [
        (boto(gateway, secret="wrong"), "SignatureDoesNotMatch"),
        (boto(gateway, key="NOBODY"), "InvalidAccessKeyId"),
    ]:
        with pytest.raises(ClientError) as info:
            client.get_object(Bucket="bkt", Key="hello.txt")
        assert info.value.response["Error"]["Code"] == code
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    unsigned = urllib.request.Request(f"{gateway.endpoint}/bkt/hello.txt")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(unsigned)
    assert info.value.code == 403 and b"<Code>AccessDenied</Code>" in info.value.read()
    s3 = boto(gateway)
    with pytest.raises(ClientError) as info:
        s3.put_object_acl(Bucket="bkt", Key="hello.txt", ACL="private")
    assert info.value.response["Error"]["Code"] == "NotImplemented"
    with pytest.raises(ClientError) as info:
        boto(gateway, secret="wrong").put_object(Bucket="bkt", Key="new.txt", Body=b"x")
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert not (gateway.data / "bkt" / "new.txt").exists()
    assert (gateway.data / "bkt" / "hello.txt").read_bytes() == b"hello depot\n"


# --- aws CLI ----------------------------------------------------------------------------------------


def aws(gw: Gateway, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        import awscli  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        missing("the aws CLI (awscli) is not installed; install the test extras")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "AWS_ACCESS_KEY_ID": AK,
        "AWS_SECRET_ACCESS_KEY": SK,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": str(tmp_path / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "aws-credentials"),
        "AWS_MAX_ATTEMPTS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "awscli", "--endpoint-url", gw.endpoint, *args],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )


def test_aws_cli(gateway: Gateway, tmp_path: Path) -> None:
    ls = aws(gateway, tmp_path, "s3", "ls", "s3://bkt/")
    assert ls.returncode == 0, ls.stderr
    assert "PRE dir/" in ls.stdout and "hello.txt" in ls.stdout
    rec = aws(gateway, tmp_path, "s3", "ls", "--recursive", "s3://many/")
    assert rec.returncode == 0, rec.stderr
    assert len(rec.stdout.splitlines()) == MANY
    out = tmp_path / "out"
    cp = aws(gateway, tmp_path, "s3", "cp", "s3://bkt/big.bin", str(out / "big.bin"))
    assert cp.returncode == 0, cp.stderr
    assert (out / "big.bin").read_bytes() == BIG
    cpr = aws(gateway, tmp_path, "s3", "cp", "--recursive", "s3://bkt/dir/", str(out / "dir"))
    assert cpr.returncode == 0, cpr.stderr
    assert (out / "dir" / "sub" / "b.csv").read_bytes() == b"x,y\n1,2\n"
    api = aws(gateway, tmp_path, "s3api", "get-object", "--bucket", "bkt", "--key", "hello.txt", "--range", "bytes=6-10", str(out / "part"))
    assert api.returncode == 0, api.stderr
    assert (out / "part").read_bytes() == b"depot" and '"ContentRange": "bytes 6-10/12"' in api.stdout
    bad = aws(gateway, tmp_path, "s3api", "head-object", "--bucket", "bkt", "--key", "nope")
    assert bad.returncode != 0 and "404" in bad.stderr
    put = aws(gateway, tmp_path, "s3", "cp", str(out / "part"), "s3://bkt/uploaded")
    assert put.returncode == 0, put.stderr
    assert (gateway.data / "bkt" / "uploaded").read_bytes() == b"depot"
    rm = aws(gateway, tmp_path, "s3", "rm", "s3://bkt/uploaded")
    assert rm.returncode == 0, rm.stderr
    assert not (gateway.data / "bkt" / "uploaded").exists()


# --- s3fs -------------------------------------------------------------------------------------------


def test_s3fs(gateway: Gateway) -> None:
    import s3fs  # type: ignore[import-untyped]

    fs = s3fs.S3FileSystem(
        key=AK, secret=SK, endpoint_url=gateway.endpoint, client_kwargs={"region_name": REGION},
        skip_instance_cache=True, use_listings_cache=False,
    )
    assert sorted(fs.ls("bkt", detail=False)) == sorted(
        ["bkt/big.bin", "bkt/dir", "bkt/empty", "bkt/hello.txt", "bkt/odd name+&.txt", "bkt/t.parquet"]
    )
    assert fs.info("bkt/dir")["type"] == "directory"
    info = fs.info("bkt/big.bin")
    assert info["size"] == BIG_SIZE and info["type"] == "file"
    assert fs.cat_file("bkt/hello.txt") == b"hello depot\n"
    assert fs.cat_file("bkt/big.bin", start=5 * MiB, end=5 * MiB + 100) == BIG[5 * MiB : 5 * MiB + 100]
    with fs.open("bkt/big.bin", "rb", block_size=4 * MiB) as f:
        f.seek(BIG_SIZE - 3 * MiB)
        assert f.read() == BIG[-3 * MiB :]
    assert len(fs.find("many")) == MANY
    assert fs.exists("bkt/dir/sub/b.csv") and not fs.exists("bkt/nope")
    walked = {root: files for root, _, files in fs.walk("bkt/dir")}
    assert walked == {"bkt/dir": ["a.json"], "bkt/dir/sub": ["b.csv"]}
    with pytest.raises(FileNotFoundError):
        fs.cat_file("bkt/nope")


# --- pyarrow ----------------------------------------------------------------------------------------


def test_pyarrow_s3filesystem(gateway: Gateway) -> None:
    from pyarrow import fs as pafs

    s3 = pafs.S3FileSystem(
        access_key=AK, secret_key=SK, region=REGION, scheme="http",
        endpoint_override=f"127.0.0.1:{gateway.port}", allow_bucket_creation=False,
    )
    infos = s3.get_file_info(pafs.FileSelector("bkt", recursive=True))
    paths = {i.path: i for i in infos}
    assert paths["bkt/big.bin"].size == BIG_SIZE and paths["bkt/dir"].type == pafs.FileType.Directory
    assert "bkt/dir/sub/b.csv" in paths
    with s3.open_input_file("bkt/big.bin") as f:
        assert f.size() == BIG_SIZE
        assert f.read_at(1000, 7 * MiB) == BIG[7 * MiB : 7 * MiB + 1000]
    with s3.open_input_stream("bkt/hello.txt") as stream:
        assert stream.read() == b"hello depot\n"
    table = pq.read_table("bkt/t.parquet", filesystem=s3)
    assert table.num_rows == 10_000 and table.column("id")[9999].as_py() == 9999
    assert s3.get_file_info("bkt/nope").type == pafs.FileType.NotFound
    many = s3.get_file_info(pafs.FileSelector("many/d2"))
    assert len(many) == MANY // 5


# --- obstore ----------------------------------------------------------------------------------------


def test_obstore_s3store(gateway: Gateway) -> None:
    import obstore as obs
    from obstore.store import S3Store

    store = S3Store(
        "bkt", endpoint=gateway.endpoint, access_key_id=AK, secret_access_key=SK, region=REGION,
        virtual_hosted_style_request=False, client_options={"allow_http": True},
    )
    assert bytes(obs.get(store, "hello.txt").bytes()) == b"hello depot\n"
    assert bytes(obs.get_range(store, "big.bin", start=3 * MiB, end=3 * MiB + 10)) == BIG[3 * MiB : 3 * MiB + 10]
    starts = [i * 6 * MiB for i in range(8)]
    parts = obs.get_ranges(store, "big.bin", starts=starts, lengths=[6 * MiB] * 8)
    assert b"".join(bytes(p) for p in parts) == BIG[: 48 * MiB]
    head = obs.head(store, "big.bin")
    assert head["size"] == BIG_SIZE and head["e_tag"]
    listed = obs.list_with_delimiter(store, "dir")
    assert listed["common_prefixes"] == ["dir/sub"] and [o["path"] for o in listed["objects"]] == ["dir/a.json"]
    many = S3Store(
        "many", endpoint=gateway.endpoint, access_key_id=AK, secret_access_key=SK, region=REGION,
        virtual_hosted_style_request=False, client_options={"allow_http": True},
    )
    names = [o["path"] for batch in obs.list(many, chunk_size=1000) for o in batch]
    assert len(names) == MANY and names == sorted(names)
    with pytest.raises(FileNotFoundError):
        obs.get(store, "nope")


# --- rclone -----------------------------------------------------------------------------------------


def test_rclone(gateway: Gateway, tmp_path: Path) -> None:
    rclone = shutil.which("rclone")
    if rclone is None:
        missing("rclone not installed: run scripts/install-test-deps.sh")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "RCLONE_CONFIG": str(tmp_path / "rclone.conf"),
        "RCLONE_CONFIG_DEPOT_TYPE": "s3",
        "RCLONE_CONFIG_DEPOT_PROVIDER": "Other",
        "RCLONE_CONFIG_DEPOT_ACCESS_KEY_ID": AK,
        "RCLONE_CONFIG_DEPOT_SECRET_ACCESS_KEY": SK,
        "RCLONE_CONFIG_DEPOT_ENDPOINT": gateway.endpoint,
        "RCLONE_CONFIG_DEPOT_REGION": REGION,
        "RCLONE_CONFIG_DEPOT_FORCE_PATH_STYLE": "true",
    }

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([rclone, *args], env=env, capture_output=True, timeout=60, check=False)

    lsf = run("lsf", "depot:bkt")
    assert lsf.returncode == 0, lsf.stderr
    assert set(lsf.stdout.decode().split()) >= {"dir/", "hello.txt", "big.bin"}
    cat = run("cat", "depot:bkt/hello.txt")
    assert cat.returncode == 0 and cat.stdout == b"hello depot\n"
    copy = run("copy", "depot:bkt/dir", str(tmp_path / "dir"))
    assert copy.returncode == 0, copy.stderr
    assert (tmp_path / "dir" / "sub" / "b.csv").read_bytes() == b"x,y\n1,2\n"
    ranged = run("cat", "--offset", "1000", "--count", "10", "depot:bkt/big.bin")
    assert ranged.stdout == BIG[1000:1010]
    size = run("size", "--json", "depot:many")
    assert size.returncode == 0, size.stderr
    assert json.loads(size.stdout)["count"] == MANY


# --- writes -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wgateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A gateway over a writable cache-through mount (``/``) and a read-only one (``/ro``)."""
    data = tmp_path_factory.mktemp("s3wufs")
    (data / "wb").mkdir()
    (data / "wb" / "seed.txt").write_bytes(b"seed")
    ro = tmp_path_factory.mktemp("s3roufs")
    (ro / "x.txt").write_bytes(b"read only")
    cache = tmp_path_factory.mktemp("s3wcache")
    staging = tmp_path_factory.mktemp("s3staging")
    mounts = [
        {"path": "/", "ufs": data.as_uri(), "write_mode": "cache-through"},
        {"path": "/ro", "ufs": ro.as_uri(), "read_only": True},
    ]
    with LocalWorker(cache_dir=cache, cache_size="512MiB", mounts=mounts) as worker:
        config = load_config(
            environ={},
            overrides={
                "s3": {"access_key": AK, "secret_key": SK, "region": REGION, "staging_dir": str(staging)},
                "mounts": mounts,
            },
        )

        async def start() -> GatewayServer:
            client = CacheClient(worker.endpoint, config=config)
            return await start_gateway(config, client, "127.0.0.1", 0, environ={})

        running: GatewayServer = worker.call(start())
        try:
            yield Gateway(running.endpoint, running.port, data, worker, running)
        finally:
            worker.call(running.stop())


def _payload(size: int, seed: int = 1) -> bytes:
    block = hashlib.sha256(b"w%d" % seed).digest() * 2048
    return (block * (size // len(block) + 1))[:size]


def test_boto3_put_delete_copy(wgateway: Gateway) -> None:
    from botocore.exceptions import ClientError

    s3 = boto(wgateway)
    body = _payload(100_000)
    put = s3.put_object(Bucket="wb", Key="a/obj.bin", Body=body)
    assert put["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    assert (wgateway.data / "wb" / "a" / "obj.bin").read_bytes() == body
    assert s3.get_object(Bucket="wb", Key="a/obj.bin")["Body"].read() == body
    s3.put_object(Bucket="wb", Key="a/obj.bin", Body=b"v2")  # overwrite: readers see the new one
    assert s3.get_object(Bucket="wb", Key="a/obj.bin")["Body"].read() == b"v2"
    copied = s3.copy_object(Bucket="wb", Key="b/copy.bin", CopySource={"Bucket": "wb", "Key": "a/obj.bin"})
    assert copied["CopyObjectResult"]["ETag"] == f'"{hashlib.md5(b"v2").hexdigest()}"'
    assert (wgateway.data / "wb" / "b" / "copy.bin").read_bytes() == b"v2"
    with pytest.raises(ClientError) as info:
        s3.copy_object(Bucket="wb", Key="a/obj.bin", CopySource="wb/a/obj.bin")
    assert info.value.response["Error"]["Code"] == "InvalidRequest"
    s3.copy_object(Bucket="wb", Key="a/obj.bin", CopySource="wb/a/obj.bin", MetadataDirective="REPLACE")
    with pytest.raises(ClientError) as info:
        s3.copy_object(Bucket="wb", Key="c", CopySource="wb/nope")
    assert info.value.response["Error"]["Code"] == "NoSuchKey"
    assert s3.delete_object(Bucket="wb", Key="b/copy.bin")["ResponseMetadata"]["HTTPStatusCode"] == 204
    assert not (wgateway.data / "wb" / "b" / "copy.bin").exists()
    assert s3.delete_object(Bucket="wb", Key="never/there")["ResponseMetadata"]["HTTPStatusCode"] == 204
    with pytest.raises(ClientError) as info:
        s3.put_object(Bucket="nobucket", Key="k", Body=b"x")
    assert info.value.response["Error"]["Code"] == "NoSuchBucket"
    # DeleteObjects: per-key results, quiet mode, malformed XML
    for i in range(3):
        s3.put_object(Bucket="wb", Key=f"del/{i}", Body=b"%d" % i)
    out = s3.delete_objects(Bucket="wb", Delete={"Objects": [{"Key": "del/0"}, {"Key": "del/1"}, {"Key": "missing"}]})
    assert sorted(d["Key"] for d in out["Deleted"]) == ["del/0", "del/1", "missing"]
    quiet = s3.delete_objects(Bucket="wb", Delete={"Objects": [{"Key": "del/2"}], "Quiet": True})
    assert "Deleted" not in quiet and "Errors" not in quiet
    assert not (wgateway.data / "wb" / "del").exists() or not any((wgateway.data / "wb" / "del").iterdir())
    ro = s3.delete_objects(Bucket="ro", Delete={"Objects": [{"Key": "x.txt"}]})
    assert ro["Errors"][0]["Code"] == "AccessDenied"


def test_raw_errors_bad_digest_and_xml(wgateway: Gateway) -> None:
    import requests  # type: ignore[import-untyped]
    from botocore.auth import S3SigV4Auth  # type: ignore[import-untyped]
    from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
    from botocore.credentials import Credentials  # type: ignore[import-untyped]

    def send(method: str, path: str, body: bytes, headers: dict[str, str]) -> Any:
        req = AWSRequest(method=method, url=f"{wgateway.endpoint}{path}", data=body, headers=headers)
        S3SigV4Auth(Credentials(AK, SK), "s3", REGION).add_auth(req)
        return requests.request(method, req.url, data=body, headers=dict(req.headers), timeout=10)

    bad_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    r = send("PUT", "/wb/md5.txt", b"payload", {"Content-MD5": bad_md5})
    assert r.status_code == 400 and b"<Code>BadDigest</Code>" in r.content
    assert not (wgateway.data / "wb" / "md5.txt").exists()
    good_md5 = base64.b64encode(hashlib.md5(b"payload").digest()).decode()
    assert send("PUT", "/wb/md5.txt", b"payload", {"Content-MD5": good_md5}).status_code == 200
    r = send("POST", "/wb?delete", b"<Delete><Object><Key>x</Key></Object>", {})
    assert r.status_code == 400 and b"<Code>MalformedXML</Code>" in r.content
    bomb = b'<!DOCTYPE d [<!ENTITY a "aaaa">]><Delete><Object><Key>&a;</Key></Object></Delete>'
    assert b"MalformedXML" in send("POST", "/wb?delete", bomb, {}).content
    many = b"<Delete>" + b"<Object><Key>k</Key></Object>" * 1001 + b"</Delete>"
    assert b"MalformedXML" in send("POST", "/wb?delete", many, {}).content
    # read-only mount
    r = send("PUT", "/ro/new.txt", b"x", {})
    assert r.status_code == 403 and b"<Code>AccessDenied</Code>" in r.content
    assert not (wgateway.data / "ro").exists()


def _aws_chunked(body: bytes, checksum: str, chunk: int = 65536) -> bytes:
    out = bytearray()
    for pos in range(0, len(body), chunk):
        piece = body[pos : pos + chunk]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    out += b"0\r\n" + f"x-amz-checksum-crc32:{checksum}\r\n\r\n".encode()
    return bytes(out)


def test_aws_chunked_trailer(wgateway: Gateway) -> None:
    import zlib

    import requests
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    body = _payload(200_000, 7)
    good = base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
    bad = base64.b64encode((zlib.crc32(body) ^ 1).to_bytes(4, "big")).decode()
    for key, checksum, status in [("chunked-bad", bad, 400), ("chunked", good, 200)]:
        encoded = _aws_chunked(body, checksum)
        headers = {
            "Content-Encoding": "aws-chunked",
            "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
            "x-amz-trailer": "x-amz-checksum-crc32",
            "x-amz-decoded-content-length": str(len(body)),
        }
        req = AWSRequest(method="PUT", url=f"{wgateway.endpoint}/wb/{key}", headers=headers)
        req.context["checksum"] = {"request_algorithm": {"in": "trailer", "algorithm": "crc32", "name": "x-amz-checksum-crc32"}}
        S3SigV4Auth(Credentials(AK, SK), "s3", REGION).add_auth(req)
        r = requests.put(req.url, data=encoded, headers=dict(req.headers), timeout=10)
        assert r.status_code == status, r.content
        if status == 400:
            assert b"<Code>BadDigest</Code>" in r.content
            assert not (wgateway.data / "wb" / key).exists()
        else:
            assert (wgateway.data / "wb" / key).read_bytes() == body


def test_boto3_multipart(wgateway: Gateway, tmp_path: Path) -> None:
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import ClientError

    s3 = boto(wgateway, max_pool_connections=8)
    body = _payload(20 * MiB + 123, 3)
    src = tmp_path / "big"
    src.write_bytes(body)
    config = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)
    s3.upload_file(str(src), "wb", "mp/big.bin", Config=config)
    assert (wgateway.data / "wb" / "mp" / "big.bin").read_bytes() == body
    head = s3.head_object(Bucket="wb", Key="mp/big.bin")
    assert head["ContentLength"] == len(body)
    # errors: order, size, unknown ids; abort cleans the staging
    up = s3.create_multipart_upload(Bucket="wb", Key="mp/err")["UploadId"]
    e1 = s3.upload_part(Bucket="wb", Key="mp/err", UploadId=up, PartNumber=1, Body=b"small")["ETag"]
    e2 = s3.upload_part(Bucket="wb", Key="mp/err", UploadId=up, PartNumber=2, Body=b"tail")["ETag"]
    assert e1 == f'"{hashlib.md5(b"small").hexdigest()}"'
    parts = s3.list_parts(Bucket="wb", Key="mp/err", UploadId=up)["Parts"]
    assert [(p["PartNumber"], p["Size"]) for p in parts] == [(1, 5), (2, 4)]
    uploads = s3.list_multipart_uploads(Bucket="wb")["Uploads"]
    assert [u["UploadId"] for u in uploads] == [up]
    for parts_list, code in [
        ([{"PartNumber": 2, "ETag": e2}, {"PartNumber": 1, "ETag": e1}], "InvalidPartOrder"),
        ([{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}], "EntityTooSmall"),
        ([{"PartNumber": 1, "ETag": e2}], "InvalidPart"),
    ]:
        with pytest.raises(ClientError) as info:
            s3.complete_multipart_upload(Bucket="wb", Key="mp/err", UploadId=up, MultipartUpload={"Parts": parts_list})
        assert info.value.response["Error"]["Code"] == code
    assert not (wgateway.data / "wb" / "mp" / "err").exists()
    single = s3.complete_multipart_upload(Bucket="wb", Key="mp/err", UploadId=up, MultipartUpload={"Parts": [{"PartNumber": 2, "ETag": e2}]})
    assert single["ETag"].endswith('-1"') and (wgateway.data / "wb" / "mp" / "err").read_bytes() == b"tail"
    up2 = s3.create_multipart_upload(Bucket="wb", Key="mp/aborted")["UploadId"]
    s3.upload_part(Bucket="wb", Key="mp/aborted", UploadId=up2, PartNumber=1, Body=b"x")
    staging = Path(wgateway.running.gateway.handlers["UploadPart"].__self__.staging.root)  # type: ignore[attr-defined]
    assert (staging / up2).is_dir()
    s3.abort_multipart_upload(Bucket="wb", Key="mp/aborted", UploadId=up2)
    assert not (staging / up2).exists() and not list(staging.iterdir())
    for call in (
        lambda: s3.abort_multipart_upload(Bucket="wb", Key="mp/aborted", UploadId=up2),
        lambda: s3.upload_part(Bucket="wb", Key="mp/x", UploadId="0" * 32, PartNumber=1, Body=b"x"),
        lambda: s3.list_parts(Bucket="wb", Key="mp/x", UploadId="../../etc"),
    ):
        with pytest.raises(ClientError) as info:
            call()
        assert info.value.response["Error"]["Code"] == "NoSuchUpload"
    with pytest.raises(ClientError) as info:
        s3.create_multipart_upload(Bucket="ro", Key="m")
    assert info.value.response["Error"]["Code"] == "AccessDenied"


def test_aws_cli_writes(wgateway: Gateway, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "one.txt").write_bytes(b"one")
    (tree / "sub" / "two.txt").write_bytes(b"two" * 1000)
    sync = aws(wgateway, tmp_path, "s3", "sync", str(tree), "s3://wb/synced/")
    assert sync.returncode == 0, sync.stderr
    assert (wgateway.data / "wb" / "synced" / "sub" / "two.txt").read_bytes() == b"two" * 1000
    again = aws(wgateway, tmp_path, "s3", "sync", str(tree), "s3://wb/synced/")
    assert again.returncode == 0 and "upload:" not in again.stdout
    rm = aws(wgateway, tmp_path, "s3", "rm", "--recursive", "s3://wb/synced/")
    assert rm.returncode == 0, rm.stderr
    assert not (wgateway.data / "wb" / "synced" / "one.txt").exists()


def test_s3fs_pyarrow_obstore_writes(wgateway: Gateway) -> None:
    import obstore as obs
    import s3fs
    from obstore.store import S3Store
    from pyarrow import fs as pafs

    fs = s3fs.S3FileSystem(
        key=AK, secret=SK, endpoint_url=wgateway.endpoint, client_kwargs={"region_name": REGION},
        skip_instance_cache=True, use_listings_cache=False,
    )
    fs.pipe("wb/s3fs/piped.bin", b"piped bytes")
    assert (wgateway.data / "wb" / "s3fs" / "piped.bin").read_bytes() == b"piped bytes"
    big = _payload(12 * MiB, 5)
    with fs.open("wb/s3fs/big.bin", "wb", block_size=5 * MiB) as f:
        f.write(big)
    assert (wgateway.data / "wb" / "s3fs" / "big.bin").read_bytes() == big
    fs.rm("wb/s3fs/piped.bin")
    assert not (wgateway.data / "wb" / "s3fs" / "piped.bin").exists()

    s3 = pafs.S3FileSystem(
        access_key=AK, secret_key=SK, region=REGION, scheme="http",
        endpoint_override=f"127.0.0.1:{wgateway.port}", allow_bucket_creation=False,
    )
    table = pa.table({"id": list(range(5000)), "v": [float(i) for i in range(5000)]})
    pq.write_table(table, "wb/arrow/t.parquet", filesystem=s3)
    assert pq.read_table(wgateway.data / "wb" / "arrow" / "t.parquet").equals(table)

    store = S3Store(
        "wb", endpoint=wgateway.endpoint, access_key_id=AK, secret_access_key=SK, region=REGION,
        virtual_hosted_style_request=False, client_options={"allow_http": True},
    )
    obs.put(store, "obs/small.bin", b"small")
    assert (wgateway.data / "wb" / "obs" / "small.bin").read_bytes() == b"small"
    obs.put(store, "obs/multi.bin", io.BytesIO(big), chunk_size=5 * MiB, use_multipart=True)
    assert (wgateway.data / "wb" / "obs" / "multi.bin").read_bytes() == big
    obs.delete(store, "obs/small.bin")
    assert not (wgateway.data / "wb" / "obs" / "small.bin").exists()


# --- clusters in layers --------------------------------------------------------------------------


def test_an_edge_cluster_mounts_a_regional_clusters_s3_endpoint(
    gateway: Gateway, tmp_path: Path
) -> None:
    """An edge worker whose under store is the regional worker's S3 gateway: it pulls each page
    once from the region, then serves it from its own cache (the region sees no second read)."""
    options = {"endpoint": gateway.endpoint, "region": REGION, "access_key_id": AK,
               "secret_access_key": SK}
    mounts = [{"path": "/region", "ufs": "s3://bkt", "metadata": "max-age=60s",
               "options": options}]
    with LocalWorker(None, tmp_path / "edge-cache", page_size="1MiB", cache_size="256MiB",
                     mounts=mounts) as edge:
        region = gateway.worker.worker.service
        assert region is not None

        async def read_all() -> tuple[bytes, list[str], bytes]:
            async with CacheClient(edge.endpoint, config=DepotConfig()) as client:
                names = sorted(e.path for e in await client.list("/region/dir"))
                big = await client.read_range("/region/big.bin", 0, None)
                small = await client.read_range("/region/hello.txt", 0, None)
                return bytes(big), names, bytes(small)

        big, names, small = asyncio.run(read_all())
        assert big == BIG and small == b"hello depot\n"
        assert names == ["/region/dir/a.json", "/region/dir/sub"]
        edge_service = edge.worker.service
        assert edge_service is not None
        # Every page came from the region's gateway (pages of 1 MiB at the edge; read-ahead
        # fetches count as UFS reads, the reads they served as hits).
        assert edge_service.stats.ufs_reads >= -(-len(BIG) // MiB)
        # Let the edge's read-ahead of the first pass finish before counting.
        deadline = time.monotonic() + 10
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 0.5:
            if edge_service.stats.ufs_inflight:
                quiet_since = time.monotonic()
            assert time.monotonic() < deadline, "the edge kept reading from the region"
            time.sleep(0.05)
        first_ufs_bytes = edge_service.stats.bytes_from_ufs
        first_ufs_reads = edge_service.stats.ufs_reads
        region_misses = region.stats.misses
        big_again, _, _ = asyncio.run(read_all())
        assert big_again == BIG
        # The second pass is all hits at the edge: no request reaches the region.
        assert edge_service.stats.bytes_from_ufs == first_ufs_bytes
        assert edge_service.stats.ufs_reads == first_ufs_reads
        assert region.stats.misses == region_misses
