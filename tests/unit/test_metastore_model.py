"""The metadata store held against a plain dict, across reopens, by a Hypothesis state machine."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from depot.core.types import FileStatus
from depot.metastore import CachedListing, CachedStatus, MetadataStore

keys = st.sampled_from(
    [
        "s3://b/m",
        "s3://b/m/",
        "s3://b/m/a",
        "s3://b/m/a/b",
        "s3://b/m2",
        "gs://b/m",
        "s3://b/\u00e9",
    ]
)
prefixes = st.sampled_from(["", "s3://", "s3://b/m", "s3://b/m/", "s3://b/m/a", "gs://", "x"])
file_statuses = st.builds(
    FileStatus,
    path=st.sampled_from(["/m", "/m/a", "/d"]),
    size=st.integers(min_value=0, max_value=2**50),
    mtime=st.floats(min_value=0, max_value=2e9, allow_nan=False),
    is_dir=st.booleans(),
    etag=st.one_of(st.none(), st.text(st.characters(exclude_categories=()), max_size=8)),
    version=st.one_of(st.none(), st.text(max_size=8)),
)
times = st.floats(min_value=0, max_value=2e9, allow_nan=False)


class MetadataStoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="depot-meta-"))
        self.store = MetadataStore(self.dir / "meta", memory_entries=4)
        self.statuses: dict[str, CachedStatus] = {}
        self.listings: dict[str, CachedListing] = {}

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(key=keys, status=st.one_of(st.none(), file_statuses), when=times)
    def put_status(self, key: str, status: FileStatus | None, when: float) -> None:
        before = self.statuses.get(key)
        previous = self.store.replace_status(key, status, when)
        assert previous == (before.status if before else None)
        self.statuses[key] = CachedStatus(status, when)

    @rule(key=keys, entries=st.lists(file_statuses, max_size=6), when=times)
    def put_listing(self, key: str, entries: list[FileStatus], when: float) -> None:
        self.store.put_listing(key, entries, when)
        self.listings[key] = CachedListing(list(entries), when)

    @rule(key=keys)
    def invalidate(self, key: str) -> None:
        expected = key in self.statuses or key in self.listings
        assert self.store.invalidate(key) is expected
        self.statuses.pop(key, None)
        self.listings.pop(key, None)

    @rule(prefix=prefixes)
    def invalidate_prefix(self, prefix: str) -> None:
        doomed_s = [k for k in self.statuses if k.startswith(prefix)]
        doomed_l = [k for k in self.listings if k.startswith(prefix)]
        assert self.store.invalidate_prefix(prefix) == len(doomed_s) + len(doomed_l)
        for key in doomed_s:
            del self.statuses[key]
        for key in doomed_l:
            del self.listings[key]

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = MetadataStore(self.dir / "meta", memory_entries=4)

    @rule(key=keys)
    def read(self, key: str) -> None:
        assert self.store.get_status(key) == self.statuses.get(key)
        assert self.store.get_listing(key) == self.listings.get(key)
        cached = self.statuses.get(key)
        expected_version = cached.status.version_tag if cached and cached.status else None
        assert self.store.get_version(key) == expected_version

    @invariant()
    def counts_match(self) -> None:
        stats = self.store.stats()
        assert stats.statuses == len(self.statuses)
        assert stats.listings == len(self.listings)
        assert stats.memory_entries <= 4


MetadataStoreModel.TestCase.settings = settings(
    max_examples=25, stateful_step_count=20, deadline=None
)
TestMetadataStoreModel = MetadataStoreModel.TestCase
