"""The in-memory under store: the contract, shared named buckets and its ETag modes."""

from __future__ import annotations

import hashlib
import itertools
import uuid
from collections.abc import AsyncIterator

import pytest

from depot.core.config import UfsConfig
from depot.core.errors import ConfigError, StaleVersion
from depot.testing.ufs_contract import UnderStoreContract, as_bytes
from depot.ufs import (
    FaultInjectingUnderStore,
    MemoryUnderStore,
    RetryingUnderStore,
    UnderStore,
    open_under_store,
)
from depot.ufs.memory import MemoryBucket, drop_memory_bucket


class TestMemoryContract(UnderStoreContract):
    @pytest.fixture
    async def store(self) -> AsyncIterator[UnderStore]:
        yield MemoryUnderStore()


class TestMemoryCounterEtagContract(UnderStoreContract):
    """ETags from a write counter, under a key prefix, through the registry and retries."""

    @pytest.fixture
    async def store(self) -> AsyncIterator[UnderStore]:
        name = f"contract-{uuid.uuid4().hex}"
        store = open_under_store(f"memory://{name}/some/root", {"etag": "counter"}, UfsConfig())
        yield store
        await store.close()
        drop_memory_bucket(name)


class TestFaultWrapperContract(UnderStoreContract):
    """The fault-injecting wrapper, with no fault armed, is transparent."""

    @pytest.fixture
    async def store(self) -> AsyncIterator[UnderStore]:
        yield FaultInjectingUnderStore(MemoryUnderStore())


class TestChunkedStreamContract(UnderStoreContract):
    """Streams cut in small chunks by the fault wrapper, through the retry wrapper."""

    @pytest.fixture
    async def store(self) -> AsyncIterator[UnderStore]:
        faulty = FaultInjectingUnderStore(MemoryUnderStore())
        faulty.stream_chunks(4096)
        yield RetryingUnderStore(faulty, 2, 0.0, 0.0)


async def test_named_buckets_are_shared() -> None:
    name = f"shared-{uuid.uuid4().hex}"
    try:
        writer = open_under_store(f"memory://{name}", {}, UfsConfig())
        reader = open_under_store(f"memory://{name}/sub", {}, UfsConfig())
        await writer.put("sub/file", b"hello")
        assert as_bytes(await reader.get("file")) == b"hello"
        page = await reader.list("")
        assert [o.key for o in page.objects] == ["file"]
    finally:
        drop_memory_bucket(name)


async def test_md5_etag_is_content_hash() -> None:
    store = MemoryUnderStore()
    a = await store.put("a", b"same")
    b = await store.put("b", b"same")
    assert a.etag == b.etag == '"' + hashlib.md5(b"same").hexdigest() + '"'


async def test_counter_etag_changes_on_identical_rewrite() -> None:
    store = MemoryUnderStore(MemoryBucket(etag_mode="counter"))
    first = await store.put("k", b"same")
    second = await store.put("k", b"same")
    assert first.etag != second.etag
    with pytest.raises(StaleVersion):
        await store.get_range("k", 0, 2, etag=first.etag)


async def test_versioning_assigns_version_ids() -> None:
    store = MemoryUnderStore(MemoryBucket(versioning=True))
    first = await store.put("k", b"1")
    second = await store.put("k", b"2")
    assert first.version and second.version and first.version != second.version


async def test_injected_clock_sets_mtime() -> None:
    ticks = itertools.count(1000)
    store = MemoryUnderStore(MemoryBucket(clock=lambda: float(next(ticks))))
    assert (await store.put("a", b"")).mtime == 1000.0
    assert (await store.head("a")).mtime == 1000.0


def test_unknown_memory_option_is_refused() -> None:
    with pytest.raises(ConfigError, match="colour"):
        open_under_store("memory://x", {"colour": "blue"}, UfsConfig())
    with pytest.raises(ConfigError, match="etag"):
        MemoryBucket(etag_mode="sha1")
