"""The S3 gateway with real S3 clients: boto3, the aws CLI, s3fs, pyarrow, obstore, rclone.

One worker over a local-directory UFS and one gateway in front of it (the way ``worker.s3_port``
runs it: a ``CacheClient`` of the worker's own endpoint), shared by the module. Each client lists,
stats and reads, including large objects, ranged reads, thousands of keys with paging,
conditional requests, presigned URLs, wrong keys and write attempts.
"""

from __future__ import annotations

import hashlib
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
from depot.core.config import load_config
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
    for call in (
        lambda: s3.put_object(Bucket="bkt", Key="new.txt", Body=b"x"),
        lambda: s3.delete_object(Bucket="bkt", Key="hello.txt"),
        lambda: s3.copy_object(Bucket="bkt", Key="c.txt", CopySource="bkt/hello.txt"),
        lambda: s3.create_bucket(Bucket="newbucket"),
        lambda: s3.create_multipart_upload(Bucket="bkt", Key="m"),
        lambda: s3.delete_objects(Bucket="bkt", Delete={"Objects": [{"Key": "hello.txt"}]}),
    ):
        with pytest.raises(ClientError) as info:
            call()
        assert info.value.response["Error"]["Code"] == "NotImplemented"
        assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 501
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
    assert put.returncode != 0 and "NotImplemented" in put.stderr


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
