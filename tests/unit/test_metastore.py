"""The RocksDB metadata cache: round trips, persistence, invalidation, damage and threads."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from rocksdict import Options, Rdict

from depot.core.errors import DepotError
from depot.core.types import Attributes, FileStatus
from depot.metastore import CachedListing, CachedStatus, MetadataStore

URI = "s3://bucket/models/llama/model.safetensors"


def status(size: int = 10, etag: str | None = "e1", version: str | None = None) -> FileStatus:
    return FileStatus(
        "/models/llama/model.safetensors", size, 1_700_000_000.25, False, etag, version
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "meta"


@pytest.fixture
def store(db_path: Path) -> Iterator[MetadataStore]:
    with MetadataStore(db_path) as opened:
        yield opened


def raw_db(path: Path) -> Rdict:
    return Rdict(str(path), Options(raw_mode=True))


# -- status -----------------------------------------------------------------------------


def test_missing_key_is_a_miss(store: MetadataStore) -> None:
    assert store.get_status(URI) is None
    assert store.get_listing(URI) is None
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.entries) == (0, 2, 0)


def test_status_round_trip(store: MetadataStore) -> None:
    st = FileStatus("/a/b", 123, 1.5, False, '"etag-with-quotes"', "v7")
    store.put_status(URI, st, 1000.5)
    cached = store.get_status(URI)
    assert cached == CachedStatus(st, 1000.5)
    assert cached.exists
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.statuses) == (1, 0, 1, 1)


def test_status_with_undecodable_name_round_trips(store: MetadataStore) -> None:
    st = FileStatus("/raw/\udcff\udc80-\u00e9", 1, 1.0, False, "\ud800", None)
    store.put_status(URI, st, 1.0)
    store.put_listing(URI, [st], 1.0)
    store.close()
    with MetadataStore(store.path) as reopened:
        assert reopened.get_status(URI) == CachedStatus(st, 1.0)
        assert reopened.get_listing(URI) == CachedListing([st], 1.0)


def test_directory_status_round_trip(store: MetadataStore) -> None:
    st = FileStatus("/models", 0, 0.0, True)
    store.put_status("s3://bucket/models", st, 5.0)
    cached = store.get_status("s3://bucket/models")
    assert cached is not None and cached.status == st and cached.status.is_dir


def test_negative_entry(store: MetadataStore) -> None:
    store.put_status(URI, None, 42.0)
    cached = store.get_status(URI)
    assert cached == CachedStatus(None, 42.0)
    assert not cached.exists
    assert store.get_version(URI) is None
    assert store.stats().entries == 1


def test_put_overwrites(store: MetadataStore) -> None:
    store.put_status(URI, status(etag="one"), 1.0)
    store.put_status(URI, status(etag="two"), 2.0)
    cached = store.get_status(URI)
    assert cached is not None and cached.status is not None
    assert cached.status.etag == "two" and cached.fetched_at == 2.0
    assert store.stats().entries == 1


def test_negative_entry_replaced_by_a_positive_one(store: MetadataStore) -> None:
    store.put_status(URI, None, 1.0)
    store.put_status(URI, status(), 2.0)
    cached = store.get_status(URI)
    assert cached is not None and cached.exists


def test_replace_status_returns_the_previous_status(store: MetadataStore) -> None:
    assert store.replace_status(URI, status(etag="one"), 1.0) is None
    previous = store.replace_status(URI, status(etag="two"), 2.0)
    assert previous == status(etag="one")
    assert store.replace_status(URI, None, 3.0) == status(etag="two")
    assert store.replace_status(URI, status(etag="three"), 4.0) is None  # was negative


ATTRS = Attributes.of({"Content-Type": "text/csv"}, {"owner": "tëam"})


def test_status_with_attributes_round_trips_and_survives_reopen(db_path: Path) -> None:
    st = FileStatus("/a/b.csv", 3, 1.5, False, '"e"', None, ATTRS)
    empty = FileStatus("/a/c", 3, 1.5, False, '"e"', None, Attributes())
    with MetadataStore(db_path) as store:
        store.put_status(URI, st, 1.0)
        store.put_status("s3://b/c", empty, 1.0)
        store.put_listing("s3://b/", [st], 1.0)
    with MetadataStore(db_path) as store:
        assert store.get_status(URI) == CachedStatus(st, 1.0)
        assert store.get_status("s3://b/c") == CachedStatus(empty, 1.0)
        listing = store.get_listing("s3://b/")
        assert listing is not None and listing.entries == [st]


def test_records_written_before_attributes_still_decode(db_path: Path) -> None:
    with MetadataStore(db_path):
        pass
    db = raw_db(db_path)
    db.put(b"S" + URI.encode(), b'[1, 2.0, ["/p", 5, 1.0, false, "\\"e\\"", null]]')
    db.close()
    with MetadataStore(db_path) as store:
        cached = store.get_status(URI)
        assert cached is not None and cached.status == FileStatus("/p", 5, 1.0, False, '"e"')
        assert cached.status.attributes is None


def test_a_listed_status_keeps_the_attributes_of_its_version(store: MetadataStore) -> None:
    store.replace_status(URI, dataclasses.replace(status(etag="one"), attributes=ATTRS), 1.0)
    listed = status(etag="one")  # a listing: same version, attributes unknown
    store.replace_status(URI, listed, 2.0, keep_attributes=True)
    cached = store.get_status(URI)
    assert cached is not None and cached.status is not None
    assert cached.status.attributes == ATTRS and cached.fetched_at == 2.0
    store.replace_status(URI, status(etag="two"), 3.0, keep_attributes=True)  # a new version
    cached = store.get_status(URI)
    assert cached is not None and cached.status is not None and cached.status.attributes is None
    store.replace_status(URI, FileStatus("/x", 1, 1.0, etag="two", attributes=ATTRS), 4.0)
    store.replace_status(URI, status(etag="two"), 5.0)  # without keep_attributes: replaced
    cached = store.get_status(URI)
    assert cached is not None and cached.status is not None and cached.status.attributes is None


def test_version_change_is_detectable(store: MetadataStore) -> None:
    old = status(size=10, etag=None, version="111")
    store.put_status(URI, old, 1.0)
    assert store.get_version(URI) == "v:111"
    new = status(size=10, etag=None, version="222")
    previous = store.replace_status(URI, new, 2.0)
    assert previous is not None and previous.version_tag != new.version_tag
    assert store.get_version(URI) == "v:222"
    same = store.replace_status(URI, new, 3.0)
    assert same is not None and same.version_tag == new.version_tag


def test_version_of_unknown_key(store: MetadataStore) -> None:
    assert store.get_version("s3://bucket/none") is None


@pytest.mark.parametrize(
    "key",
    [
        "",
        "s3://bucket/日本語/ファイル.bin",
        "s3://bucket/with space/and%20percent",
        "gs://b/emoji-🙂",
        "file:///srv/\udcff-surrogate-escaped",
        "s3://b/" + "k" * 2000,
    ],
)
def test_any_string_key(store: MetadataStore, key: str) -> None:
    store.put_status(key, status(), 1.0)
    assert store.get_status(key) == CachedStatus(status(), 1.0)
    assert store.invalidate(key)
    assert store.get_status(key) is None


def test_non_string_key_is_refused(store: MetadataStore) -> None:
    with pytest.raises(TypeError, match="strings"):
        store.put_status(b"s3://b/x", status(), 1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("when", [float("nan"), float("inf")])
def test_fetch_time_must_be_finite(store: MetadataStore, when: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        store.put_status(URI, status(), when)
    assert store.stats().entries == 0


# -- listings ---------------------------------------------------------------------------


def test_listing_round_trip(store: MetadataStore) -> None:
    entries = [
        FileStatus("/models/a", 1, 1.0, False, "e", None),
        FileStatus("/models/sub", 0, 0.0, True),
        FileStatus("/models/c", 2**40, 2.5, False, None, "ver"),
    ]
    store.put_listing("s3://bucket/models", entries, 9.0)
    cached = store.get_listing("s3://bucket/models")
    assert cached == CachedListing(entries, 9.0)
    assert store.stats().listings == 1


def test_empty_listing_is_not_a_miss(store: MetadataStore) -> None:
    store.put_listing("s3://bucket/empty", [], 1.0)
    cached = store.get_listing("s3://bucket/empty")
    assert cached is not None and cached.entries == []


def test_listing_readers_get_their_own_list(store: MetadataStore) -> None:
    store.put_listing("s3://b/d", (s for s in [status()]), 1.0)
    first = store.get_listing("s3://b/d")
    assert first is not None
    first.entries.clear()
    second = store.get_listing("s3://b/d")
    assert second is not None and second.entries == [status()]


def test_status_and_listing_of_one_key_are_independent(store: MetadataStore) -> None:
    key = "s3://bucket/models"
    store.put_status(key, FileStatus("/models", 0, 0.0, True), 1.0)
    assert store.get_listing(key) is None
    store.put_listing(key, [status()], 2.0)
    cached = store.get_status(key)
    assert cached is not None and cached.fetched_at == 1.0
    assert store.stats().entries == 2


def test_large_listing(store: MetadataStore) -> None:
    entries = [FileStatus(f"/d/f{i:05d}", i, float(i), False, f"e{i}") for i in range(20_000)]
    store.put_listing("s3://b/d", entries, 1.0)
    cached = store.get_listing("s3://b/d")
    assert cached is not None and cached.entries == entries


# -- invalidation -----------------------------------------------------------------------


def test_invalidate_removes_status_and_listing(store: MetadataStore) -> None:
    store.put_status("s3://b/d", FileStatus("/d", 0, 0.0, True), 1.0)
    store.put_listing("s3://b/d", [status()], 1.0)
    store.put_status("s3://b/d2", status(), 1.0)
    assert store.invalidate("s3://b/d") is True
    assert store.get_status("s3://b/d") is None
    assert store.get_listing("s3://b/d") is None
    assert store.get_status("s3://b/d2") is not None
    assert store.invalidate("s3://b/d") is False
    assert store.stats().entries == 1


def test_invalidate_prefix(store: MetadataStore) -> None:
    keep = ["s3://b/models2/x", "s3://b/model", "s3://a/models/x", "gs://b/models/x"]
    drop = ["s3://b/models/x", "s3://b/models/y/z", "s3://b/models/"]
    for key in keep + drop:
        store.put_status(key, status(), 1.0)
    store.put_listing("s3://b/models/y", [status()], 1.0)
    store.put_listing("s3://b/models2", [status()], 1.0)
    for key in keep + drop:  # warm the in-memory layer too
        assert store.get_status(key) is not None

    assert store.invalidate_prefix("s3://b/models/") == len(drop) + 1

    for key in drop:
        assert store.get_status(key) is None
    assert store.get_listing("s3://b/models/y") is None
    for key in keep:
        assert store.get_status(key) is not None
    assert store.get_listing("s3://b/models2") is not None
    assert store.stats().entries == len(keep) + 1


def test_invalidate_prefix_survives_reopen(db_path: Path) -> None:
    with MetadataStore(db_path) as store:
        for i in range(50):
            store.put_status(f"s3://b/p/{i}", status(), 1.0)
        store.put_status("s3://b/q", status(), 1.0)
        assert store.invalidate_prefix("s3://b/p/") == 50
    with MetadataStore(db_path) as store:
        assert store.stats().entries == 1
        assert store.get_status("s3://b/p/7") is None
        assert store.get_status("s3://b/q") is not None


def test_invalidate_prefix_in_batches(
    store: MetadataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("depot.metastore.store._DELETE_BATCH", 7)
    for i in range(30):
        store.put_status(f"s3://b/p/{i:02d}", status(), 1.0)
    assert store.invalidate_prefix("s3://b/p/") == 30
    assert store.stats().entries == 0


def test_empty_prefix_clears_everything(store: MetadataStore) -> None:
    store.put_status("s3://a", status(), 1.0)
    store.put_listing("gs://b", [], 1.0)
    assert store.invalidate_prefix("") == 2
    assert store.stats().entries == 0


# -- persistence ------------------------------------------------------------------------


def test_survives_close_and_reopen(db_path: Path) -> None:
    with MetadataStore(db_path) as store:
        store.put_status(URI, status(version="9"), 10.0)
        store.put_status("s3://bucket/gone", None, 11.0)
        store.put_listing("s3://bucket/models", [status()], 12.0)
    with MetadataStore(db_path) as store:
        assert store.get_status(URI) == CachedStatus(status(version="9"), 10.0)
        assert store.get_status("s3://bucket/gone") == CachedStatus(None, 11.0)
        assert store.get_listing("s3://bucket/models") == CachedListing([status()], 12.0)
        assert store.get_version(URI) == "v:9"
        stats = store.stats()
        assert (stats.entries, stats.statuses, stats.listings) == (3, 2, 1)


def test_survives_a_process_that_never_closes(db_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os
        from depot.core.types import Attributes, FileStatus
        from depot.metastore import MetadataStore
        store = MetadataStore({str(db_path)!r})
        store.put_status("s3://b/x", FileStatus("/x", 5, 1.0, etag="crash"), 3.0)
        os._exit(0)
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    with MetadataStore(db_path) as store:
        cached = store.get_status("s3://b/x")
        assert cached is not None and cached.status is not None
        assert cached.status.etag == "crash"


def test_closed_store_refuses_calls(db_path: Path) -> None:
    store = MetadataStore(db_path)
    store.put_status(URI, status(), 1.0)
    store.close()
    store.close()  # harmless
    assert store.closed
    with pytest.raises(DepotError, match="closed"):
        store.get_status(URI)
    with pytest.raises(DepotError, match="closed"):
        store.put_listing(URI, [], 1.0)
    with pytest.raises(DepotError, match="closed"):
        store.invalidate_prefix("")


def test_second_open_of_the_same_directory_fails_clearly(store: MetadataStore) -> None:
    with pytest.raises(DepotError, match="cannot open metadata store"):
        MetadataStore(store.path)


def test_damaged_database_is_recreated_empty(db_path: Path) -> None:
    with MetadataStore(db_path) as store:
        store.put_status(URI, status(), 1.0)
    (db_path / "CURRENT").write_bytes(b"garbage\n")
    with MetadataStore(db_path) as store:
        assert store.reset_on_open
        assert store.get_status(URI) is None
        store.put_status(URI, status(), 2.0)
        assert store.get_status(URI) is not None


def test_store_of_another_format_is_cleared(db_path: Path) -> None:
    with MetadataStore(db_path) as store:
        store.put_status(URI, status(), 1.0)
        assert not store.reset_on_open
    db = raw_db(db_path)
    db.put(b"\x00format", b"999")
    db.close()
    with MetadataStore(db_path) as store:
        assert store.reset_on_open
        assert store.stats().entries == 0
        assert store.get_status(URI) is None
    with MetadataStore(db_path) as store:  # and the marker is current again
        assert not store.reset_on_open


# -- damaged values ---------------------------------------------------------------------

BAD_VALUES = [
    b"",
    b"\xff\xfe\x00",
    b"not json",
    b"{}",
    b"[1]",
    b"[2, 1.0, null]",
    b"[true, 1.0, null]",
    b'[1, "yesterday", null]',
    b"[1, NaN, null]",
    b"[1, 1.0, 7]",
    b'[1, 1.0, ["/p", -1, 0, false, null, null]]',
    b'[1, 1.0, ["/p", 1, 0, "no", null, null]]',
    b'[1, 1.0, ["/p", 1.5, 0, false, null, null]]',
    b'[1, 1.0, ["/p", 1, 0, false, 5, null]]',
    b'[1, 1.0, ["/p", 1, 0, false, null]]',
    b'[1, 1.0, [["/p", 1, 0, false, null, null]]]',
    b'[1, 1.0, ["/p", 1, 0, false, null, null, 7]]',
    b'[1, 1.0, ["/p", 1, 0, false, null, null, [[["Content-Type", 1]], []]]]',
    b'[1, 1.0, ["/p", 1, 0, false, null, null, [[["X-Not-A-Header", "v"]], []]]]',
    b'[1, 1.0, ["/p", 1, 0, false, null, null, [[], [["k"]]]]]',
    b"[" * 100_000 + b"]" * 100_000,
]


@pytest.mark.parametrize("value", BAD_VALUES, ids=lambda v: repr(v[:24]))
def test_unreadable_status_is_a_miss_and_is_dropped(db_path: Path, value: bytes) -> None:
    with MetadataStore(db_path) as store:
        store.put_status(URI, status(), 1.0)
        store.put_status("s3://b/other", status(), 1.0)
    db = raw_db(db_path)
    db.put(b"S" + URI.encode(), value)
    db.close()
    with MetadataStore(db_path) as store:
        assert store.get_status(URI) is None
        assert store.get_version(URI) is None
        stats = store.stats()
        assert (stats.corrupt, stats.entries) == (1, 1)
        assert store.get_status("s3://b/other") is not None
    db = raw_db(db_path)
    try:
        assert db.get(b"S" + URI.encode()) is None
    finally:
        db.close()


@pytest.mark.parametrize(
    "value",
    [*BAD_VALUES[:6], b'[1, 1.0, [["/p", 1, 0, false, null, null], "x"]]', b"[1, 1.0, null]"],
    ids=lambda v: repr(v[:24]),
)
def test_unreadable_listing_is_a_miss(db_path: Path, value: bytes) -> None:
    with MetadataStore(db_path) as store:
        store.put_listing("s3://b/d", [status()], 1.0)
    db = raw_db(db_path)
    db.put(b"Ls3://b/d", value)
    db.close()
    with MetadataStore(db_path) as store:
        assert store.get_listing("s3://b/d") is None
        assert store.stats().corrupt == 1
        assert store.stats().entries == 0
        store.put_listing("s3://b/d", [status()], 2.0)  # and it can be filled again
        assert store.get_listing("s3://b/d") == CachedListing([status()], 2.0)


def test_replace_over_a_damaged_value(db_path: Path) -> None:
    with MetadataStore(db_path) as store:
        store.put_status(URI, status(), 1.0)
    db = raw_db(db_path)
    db.put(b"S" + URI.encode(), b"\x00junk")
    db.close()
    with MetadataStore(db_path) as store:
        assert store.replace_status(URI, status(etag="new"), 2.0) is None
        assert store.stats().entries == 1
        assert store.get_version(URI) == "e:new"


# -- in-memory layer --------------------------------------------------------------------


def test_memory_layer_is_bounded(db_path: Path) -> None:
    with MetadataStore(db_path, memory_entries=3) as store:
        for i in range(10):
            store.put_status(f"s3://b/{i}", status(size=i), 1.0)
        assert store.stats().memory_entries <= 3
        for i in range(10):  # everything is still on disk
            cached = store.get_status(f"s3://b/{i}")
            assert cached is not None and cached.status is not None
            assert cached.status.size == i
        assert store.stats().memory_entries <= 3


def test_listing_weighs_its_entries(db_path: Path) -> None:
    with MetadataStore(db_path, memory_entries=5) as store:
        store.put_status("s3://b/s", status(), 1.0)
        store.put_listing("s3://b/big", [status()] * 10, 1.0)  # heavier than the whole layer
        assert store.stats().memory_entries == 1
        store.put_listing("s3://b/small", [status()] * 4, 1.0)  # weight 5: evicts the status
        assert store.stats().memory_entries == 1
        cached = store.get_listing("s3://b/big")
        assert cached is not None and len(cached.entries) == 10


def test_memory_layer_can_be_disabled(db_path: Path) -> None:
    with MetadataStore(db_path, memory_entries=0) as store:
        store.put_status(URI, status(), 1.0)
        assert store.get_status(URI) == CachedStatus(status(), 1.0)
        assert store.stats().memory_entries == 0
    with pytest.raises(ValueError):
        MetadataStore(db_path, memory_entries=-1)


def test_memory_layer_does_not_hide_direct_deletes(store: MetadataStore) -> None:
    """Invalidation must reach the in-memory copy, not only RocksDB."""
    store.put_status(URI, status(), 1.0)
    assert store.get_status(URI) is not None
    store.invalidate(URI)
    assert store.get_status(URI) is None


def test_stats_to_dict(store: MetadataStore) -> None:
    store.put_status(URI, status(), 1.0)
    store.get_status(URI)
    store.get_status("s3://missing")
    assert store.stats().to_dict() == {
        "entries": 1,
        "statuses": 1,
        "listings": 0,
        "hits": 1,
        "misses": 1,
        "corrupt": 0,
        "memory_entries": 1,
    }


# -- threads ----------------------------------------------------------------------------


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Make the interpreter switch threads very often, so races show up within a short test."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@pytest.mark.usefixtures("busy_switching")
def test_concurrent_replace_status_is_atomic(db_path: Path) -> None:
    """Every write sees exactly the write before it: the versions form one unbroken chain."""
    threads_n, per_thread = 8, 200
    seen_previous: list[str | None] = []
    lock = threading.Lock()
    with MetadataStore(db_path, memory_entries=16) as store:

        def writer(tid: int) -> None:
            for i in range(per_thread):
                prev = store.replace_status(URI, status(version=f"{tid}-{i}"), float(i))
                with lock:
                    seen_previous.append(None if prev is None else prev.version)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        final = store.get_status(URI)
        assert final is not None and final.status is not None
        written = {f"{t}-{i}" for t in range(threads_n) for i in range(per_thread)}
        assert seen_previous.count(None) == 1
        previous = [v for v in seen_previous if v is not None]
        assert len(previous) == len(set(previous)) == len(written) - 1
        assert set(previous) | {final.status.version} == written
        assert store.stats().entries == 1


@pytest.mark.usefixtures("busy_switching")
def test_concurrent_mixed_operations_keep_counts_exact(db_path: Path) -> None:
    with MetadataStore(db_path, memory_entries=8) as store:

        def worker(tid: int) -> None:
            for i in range(100):
                key = f"s3://b/{(tid + i) % 10}"  # threads collide on keys
                store.put_status(key, status(size=i), float(i))
                store.put_listing(key, [status()], float(i))
                store.get_status(key)
                if i % 7 == 0:
                    store.invalidate(key)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        counted = store.stats()
    db = raw_db(db_path)
    try:
        keys = db.keys()
        on_disk = [k for k in keys if isinstance(k, bytes) and k[:1] in (b"S", b"L")]
    finally:
        db.close()
    assert counted.entries == len(on_disk)
    assert counted.statuses == sum(1 for k in on_disk if k[:1] == b"S")


def test_a_large_listing_is_served_from_memory_under_the_default_config(tmp_path: Path) -> None:
    """A hot ``ls`` of a 10k-entry directory must not decode the listing from RocksDB each time:
    the worker's default memory budget holds it (the old 4096-row budget did not)."""
    from depot.core.config import DepotConfig

    budget = DepotConfig().cache.metadata_memory_entries
    rows = [FileStatus(f"/d/f{i:05d}", i, 1.0) for i in range(10_000)]
    with MetadataStore(tmp_path / "meta", memory_entries=budget) as meta:
        for row in rows:  # a listing's statuses are recorded too, before the listing
            meta.put_status(f"s3://b/d/f{row.path[-5:]}", row, fetched_at=1.0)
        meta.put_listing("s3://b/d/", rows, fetched_at=1.0)
        listing = meta.get_listing("s3://b/d/")
        assert listing is not None and listing.entries == rows
        assert meta.stats().memory_entries == 10_001  # the listing and every status, decoded
