"""S3 object attributes end to end: boto3 -> gateway -> worker -> moto (docs/s3.md, "Metadata").

Content-Type, the other content headers and ``x-amz-meta-*`` given to PutObject,
CreateMultipartUpload or CopyObject (``REPLACE``) come back from HeadObject/GetObject, in every
write mode, and are what the under store holds (checked with boto3 on moto directly). A local
directory keeps none: there the content type comes from the key's extension, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from depot.client.client import CacheClient
from depot.core.config import DepotConfig, load_config
from depot.s3.server import GatewayServer, start_gateway
from depot.testing.local import LocalWorker

from .conftest import MotoServer

pytestmark = pytest.mark.integration

AK = "DEPOTTESTACCESSKEY"
SK = "depot/test+secret/key"
REGION = "us-east-1"
MiB = 1024 * 1024
MODES = {"thr": "through", "ct": "cache-through", "wb": "write-back"}
META = {"owner": "team-a", "note": "=?UTF-8?B?w6k=?="}  # an RFC 2047 value passes as sent
HEADERS = {
    "ContentType": "text/csv; charset=utf-8",
    "CacheControl": "max-age=60",
    "ContentDisposition": 'attachment; filename="data.csv"',
    "ContentLanguage": "de",
}


@dataclass
class Setup:
    endpoint: str
    bucket: str  # moto's bucket; depot's buckets thr/ct/wb are prefixes of it
    moto: MotoServer
    worker: LocalWorker

    def s3(self) -> Any:
        import boto3  # type: ignore[import-untyped]
        from botocore.config import Config  # type: ignore[import-untyped]

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=AK, aws_secret_access_key=SK,
            region_name=REGION,
            config=Config(signature_version="s3v4", retries={"max_attempts": 1}),
        )

    def sync(self) -> None:
        async def run() -> None:
            async with CacheClient(self.worker.endpoint, config=DepotConfig()) as client:
                await client.sync(wait=True, deadline=30)

        asyncio.run(run())


@contextlib.contextmanager
def running(
    moto: MotoServer, bucket: str, root: Path, writeback: dict[str, Any] | None = None
) -> Iterator[Setup]:
    (root / "local" / "plain").mkdir(parents=True, exist_ok=True)
    (root / "local" / "plain" / "seed").write_bytes(b"a bucket is a directory with files")
    mounts: list[dict[str, Any]] = [{"path": "/", "ufs": (root / "local").as_uri()}]
    for name, mode in MODES.items():
        mounts.append({"path": f"/{name}", "ufs": f"s3://{bucket}/{name}", "write_mode": mode,
                       "options": moto.options})
    extra = {"writeback": writeback} if writeback else None
    with LocalWorker(None, root / "cache", cache_size="256MiB", mounts=mounts,
                     extra=extra) as worker:
        config = load_config(environ={}, overrides={
            "s3": {"access_key": AK, "secret_key": SK, "region": REGION},
            "mounts": mounts,
        })

        async def start() -> GatewayServer:
            client = CacheClient(worker.endpoint, config=config)
            return await start_gateway(config, client, "127.0.0.1", 0, environ={})

        gateway: GatewayServer = worker.call(start())
        try:
            yield Setup(gateway.endpoint, bucket, moto, worker)
        finally:
            worker.call(gateway.stop())


@pytest.fixture(scope="module")
def setup(moto_server: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    with running(moto_server, moto_server.new_bucket(), tmp_path_factory.mktemp("s3meta")) as s:
        yield s


def _check(head: dict[str, Any], meta: dict[str, str] = META, **headers: str) -> None:
    assert head["Metadata"] == meta
    for name, value in (headers or HEADERS).items():
        assert head[name] == value, name


@pytest.mark.parametrize("bucket", list(MODES))
def test_put_object_metadata_round_trips(setup: Setup, bucket: str) -> None:
    s3 = setup.s3()
    body = b"a,b\n1,2\n"
    put = s3.put_object(Bucket=bucket, Key="t/data.csv", Body=body, Metadata=META, **HEADERS)
    assert put["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    _check(s3.head_object(Bucket=bucket, Key="t/data.csv"))
    got = s3.get_object(Bucket=bucket, Key="t/data.csv")
    assert got["Body"].read() == body
    _check(got)
    # response-* overrides still win over what is stored.
    over = s3.get_object(Bucket=bucket, Key="t/data.csv", ResponseContentType="x/y",
                         ResponseCacheControl="no-store")
    assert over["ContentType"] == "x/y" and over["CacheControl"] == "no-store"
    assert over["ContentLanguage"] == "de" and over["Metadata"] == META
    setup.sync()
    _check(setup.moto.client().head_object(Bucket=setup.bucket, Key=f"{bucket}/t/data.csv"))
    # An overwrite without metadata drops it (S3 then stores its default content type).
    s3.put_object(Bucket=bucket, Key="t/data.csv", Body=b"plain")
    head = s3.head_object(Bucket=bucket, Key="t/data.csv")
    assert head["Metadata"] == {} and head["ContentType"] != HEADERS["ContentType"]
    assert "CacheControl" not in head


def test_a_local_directory_keeps_no_metadata(setup: Setup) -> None:
    s3 = setup.s3()
    s3.put_object(Bucket="plain", Key="x.json", Body=b"{}", Metadata=META, ContentType="a/b")
    head = s3.head_object(Bucket="plain", Key="x.json")
    assert head["Metadata"] == {} and head["ContentType"] == "application/json"


def test_copy_object_copy_and_replace(setup: Setup) -> None:
    s3 = setup.s3()
    s3.put_object(Bucket="thr", Key="src.csv", Body=b"1,2\n", Metadata=META, **HEADERS)
    # COPY (the default): the source's metadata and content headers, also across buckets.
    for bucket in ("thr", "wb"):
        s3.copy_object(Bucket=bucket, Key="copied.csv", CopySource="thr/src.csv",
                       Metadata={"ignored": "yes"}, ContentType="ignored/too")
        _check(s3.head_object(Bucket=bucket, Key="copied.csv"))
    # REPLACE: the request's only.
    s3.copy_object(Bucket="thr", Key="replaced.csv", CopySource="thr/src.csv",
                   MetadataDirective="REPLACE", Metadata={"fresh": "1"}, ContentType="text/plain")
    head = s3.head_object(Bucket="thr", Key="replaced.csv")
    assert head["Metadata"] == {"fresh": "1"} and head["ContentType"] == "text/plain"
    assert "CacheControl" not in head and "ContentLanguage" not in head
    # Onto itself with REPLACE: the way S3 clients change an object's metadata.
    s3.copy_object(Bucket="thr", Key="src.csv", CopySource="thr/src.csv",
                   MetadataDirective="REPLACE", Metadata={"v": "2"}, ContentType="text/x-v2")
    head = s3.head_object(Bucket="thr", Key="src.csv")
    assert head["Metadata"] == {"v": "2"} and head["ContentType"] == "text/x-v2"
    assert s3.get_object(Bucket="thr", Key="src.csv")["Body"].read() == b"1,2\n"
    # Into a store that keeps none: the copy is made, its metadata is not.
    s3.copy_object(Bucket="plain", Key="copied.csv", CopySource="thr/src.csv")
    assert s3.head_object(Bucket="plain", Key="copied.csv")["Metadata"] == {}


@pytest.mark.parametrize("bucket", ["ct", "wb"])
def test_multipart_metadata_applies_to_the_completed_object(setup: Setup, bucket: str) -> None:
    s3 = setup.s3()
    parts = [b"p" * (5 * MiB), b"q" * 1000]
    upload = s3.create_multipart_upload(Bucket=bucket, Key="mp/obj.csv", Metadata=META,
                                        **HEADERS)["UploadId"]
    done = [
        {"PartNumber": n, "ETag": s3.upload_part(Bucket=bucket, Key="mp/obj.csv", PartNumber=n,
                                                 UploadId=upload, Body=data)["ETag"]}
        for n, data in enumerate(parts, 1)
    ]
    s3.complete_multipart_upload(Bucket=bucket, Key="mp/obj.csv", UploadId=upload,
                                 MultipartUpload={"Parts": done})
    _check(s3.head_object(Bucket=bucket, Key="mp/obj.csv"))
    assert s3.get_object(Bucket=bucket, Key="mp/obj.csv")["Body"].read() == b"".join(parts)
    setup.sync()
    _check(setup.moto.client().head_object(Bucket=setup.bucket, Key=f"{bucket}/mp/obj.csv"))


def test_metadata_of_objects_written_elsewhere_and_listed_first(setup: Setup) -> None:
    setup.moto.client().put_object(Bucket=setup.bucket, Key="thr/ext/o.bin", Body=b"x",
                                   ContentType="image/png", Metadata={"Origin": "outside"})
    s3 = setup.s3()
    listed = s3.list_objects_v2(Bucket="thr", Prefix="ext/")["Contents"]
    assert [o["Key"] for o in listed] == ["ext/o.bin"]
    head = s3.head_object(Bucket="thr", Key="ext/o.bin")
    assert head["ContentType"] == "image/png" and head["Metadata"] == {"origin": "outside"}


def test_metadata_over_2_kib_is_refused(setup: Setup) -> None:
    from botocore.exceptions import ClientError  # type: ignore[import-untyped]

    s3 = setup.s3()
    big = {"k": "v" * 2048}
    with pytest.raises(ClientError) as info:
        s3.put_object(Bucket="thr", Key="too/big", Body=b"x", Metadata=big)
    err = info.value.response
    assert err["Error"]["Code"] == "MetadataTooLarge"
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(ClientError) as info:
        s3.create_multipart_upload(Bucket="thr", Key="too/big", Metadata=big)
    assert info.value.response["Error"]["Code"] == "MetadataTooLarge"
    with pytest.raises(ClientError) as info:
        s3.head_object(Bucket="thr", Key="too/big")
    assert info.value.response["Error"]["Code"] == "404"  # nothing was written
    s3.put_object(Bucket="thr", Key="too/fits", Body=b"x", Metadata={"k": "v" * 2047})
    # A name object_store would read as the header: refused before anything is acknowledged,
    # also in write-back (not left to fail in the background).
    for bucket in ("thr", "wb"):
        with pytest.raises(ClientError) as info:
            s3.put_object(Bucket=bucket, Key="reserved", Body=b"x",
                          Metadata={"content-type": "x"})
        assert info.value.response["Error"]["Code"] == "InvalidArgument"


def test_write_back_metadata_survives_a_restart(
    moto_server: MotoServer, tmp_path: Path
) -> None:
    """Acknowledged with its metadata, the worker stops before the upload: the next worker
    uploads it from the journal with the same metadata."""
    bucket = moto_server.new_bucket()
    body = b"w" * (2 * MiB)
    with running(moto_server, bucket, tmp_path, writeback={"bandwidth": "64KiB"}) as first:
        s3 = first.s3()
        s3.put_object(Bucket="wb", Key="slow.csv", Body=body, Metadata=META, **HEADERS)
        _check(s3.head_object(Bucket="wb", Key="slow.csv"))  # served from the staged write
    objects = moto_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    assert objects == []  # not uploaded before the stop
    with running(moto_server, bucket, tmp_path) as second:
        second.sync()
        _check(moto_server.client().head_object(Bucket=bucket, Key="wb/slow.csv"))
        _check(second.s3().head_object(Bucket="wb", Key="slow.csv"))
