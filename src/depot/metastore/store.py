"""The worker's metadata cache: object status, directory listings and versions, in RocksDB.

It lives on local disk next to the page store so that a restarted worker still knows which
version of each object its pages belong to and can answer ``stat``/``ls`` without the UFS. Keys
are the objects' UFS URIs (``s3://b/models/x``), as the worker passes them. A small LRU of decoded
records sits in front of RocksDB for the hot path.

Everything here is a cache of the UFS: a damaged value is dropped and counted as a miss, and a
damaged database is recreated empty, rather than failing reads.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from rocksdict import Options, Rdict, WriteBatch

from depot.core.errors import DepotError
from depot.core.types import FileStatus
from depot.metastore.records import (
    FORMAT,
    CachedListing,
    CachedStatus,
    decode_listing,
    decode_status,
    encode_listing,
    encode_status,
)

log = logging.getLogger(__name__)

# Key families: one byte before the caller's key. Meta keys start with NUL and sort first.
_STATUS = b"S"
_LISTING = b"L"
_FAMILIES = (_STATUS, _LISTING)
_FORMAT_KEY = b"\x00format"
_FORMAT_VALUE = str(FORMAT).encode()
_DELETE_BATCH = 10_000

_Record = CachedStatus | CachedListing


@dataclass(frozen=True, slots=True)
class MetadataStoreStats:
    entries: int
    statuses: int
    listings: int
    hits: int
    misses: int
    corrupt: int
    memory_entries: int

    def to_dict(self) -> dict[str, int]:
        return {
            "entries": self.entries,
            "statuses": self.statuses,
            "listings": self.listings,
            "hits": self.hits,
            "misses": self.misses,
            "corrupt": self.corrupt,
            "memory_entries": self.memory_entries,
        }


def _options() -> Options:
    options = Options(raw_mode=True)  # bytes in, bytes out: rocksdict never unpickles
    options.create_if_missing(True)
    return options


def _encode_key(family: bytes, key: str) -> bytes:
    if not isinstance(key, str):
        raise TypeError(f"metadata keys are strings, not {type(key).__name__}")
    return family + key.encode("utf-8", "surrogatepass")


def _weight(record: _Record) -> int:
    return 1 + len(record.entries) if isinstance(record, CachedListing) else 1


class MetadataStore:
    """Status, listings and versions of UFS objects, persisted in RocksDB at ``path``.

    Safe to call from several threads: one lock orders every read and write, which also makes
    ``replace_status`` an atomic read-modify-write. Open on construction, ``close()`` when done.
    """

    def __init__(self, path: Path | str, *, memory_entries: int = 4096) -> None:
        if memory_entries < 0:
            raise ValueError("memory_entries must be >= 0")
        self._path = Path(path)
        self._lock = threading.Lock()
        self._memory: OrderedDict[bytes, _Record] = OrderedDict()
        self._memory_weight = 0
        self._memory_capacity = memory_entries
        self._hits = 0
        self._misses = 0
        self._corrupt = 0
        self.reset_on_open = False
        self._db: Rdict | None = self._open()
        self._counts = self._prepare()

    # -- lifecycle -------------------------------------------------------------------------

    def _open(self) -> Rdict:
        self._path.mkdir(parents=True, exist_ok=True)
        try:
            return Rdict(str(self._path), _options())
        except Exception as exc:  # rocksdict raises bare Exception carrying RocksDB's status
            if not str(exc).startswith("Corruption"):
                raise DepotError(f"cannot open metadata store ({exc})", str(self._path)) from None
            log.warning("metadata store at %s is corrupt (%s); starting empty", self._path, exc)
        Rdict.destroy(str(self._path), _options())
        self.reset_on_open = True
        try:
            return Rdict(str(self._path), _options())
        except Exception as exc:
            raise DepotError(f"cannot recreate metadata store ({exc})", str(self._path)) from None

    def _prepare(self) -> dict[bytes, int]:
        """Check the format marker (clearing a store of another format) and count entries."""
        db = self._require()
        if db.get(_FORMAT_KEY) != _FORMAT_VALUE:
            # An Rdict is not iterable itself; keys() is its iterator.
            stale = [key for key in db.keys() if isinstance(key, bytes)]  # noqa: SIM118
            if stale:
                log.warning("metadata store at %s has another format; clearing it", self._path)
                self._delete_keys(db, stale)
                self.reset_on_open = True
            db.put(_FORMAT_KEY, _FORMAT_VALUE)
        counts = dict.fromkeys(_FAMILIES, 0)
        for key in db.keys(from_key=_LISTING):
            family = key[:1] if isinstance(key, bytes) else b""
            if family in counts:
                counts[family] += 1
        return counts

    @property
    def path(self) -> Path:
        return self._path

    @property
    def closed(self) -> bool:
        return self._db is None

    def close(self) -> None:
        """Flush and release the database; further calls raise. Closing twice is harmless."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            self._memory.clear()
            self._memory_weight = 0

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _require(self) -> Rdict:
        if self._db is None:
            raise DepotError("metadata store is closed", str(self._path))
        return self._db

    # -- in-memory LRU (caller holds the lock) ---------------------------------------------

    def _remember(self, dbkey: bytes, record: _Record) -> None:
        self._forget(dbkey)
        weight = _weight(record)
        if weight > self._memory_capacity:
            return
        self._memory[dbkey] = record
        self._memory_weight += weight
        while self._memory_weight > self._memory_capacity:
            _, old = self._memory.popitem(last=False)
            self._memory_weight -= _weight(old)

    def _forget(self, dbkey: bytes) -> None:
        old = self._memory.pop(dbkey, None)
        if old is not None:
            self._memory_weight -= _weight(old)

    # -- records (caller holds the lock) ---------------------------------------------------

    def _load(self, dbkey: bytes) -> _Record | None:
        record = self._memory.get(dbkey)
        if record is not None:
            self._memory.move_to_end(dbkey)
            return record
        db = self._require()
        data = db.get(dbkey)
        if data is None:
            return None
        try:
            if dbkey[:1] == _STATUS:
                record = decode_status(bytes(data))
            else:
                record = decode_listing(bytes(data))
        except ValueError as exc:
            log.warning("dropping unreadable metadata for %r: %s", dbkey[1:], exc)
            self._corrupt += 1
            db.delete(dbkey)
            self._counts[dbkey[:1]] -= 1
            return None
        self._remember(dbkey, record)
        return record

    def _store(self, dbkey: bytes, value: bytes, record: _Record, existed: bool) -> None:
        db = self._require()
        db.put(dbkey, value)
        if not existed:
            self._counts[dbkey[:1]] += 1
        self._remember(dbkey, record)

    def _drop(self, dbkey: bytes) -> bool:
        db = self._require()
        self._forget(dbkey)
        if dbkey not in db:
            return False
        db.delete(dbkey)
        self._counts[dbkey[:1]] -= 1
        return True

    @staticmethod
    def _delete_keys(db: Rdict, keys: list[bytes]) -> None:
        batch = WriteBatch(raw_mode=True)
        for key in keys:
            batch.delete(key)
        db.write(batch)

    def _count(self, found: bool) -> None:
        if found:
            self._hits += 1
        else:
            self._misses += 1

    # -- status ----------------------------------------------------------------------------

    def get_status(self, key: str) -> CachedStatus | None:
        """The cached status of ``key`` (possibly a negative entry), or None if not cached."""
        dbkey = _encode_key(_STATUS, key)
        with self._lock:
            record = self._load(dbkey)
            self._count(record is not None)
        return record if isinstance(record, CachedStatus) else None

    def put_status(self, key: str, status: FileStatus | None, fetched_at: float) -> None:
        """Cache ``status`` of ``key`` as seen at ``fetched_at``; None records "does not exist"."""
        self.replace_status(key, status, fetched_at)

    def replace_status(
        self,
        key: str,
        status: FileStatus | None,
        fetched_at: float,
        *,
        keep_attributes: bool = False,
    ) -> FileStatus | None:
        """Cache ``status`` and return the status cached before (None if absent or negative).

        The worker compares ``version_tag`` of the two to drop the pages of a version that the
        UFS no longer holds. ``keep_attributes``: a status without attributes (one from a
        listing) keeps those cached for the same version, so a listing does not cost a later
        head of each object its attributes.
        """
        dbkey = _encode_key(_STATUS, key)
        with self._lock:
            previous = self._load(dbkey)
            old = previous.status if isinstance(previous, CachedStatus) else None
            if (
                keep_attributes
                and status is not None
                and status.attributes is None
                and old is not None
                and old.attributes is not None
                and old.version_tag == status.version_tag
            ):
                status = dataclasses.replace(status, attributes=old.attributes)
            value = encode_status(status, fetched_at)
            record = CachedStatus(status, float(fetched_at))
            self._store(dbkey, value, record, existed=previous is not None)
        return old

    def get_version(self, key: str) -> str | None:
        """The version tag of the cached status of ``key``, if a positive one is cached."""
        cached = self.get_status(key)
        if cached is None or cached.status is None:
            return None
        return cached.status.version_tag

    # -- listings --------------------------------------------------------------------------

    def get_listing(self, key: str) -> CachedListing | None:
        """The cached listing of directory ``key``, or None."""
        dbkey = _encode_key(_LISTING, key)
        with self._lock:
            record = self._load(dbkey)
            self._count(record is not None)
        if not isinstance(record, CachedListing):
            return None
        return CachedListing(list(record.entries), record.fetched_at)

    def put_listing(self, key: str, entries: Iterable[FileStatus], fetched_at: float) -> None:
        """Cache the listing of directory ``key`` as seen at ``fetched_at``."""
        rows = list(entries)
        dbkey = _encode_key(_LISTING, key)
        value = encode_listing(rows, fetched_at)
        record = CachedListing(rows, float(fetched_at))
        with self._lock:
            existed = dbkey in self._memory or dbkey in self._require()
            self._store(dbkey, value, record, existed)

    def statuses(self, prefix: str) -> list[tuple[str, FileStatus]]:
        """Every cached positive status whose key starts with ``prefix``, in key order.

        Read straight from the database (the LRU is neither consulted nor filled): this is for
        ``free``, which must find every version of a path this worker cached pages for.
        """
        start = _encode_key(_STATUS, prefix)
        out: list[tuple[str, FileStatus]] = []
        with self._lock:
            db = self._require()
            for dbkey in db.keys(from_key=start):
                if not isinstance(dbkey, bytes) or not dbkey.startswith(start):
                    break
                data = db.get(dbkey)
                if data is None:
                    continue
                try:
                    record = decode_status(bytes(data))
                except ValueError:
                    continue  # unreadable: _load drops it when it is next asked for
                if record.status is not None:
                    out.append((dbkey[1:].decode("utf-8", "surrogatepass"), record.status))
        return out

    # -- invalidation ----------------------------------------------------------------------

    def invalidate(self, key: str) -> bool:
        """Forget the status and the listing of ``key``; True if anything was cached."""
        with self._lock:
            removed = [self._drop(_encode_key(family, key)) for family in _FAMILIES]
        return any(removed)

    def invalidate_prefix(self, prefix: str) -> int:
        """Forget every status and listing whose key starts with ``prefix``; returns how many.

        The match is on characters: pass ``s3://b/models/`` to spare ``s3://b/models2``.
        """
        removed = 0
        with self._lock:
            db = self._require()
            for family in _FAMILIES:
                start = _encode_key(family, prefix)
                pending: list[bytes] = []
                for key in db.keys(from_key=start):
                    if not isinstance(key, bytes) or not key.startswith(start):
                        break
                    pending.append(key)
                    if len(pending) >= _DELETE_BATCH:
                        self._delete_keys(db, pending)
                        removed += len(pending)
                        self._counts[family] -= len(pending)
                        pending = []
                if pending:
                    self._delete_keys(db, pending)
                    removed += len(pending)
                    self._counts[family] -= len(pending)
                for dbkey in [k for k in self._memory if k.startswith(start)]:
                    self._forget(dbkey)
        return removed

    # -- numbers ---------------------------------------------------------------------------

    def stats(self) -> MetadataStoreStats:
        with self._lock:
            statuses = self._counts[_STATUS]
            listings = self._counts[_LISTING]
            return MetadataStoreStats(
                entries=statuses + listings,
                statuses=statuses,
                listings=listings,
                hits=self._hits,
                misses=self._misses,
                corrupt=self._corrupt,
                memory_entries=len(self._memory),
            )
