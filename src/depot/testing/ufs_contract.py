"""The behaviour every ``UnderStore`` must show, as a pytest suite to subclass.

    class TestMyStore(UnderStoreContract):
        @pytest.fixture
        async def store(self):
            s = open_my_store()          # a fresh, empty store
            yield s
            await s.close()

pytest collects the inherited async tests (``asyncio_mode = auto``). Class attributes tune the
sizes for slow backends; no test is skipped by a flag, so every backend is held to all of it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depot.core.errors import InvalidArgument, InvalidRange, NotFound, StaleVersion
from depot.core.types import Attributes
from depot.ufs.base import Buffer, ListPage, ObjectInfo, UnderStore

MiB = 1024 * 1024


def payload(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes that differ at every offset, so a shifted range cannot pass."""
    block = bytes((i * 7 + seed * 13 + (i >> 8)) % 251 for i in range(4096))
    reps, rest = divmod(size, len(block))
    return block * reps + block[:rest]


async def collect(
    store: UnderStore, prefix: str = "", *, delimiter: str | None = "/", limit: int = 1000
) -> tuple[list[ObjectInfo], list[str], int]:
    """Every page of a listing: (objects, prefixes, number of pages)."""
    objects: list[ObjectInfo] = []
    prefixes: list[str] = []
    token: str | None = None
    pages = 0
    while True:
        page: ListPage = await store.list(prefix, delimiter=delimiter, token=token, limit=limit)
        pages += 1
        objects.extend(page.objects)
        prefixes.extend(page.prefixes)
        if page.next_token is None:
            return objects, prefixes, pages
        assert pages < 10_000, "listing does not terminate"
        token = page.next_token


async def stream(*chunks: bytes) -> AsyncIterator[Buffer]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


def as_bytes(data: Buffer) -> bytes:
    return bytes(memoryview(data))


async def streamed(
    store: UnderStore, key: str, start: int, end: int, *, etag: str | None = None
) -> tuple[bytes, list[int]]:
    """A whole ``get_range_stream``: (its bytes, the size of each chunk)."""
    out = bytearray()
    sizes: list[int] = []
    async for chunk in store.get_range_stream(key, start, end, etag=etag):
        sizes.append(memoryview(chunk).nbytes)
        out += memoryview(chunk)
    return bytes(out), sizes


_MODEL_KEYS = ["a", "b", "d/x", "d/y", "d/e/z", "dz", "ü k"]


class UnderStoreContract:
    """Inherit, provide a ``store`` fixture yielding a fresh empty store, and run pytest."""

    #: Size of the "large object" round trip (crosses multipart thresholds of most stores).
    large_size: ClassVar[int] = 9 * MiB
    #: Part size for the multipart test; S3 refuses parts below 5 MiB but the last.
    part_size: ClassVar[int] = 5 * MiB
    #: Allowed difference between the store's clock and ours, in seconds.
    clock_skew: ClassVar[float] = 120.0

    # --- head / get ---------------------------------------------------------------------

    async def test_head_missing_is_not_found(self, store: UnderStore) -> None:
        with pytest.raises(NotFound):
            await store.head("missing/object.bin")

    async def test_not_found_is_file_not_found(self, store: UnderStore) -> None:
        with pytest.raises(FileNotFoundError):
            await store.get("missing")

    async def test_put_then_head(self, store: UnderStore) -> None:
        before = time.time()
        put_info = await store.put("dir/obj.bin", payload(1000))
        info = await store.head("dir/obj.bin")
        assert info.key == "dir/obj.bin"
        assert info.size == 1000
        assert not info.is_dir
        assert isinstance(info.mtime, float)
        assert before - self.clock_skew <= info.mtime <= time.time() + self.clock_skew
        assert info.etag
        assert put_info.key == info.key
        assert put_info.size == info.size
        assert put_info.etag == info.etag

    async def test_get_whole_object(self, store: UnderStore) -> None:
        data = payload(5000, seed=1)
        await store.put("obj", data)
        got = await store.get("obj")
        assert as_bytes(got) == data
        assert len(memoryview(got)) == len(data)

    async def test_get_missing_is_not_found(self, store: UnderStore) -> None:
        with pytest.raises(NotFound):
            await store.get("nope")
        with pytest.raises(NotFound):
            await store.get_range("nope", 0, 10)

    async def test_head_of_prefix_is_not_found(self, store: UnderStore) -> None:
        await store.put("d/inner", b"x")
        with pytest.raises(NotFound):
            await store.head("d")

    async def test_empty_object(self, store: UnderStore) -> None:
        info = await store.put("empty", b"")
        assert info.size == 0
        assert (await store.head("empty")).size == 0
        assert as_bytes(await store.get("empty")) == b""
        assert as_bytes(await store.get_range("empty", 0, 10)) == b""
        assert as_bytes(await store.get_range("empty", 0, 0)) == b""

    # --- ranges -------------------------------------------------------------------------

    async def test_get_range_middle(self, store: UnderStore) -> None:
        data = payload(10_000, seed=2)
        await store.put("r", data)
        assert as_bytes(await store.get_range("r", 0, 1)) == data[:1]
        assert as_bytes(await store.get_range("r", 1234, 5678)) == data[1234:5678]
        assert as_bytes(await store.get_range("r", 0, 10_000)) == data

    async def test_get_range_clipped_at_end(self, store: UnderStore) -> None:
        data = payload(1000, seed=3)
        await store.put("r", data)
        assert as_bytes(await store.get_range("r", 900, 5000)) == data[900:]
        assert as_bytes(await store.get_range("r", 999, 1001)) == data[999:]

    async def test_get_range_beyond_end_is_empty(self, store: UnderStore) -> None:
        await store.put("r", payload(100))
        assert as_bytes(await store.get_range("r", 100, 200)) == b""
        assert as_bytes(await store.get_range("r", 5000, 6000)) == b""

    async def test_get_range_zero_length(self, store: UnderStore) -> None:
        await store.put("r", payload(100))
        assert as_bytes(await store.get_range("r", 10, 10)) == b""
        assert as_bytes(await store.get_range("r", 100, 100)) == b""
        with pytest.raises(NotFound):
            await store.get_range("missing", 5, 5)

    async def test_get_range_invalid_is_refused(self, store: UnderStore) -> None:
        await store.put("r", payload(100))
        with pytest.raises(InvalidRange):
            await store.get_range("r", -1, 10)
        with pytest.raises(InvalidRange):
            await store.get_range("r", 20, 10)

    async def test_get_range_with_current_etag(self, store: UnderStore) -> None:
        data = payload(3000, seed=4)
        info = await store.put("v", data)
        assert as_bytes(await store.get_range("v", 100, 200, etag=info.etag)) == data[100:200]
        head = await store.head("v")
        assert as_bytes(await store.get_range("v", 0, 3000, etag=head.etag)) == data

    async def test_overwrite_changes_etag(self, store: UnderStore) -> None:
        first = await store.put("v", payload(2048, seed=5))
        second = await store.put("v", payload(2048, seed=6))
        assert first.etag != second.etag
        assert (await store.head("v")).etag == second.etag
        assert as_bytes(await store.get("v")) == payload(2048, seed=6)

    async def test_get_range_stale_etag(self, store: UnderStore) -> None:
        old = await store.put("v", payload(2048, seed=7))
        new = await store.put("v", payload(2048, seed=8))
        with pytest.raises(StaleVersion):
            await store.get_range("v", 0, 100, etag=old.etag)
        with pytest.raises(StaleVersion):
            await store.get_range("v", 10, 10, etag=old.etag)
        with pytest.raises(StaleVersion):
            await store.get_range("v", 5000, 6000, etag=old.etag)
        got = await store.get_range("v", 0, 100, etag=new.etag)
        assert as_bytes(got) == payload(2048, seed=8)[:100]

    async def test_stale_version_is_not_found_when_deleted(self, store: UnderStore) -> None:
        info = await store.put("v", b"abc")
        await store.delete("v")
        with pytest.raises(NotFound):
            await store.get_range("v", 0, 3, etag=info.etag)

    async def test_concurrent_ranges(self, store: UnderStore) -> None:
        data = payload(64 * 1024, seed=9)
        await store.put("c", data)
        spans = [(i * 4096, i * 4096 + 4096) for i in range(16)]
        parts = await asyncio.gather(*(store.get_range("c", a, b) for a, b in spans))
        assert b"".join(as_bytes(p) for p in parts) == data

    # --- streamed ranges ----------------------------------------------------------------

    async def test_get_range_stream_equals_get_range(self, store: UnderStore) -> None:
        data = payload(MiB + 4321, seed=21)
        await store.put("s", data)
        for start, end in [(0, 1), (0, 4096), (1234, 5678), (100, MiB + 4321), (0, MiB + 4321),
                           (MiB, MiB + 9999)]:
            got, sizes = await streamed(store, "s", start, end)
            assert got == as_bytes(await store.get_range("s", start, end)) == data[start:end]
            assert sizes and all(size > 0 for size in sizes)

    async def test_get_range_stream_clips_like_get_range(self, store: UnderStore) -> None:
        await store.put("s", payload(1000, seed=22))
        assert (await streamed(store, "s", 900, 5000))[0] == payload(1000, seed=22)[900:]
        assert await streamed(store, "s", 1000, 2000) == (b"", [])
        assert await streamed(store, "s", 10, 10) == (b"", [])
        with pytest.raises(InvalidRange):
            await streamed(store, "s", 20, 10)
        with pytest.raises(NotFound):
            await streamed(store, "missing", 0, 10)
        with pytest.raises(NotFound):
            await streamed(store, "missing", 5, 5)

    async def test_get_range_stream_pinned_to_a_version(self, store: UnderStore) -> None:
        old = await store.put("v", payload(300_000, seed=23))
        got, _ = await streamed(store, "v", 1000, 300_000, etag=old.etag)
        assert got == payload(300_000, seed=23)[1000:]
        new = await store.put("v", payload(300_000, seed=24))
        for start, end in [(0, 100), (0, 300_000), (10, 10), (5000, 6000)]:
            with pytest.raises(StaleVersion):
                await streamed(store, "v", start, end, etag=old.etag)
        got, _ = await streamed(store, "v", 0, 300_000, etag=new.etag)
        assert got == payload(300_000, seed=24)
        await store.delete("v")
        with pytest.raises(NotFound):
            await streamed(store, "v", 0, 100, etag=new.etag)

    async def test_get_range_stream_closed_early(self, store: UnderStore) -> None:
        data = payload(MiB, seed=25)
        await store.put("s", data)
        chunks = store.get_range_stream("s", 0, MiB)
        first = await anext(chunks)
        assert as_bytes(first) == data[: memoryview(first).nbytes]
        await chunks.aclose()  # a reader that stops early releases the stream
        assert (await streamed(store, "s", 0, MiB))[0] == data

    # --- listing ------------------------------------------------------------------------

    async def _tree(self, store: UnderStore) -> None:
        for key in ["top", "a/1", "a/2", "a/b/3", "a/b/c/4", "z/5", "a-sibling"]:
            await store.put(key, key.encode())

    async def test_list_empty_store(self, store: UnderStore) -> None:
        page = await store.list("")
        assert page.objects == []
        assert page.prefixes == []
        assert page.next_token is None
        page = await store.list("no/such/dir/", delimiter=None)
        assert page.objects == [] and page.next_token is None

    async def test_list_one_level(self, store: UnderStore) -> None:
        await self._tree(store)
        objects, prefixes, _ = await collect(store, "")
        assert [o.key for o in objects] == ["a-sibling", "top"]
        assert prefixes == ["a/", "z/"]
        objects, prefixes, _ = await collect(store, "a/")
        assert [o.key for o in objects] == ["a/1", "a/2"]
        assert prefixes == ["a/b/"]
        objects, prefixes, _ = await collect(store, "a/b/")
        assert [o.key for o in objects] == ["a/b/3"]
        assert prefixes == ["a/b/c/"]

    async def test_list_recursive(self, store: UnderStore) -> None:
        await self._tree(store)
        objects, prefixes, _ = await collect(store, "a/", delimiter=None)
        assert [o.key for o in objects] == ["a/1", "a/2", "a/b/3", "a/b/c/4"]
        assert prefixes == []
        everything, _, _ = await collect(store, "", delimiter=None)
        assert [o.key for o in everything] == sorted(
            ["top", "a/1", "a/2", "a/b/3", "a/b/c/4", "z/5", "a-sibling"]
        )

    async def test_list_string_prefix(self, store: UnderStore) -> None:
        for key in ["data/file1", "data/file2", "data/fileX/y", "data/other", "data2/z"]:
            await store.put(key, b"1")
        objects, prefixes, _ = await collect(store, "data/file")
        assert [o.key for o in objects] == ["data/file1", "data/file2"]
        assert prefixes == ["data/fileX/"]
        objects, prefixes, _ = await collect(store, "data")
        assert objects == [] and prefixes == ["data/", "data2/"]
        objects, _, _ = await collect(store, "data/f", delimiter=None)
        assert [o.key for o in objects] == ["data/file1", "data/file2", "data/fileX/y"]

    async def test_list_entries_match_head(self, store: UnderStore) -> None:
        await store.put("m/obj", payload(777))
        objects, _, _ = await collect(store, "m/")
        (listed,) = objects
        head = await store.head("m/obj")
        assert (listed.key, listed.size, listed.etag) == (head.key, head.size, head.etag)
        assert abs(listed.mtime - head.mtime) < 2.0
        # An ETag from a listing pins a read just as one from head() does.
        assert as_bytes(await store.get_range("m/obj", 0, 7, etag=listed.etag)) == payload(7)

    async def test_list_pagination_recursive(self, store: UnderStore) -> None:
        keys = [f"p/{i:03d}" for i in range(25)]
        await asyncio.gather(*(store.put(k, b"x") for k in keys))
        first = await store.list("p/", delimiter=None, limit=10)
        assert [o.key for o in first.objects] == keys[:10]
        assert first.next_token is not None
        objects, _, pages = await collect(store, "p/", delimiter=None, limit=10)
        assert [o.key for o in objects] == keys
        assert pages == 3

    async def test_list_pagination_with_prefixes(self, store: UnderStore) -> None:
        keys = [f"q/{i:03d}" for i in range(20)] + [f"q/sub{i}/leaf" for i in range(5)]
        await asyncio.gather(*(store.put(k, b"x") for k in keys))
        objects, prefixes, pages = await collect(store, "q/", limit=10)
        assert [o.key for o in objects] == keys[:20]
        assert prefixes == [f"q/sub{i}/" for i in range(5)]
        assert pages == 3

    async def test_list_limit_one(self, store: UnderStore) -> None:
        for key in ["l/a", "l/b/c", "l/d"]:
            await store.put(key, b"x")
        objects, prefixes, pages = await collect(store, "l/", limit=1)
        assert [o.key for o in objects] == ["l/a", "l/d"]
        assert prefixes == ["l/b/"]
        assert pages == 3

    async def test_list_token_is_stateless(self, store: UnderStore) -> None:
        for i in range(6):
            await store.put(f"t/{i}", b"x")
        page = await store.list("t/", delimiter=None, limit=3)
        assert [o.key for o in page.objects] == ["t/0", "t/1", "t/2"]
        assert page.next_token is not None
        # A token is a position, not a handle: any key works, and a larger limit is fine.
        rest = await store.list("t/", delimiter=None, token=page.next_token, limit=100)
        assert [o.key for o in rest.objects] == ["t/3", "t/4", "t/5"]
        assert rest.next_token is None
        again = await store.list("t/", delimiter="/", token="t/3", limit=100)
        assert [o.key for o in again.objects] == ["t/4", "t/5"]

    async def test_list_bad_arguments(self, store: UnderStore) -> None:
        with pytest.raises(InvalidArgument):
            await store.list("", delimiter=",")
        with pytest.raises(InvalidArgument):
            await store.list("", limit=0)
        with pytest.raises(InvalidArgument):
            await store.list("/abs")

    # --- writes -------------------------------------------------------------------------

    async def test_delete(self, store: UnderStore) -> None:
        await store.put("del/me", b"bye")
        await store.put("del/keep", b"stay")
        await store.delete("del/me")
        with pytest.raises(NotFound):
            await store.head("del/me")
        objects, _, _ = await collect(store, "del/")
        assert [o.key for o in objects] == ["del/keep"]

    async def test_delete_missing_is_silent(self, store: UnderStore) -> None:
        await store.delete("never/existed")
        await store.put("once", b"x")
        await store.delete("once")
        await store.delete("once")

    async def test_delete_last_key_drops_prefix(self, store: UnderStore) -> None:
        await store.put("gone/deep/leaf", b"x")
        await store.put("kept", b"x")
        await store.delete("gone/deep/leaf")
        _, prefixes, _ = await collect(store, "")
        assert prefixes == []

    async def test_put_multipart_several_parts(self, store: UnderStore) -> None:
        parts = [payload(self.part_size, seed=10), payload(self.part_size, seed=11), b"tail" * 256]
        info = await store.put_multipart("mp/obj", stream(*parts), part_size=self.part_size)
        whole = b"".join(parts)
        assert info.size == len(whole)
        assert (await store.head("mp/obj")).size == len(whole)
        assert as_bytes(await store.get("mp/obj")) == whole
        mid = self.part_size - 10
        assert as_bytes(await store.get_range("mp/obj", mid, mid + 20)) == whole[mid : mid + 20]

    async def test_put_multipart_small_chunks(self, store: UnderStore) -> None:
        chunks = [payload(1000 + i, seed=i) for i in range(50)]
        info = await store.put_multipart("mp/small", stream(*chunks), part_size=self.part_size)
        assert info.size == sum(len(c) for c in chunks)
        assert as_bytes(await store.get("mp/small")) == b"".join(chunks)

    async def test_put_multipart_empty_stream(self, store: UnderStore) -> None:
        info = await store.put_multipart("mp/empty", stream())
        assert info.size == 0
        assert as_bytes(await store.get("mp/empty")) == b""

    async def test_put_multipart_failing_producer(self, store: UnderStore) -> None:
        await store.put("mp/fail", b"previous")

        async def broken() -> AsyncIterator[Buffer]:
            yield payload(1000)
            raise RuntimeError("producer failed")

        with pytest.raises(RuntimeError, match="producer failed"):
            await store.put_multipart("mp/fail", broken(), part_size=self.part_size)
        assert as_bytes(await store.get("mp/fail")) == b"previous"

    async def test_put_accepts_buffers(self, store: UnderStore) -> None:
        data = payload(300)
        await store.put("buf/mv", memoryview(data)[100:200])
        await store.put("buf/ba", bytearray(data))
        assert as_bytes(await store.get("buf/mv")) == data[100:200]
        assert as_bytes(await store.get("buf/ba")) == data

    async def test_unicode_and_space_keys(self, store: UnderStore) -> None:
        keys = ["dir with space/file name.txt", "ünïcødé/文件.bin", "sym+bols/a=b,c;d@e"]
        for i, key in enumerate(keys):
            await store.put(key, payload(10, seed=i))
        for i, key in enumerate(keys):
            assert (await store.head(key)).key == key
            assert as_bytes(await store.get(key)) == payload(10, seed=i)
        objects, prefixes, _ = await collect(store, "")
        assert prefixes == sorted(
            ["dir with space/", "ünïcødé/", "sym+bols/"], key=lambda p: p.encode()
        )
        objects, _, _ = await collect(store, "ünïcødé/")
        assert [o.key for o in objects] == ["ünïcødé/文件.bin"]

    async def test_invalid_keys_are_refused(self, store: UnderStore) -> None:
        for key in ["", "/abs", "a//b", "a/../b", "./a", "trailing/"]:
            with pytest.raises(InvalidArgument):
                await store.put(key, b"x")
            with pytest.raises(InvalidArgument):
                await store.head(key)

    async def test_large_object_roundtrip(self, store: UnderStore) -> None:
        data = payload(self.large_size, seed=12)
        info = await store.put("big/blob", data)
        assert info.size == len(data)
        assert as_bytes(await store.get("big/blob")) == data
        start = self.large_size // 2 - 12345
        got = await store.get_range("big/blob", start, start + 4 * MiB, etag=info.etag)
        assert as_bytes(got) == data[start : start + 4 * MiB]

    # --- attributes (content headers, user metadata) -------------------------------------
    # Stores that keep them must return them; the others must accept and ignore them.

    ATTRS = Attributes.of(
        {
            "Content-Type": "text/csv; charset=utf-8",
            "Cache-Control": "max-age=60",
            "Content-Disposition": 'attachment; filename="a.csv"',
            "Content-Language": "de",
        },
        {"owner": "team-a", "Mixed_Case": "Value Kept", "empty": ""},
    )

    def _check_attributes(self, store: UnderStore, got: Attributes | None) -> None:
        if not store.supports_attributes:
            assert got is None
            return
        assert got is not None
        for name, value in self.ATTRS.headers:
            assert got.header(name) == value, name
        assert dict(got.metadata) == {"owner": "team-a", "mixed_case": "Value Kept", "empty": ""}

    async def test_attributes_roundtrip(self, store: UnderStore) -> None:
        put_info = await store.put("attr/one.csv", b"a,b\n", attributes=self.ATTRS)
        self._check_attributes(store, put_info.attributes)
        self._check_attributes(store, (await store.head("attr/one.csv")).attributes)
        assert as_bytes(await store.get("attr/one.csv")) == b"a,b\n"

    async def test_attributes_multipart(self, store: UnderStore) -> None:
        data = payload(self.part_size + 1000, seed=5)
        chunks = stream(data[: self.part_size], data[self.part_size :])
        await store.put_multipart(
            "attr/big.bin", chunks, part_size=self.part_size, attributes=self.ATTRS
        )
        self._check_attributes(store, (await store.head("attr/big.bin")).attributes)

    async def test_overwrite_replaces_attributes(self, store: UnderStore) -> None:
        await store.put("attr/two", b"1", attributes=self.ATTRS)
        await store.put("attr/two", b"2")
        got = (await store.head("attr/two")).attributes
        if store.supports_attributes:
            assert got is not None and got.metadata == ()
            assert got.content_type != "text/csv; charset=utf-8"  # None or the store's default
        else:
            assert got is None

    async def test_listing_carries_no_attributes(self, store: UnderStore) -> None:
        await store.put("attr/listed", b"x", attributes=self.ATTRS)
        objects, _, _ = await collect(store, "attr/")
        assert [o.attributes for o in objects] == [None]

    # --- a random walk held against a dict ----------------------------------------------

    @settings(
        max_examples=25,
        deadline=None,
        # One store serves every example (it is emptied first), and each backend's subclass
        # runs the same method: both are intended.
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.differing_executors,
        ],
    )
    @given(
        ops=st.lists(
            st.one_of(
                st.tuples(st.just("put"), st.sampled_from(_MODEL_KEYS), st.binary(max_size=64)),
                st.tuples(st.just("delete"), st.sampled_from(_MODEL_KEYS)),
                st.tuples(
                    st.just("range"),
                    st.sampled_from(_MODEL_KEYS),
                    st.integers(0, 80),
                    st.integers(0, 80),
                ),
                st.tuples(st.just("list"), st.sampled_from(["", "d", "d/", "d/e/"]), st.booleans()),
            ),
            max_size=12,
        )
    )
    async def test_model(self, store: UnderStore, ops: list[tuple[Any, ...]]) -> None:
        await self._reset(store)
        model: dict[str, bytes] = {}
        for op in ops:
            if op[0] == "put":
                _, key, data = op
                await store.put(key, data)
                model[key] = data
            elif op[0] == "delete":
                await store.delete(op[1])
                model.pop(op[1], None)
            elif op[0] == "range":
                _, key, a, b = op
                start, end = min(a, b), max(a, b)
                if key in model:
                    got = await store.get_range(key, start, end)
                    assert as_bytes(got) == model[key][start:end]
                else:
                    with pytest.raises(NotFound):
                        await store.get_range(key, start, end)
            else:
                _, prefix, recursive = op
                delimiter = None if recursive else "/"
                objects, prefixes, _ = await collect(store, prefix, delimiter=delimiter, limit=2)
                want_objects, want_prefixes = _expected_listing(model, prefix, delimiter)
                assert [o.key for o in objects] == want_objects
                assert prefixes == want_prefixes
                for info in objects:
                    assert info.size == len(model[info.key])

    async def _reset(self, store: UnderStore) -> None:
        objects, _, _ = await collect(store, "", delimiter=None)
        for info in objects:
            await store.delete(info.key)


def _expected_listing(
    model: dict[str, bytes], prefix: str, delimiter: str | None
) -> tuple[list[str], list[str]]:
    objects: list[str] = []
    prefixes: set[str] = set()
    for key in model:
        if not key.startswith(prefix):
            continue
        cut = key.find("/", len(prefix)) if delimiter else -1
        if cut >= 0:
            prefixes.add(key[: cut + 1])
        else:
            objects.append(key)
    return sorted(objects, key=str.encode), sorted(prefixes, key=str.encode)
