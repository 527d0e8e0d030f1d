"""S3 through obstore against a real moto server: the contract plus S3-specific behaviour."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from depot.core.config import UfsConfig
from depot.core.errors import InvalidArgument, NotFound, Unavailable
from depot.core.types import Attributes
from depot.testing.ufs_contract import UnderStoreContract, as_bytes
from depot.ufs import UnderStore, open_backend, open_under_store

from .conftest import MotoServer, free_port

pytestmark = pytest.mark.integration


class TestS3Contract(UnderStoreContract):
    @pytest.fixture
    async def store(self, moto_server: MotoServer) -> AsyncIterator[UnderStore]:
        bucket = moto_server.new_bucket()
        store = open_under_store(f"s3://{bucket}/some/root", moto_server.options, UfsConfig())
        yield store
        await store.close()


async def test_bucket_root_and_prefix_views(moto_server: MotoServer) -> None:
    bucket = moto_server.new_bucket()
    whole = open_backend(f"s3://{bucket}", moto_server.options, UfsConfig())
    sub = open_backend(f"s3a://{bucket}/models/v1", moto_server.options, UfsConfig())
    await sub.put("weights.bin", b"w" * 10)
    assert (await whole.head("models/v1/weights.bin")).size == 10
    page = await whole.list("models/")
    assert page.prefixes == ["models/v1/"]
    objects = moto_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert [o["Key"] for o in objects] == ["models/v1/weights.bin"]


async def test_reads_objects_written_by_other_clients(moto_server: MotoServer) -> None:
    bucket = moto_server.new_bucket()
    client = moto_server.client()
    client.put_object(Bucket=bucket, Key="ext/a.txt", Body=b"from boto3")
    store = open_backend(f"s3://{bucket}", moto_server.options, UfsConfig())
    info = await store.head("ext/a.txt")
    boto_etag = client.head_object(Bucket=bucket, Key="ext/a.txt")["ETag"]
    assert info.etag == boto_etag
    assert as_bytes(await store.get_range("ext/a.txt", 5, 100, etag=info.etag)) == b"boto3"


async def test_attributes_of_other_clients_and_reserved_names(moto_server: MotoServer) -> None:
    bucket = moto_server.new_bucket()
    moto_server.client().put_object(
        Bucket=bucket, Key="ext/a.csv", Body=b"1", ContentType="text/csv",
        ContentDisposition="inline", Metadata={"Owner": "boto3"},
    )
    store = open_under_store(f"s3://{bucket}", moto_server.options, UfsConfig())
    assert store.supports_attributes
    got = (await store.head("ext/a.csv")).attributes
    assert got == Attributes.of(
        {"Content-Type": "text/csv", "Content-Disposition": "inline"}, {"owner": "boto3"}
    )
    # object_store would take x-amz-meta-content-type for the header: refused, nothing sent.
    reserved = Attributes.of(metadata={"content-type": "x"})
    with pytest.raises(InvalidArgument):
        store.check_attributes("k", reserved)
    with pytest.raises(InvalidArgument):
        await store.put("k", b"x", attributes=reserved)
    with pytest.raises(NotFound):
        await store.head("k")


async def test_missing_bucket_is_not_found(moto_server: MotoServer) -> None:
    store = open_backend("s3://no-such-bucket-here", moto_server.options, UfsConfig())
    with pytest.raises(NotFound):
        await store.head("x")
    with pytest.raises(NotFound):
        await store.list("")


async def test_connection_refused_is_unavailable_and_retried(moto_server: MotoServer) -> None:
    options = dict(moto_server.options, endpoint=f"http://127.0.0.1:{free_port()}")
    config = UfsConfig(retries=2, backoff_base=0.001, backoff_max=0.002)
    store = open_under_store("s3://bucket", options, config)
    with pytest.raises(Unavailable):
        await store.head("x")
    assert store.retried == 2  # type: ignore[attr-defined]
