"""Azure Blob through obstore against a real Azurite: the contract plus Azure specifics."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from depot.core.config import UfsConfig
from depot.core.errors import InvalidArgument, PermissionDenied
from depot.core.types import Attributes
from depot.testing.ufs_contract import UnderStoreContract, as_bytes
from depot.ufs import UnderStore, open_backend, open_under_store

from .conftest import AzuriteServer

pytestmark = pytest.mark.integration


class TestAzureContract(UnderStoreContract):
    @pytest.fixture
    async def store(self, azurite_server: AzuriteServer) -> AsyncIterator[UnderStore]:
        container = azurite_server.new_container()
        store = open_under_store(f"az://{container}/some/root", azurite_server.options, UfsConfig())
        yield store
        await store.close()


async def test_abfs_uri_with_account_in_host(azurite_server: AzuriteServer) -> None:
    container = azurite_server.new_container()
    options = {"account_key": azurite_server.key, "endpoint": azurite_server.endpoint}
    uri = f"abfs://{container}@{azurite_server.account}.dfs.core.windows.net/data"
    store = open_backend(uri, options, UfsConfig())
    await store.put("x.bin", b"abc")
    plain = open_backend(f"az://{container}", azurite_server.options, UfsConfig())
    assert as_bytes(await plain.get("data/x.bin")) == b"abc"


async def test_list_etags_pin_reads(azurite_server: AzuriteServer) -> None:
    """Azure lists ETags bare and heads them quoted; both must pin the same version."""
    container = azurite_server.new_container()
    store = open_backend(f"az://{container}", azurite_server.options, UfsConfig())
    await store.put("k", b"0123456789")
    listed = (await store.list("")).objects[0]
    assert listed.etag == (await store.head("k")).etag
    assert as_bytes(await store.get_range("k", 2, 4, etag=listed.etag)) == b"23"


async def test_metadata_names_must_be_identifiers(azurite_server: AzuriteServer) -> None:
    """Azure's rule, checked before anything is sent (write-back checks it before its ack)."""
    container = azurite_server.new_container()
    store = open_under_store(f"az://{container}", azurite_server.options, UfsConfig())
    bad = Attributes.of(metadata={"with-dash": "v"})
    with pytest.raises(InvalidArgument):
        store.check_attributes("k", bad)
    with pytest.raises(InvalidArgument):
        await store.put("k", b"x", attributes=bad)
    good = Attributes.of({"Content-Type": "text/plain"}, {"with_underscore": "v"})
    store.check_attributes("k", good)
    await store.put("k", b"x", attributes=good)
    assert (await store.head("k")).attributes == good


async def test_wrong_key_is_permission_denied(azurite_server: AzuriteServer) -> None:
    container = azurite_server.new_container()
    bad_key = "A" * 4 + azurite_server.key[4:]
    options = dict(azurite_server.options, account_key=bad_key)
    store = open_under_store(f"az://{container}", options, UfsConfig(retries=3))
    with pytest.raises(PermissionDenied):
        await store.head("anything")
    assert store.retried == 0  # type: ignore[attr-defined]


class TestFsspecAdlfsContract(UnderStoreContract):
    """The fsspec adapter's native async path, over adlfs against the same Azurite."""

    @pytest.fixture
    async def store(self, azurite_server: AzuriteServer) -> AsyncIterator[UnderStore]:
        container = azurite_server.new_container()
        options = {"connection_string": azurite_server.connection_string}
        store = open_under_store(f"fsspec+abfs://{container}/root", options, UfsConfig())
        yield store
        await store.close()
