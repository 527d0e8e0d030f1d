"""Consistent-hash ring, compatible with Alluxio 3.x's DEFAULT hash provider.

Why Alluxio's ring: clients, tools and operators written for Alluxio's placement carry over, and
the algorithm is simple and proven. The facts (``compat/alluxio-ring/README.md``, checked against
Alluxio's ``ConsistentHashProvider``):

* hash = MurmurHash3 x86 32-bit, seed 0, read as a signed int32 (Guava ``murmur3_32_fixed``);
* point ``i`` of a worker = hash(identifier (16 bytes) ‖ int32_le(version) ‖ int32_le(i)),
  ``i`` in ``[0, virtual_nodes)``;
* ``lookup(key, count)``: for attempt = 1 … 100, h = hash(utf8(key) ‖ int32_le(attempt)); the
  worker of the first point ≥ h (wrapping to the smallest) is appended unless already chosen;
  stop at ``count`` workers.

Two rules Alluxio leaves open, fixed here so that every depot process computes the same ring from
the same *set* of workers, whatever order membership hands them over in:

* **Point collisions.** Alluxio builds a Java ``TreeMap`` by iterating its worker set and calling
  ``put`` for every point, so the *last* worker put on a shared point owns it: the winner depends on
  the iteration order of a Java set, which is not a function of the members. depot iterates the
  workers in ascending ``(identifier, version)`` order with the same last-put-wins rule, so the
  **greatest identity owns a shared point**. With 100 workers x 2000 points about five collisions
  are expected (each owning ~1/200,000 of the key space); the test vectors have none.
* **Short results.** Alluxio gives up after 100 attempts even when fewer than ``count`` distinct
  workers were found. depot returns exactly ``min(count, number of workers)`` workers: when the 100
  attempts are not enough, the rest come from walking the ring clockwise from the point of attempt 1.
  The first workers of a result are always Alluxio's, and ``lookup(k, m)`` is a prefix of
  ``lookup(k, n)`` for ``m <= n``, so a failover list extends the primary list.

Everything here is pure and immutable: no I/O and nothing global.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import mmh3

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_SEGMENT_SIZE",
    "DEFAULT_VIRTUAL_NODES",
    "HashRing",
    "PlacementPolicy",
    "WorkerIdentity",
    "murmur3_32",
    "placement_key",
]

T = TypeVar("T")

DEFAULT_VIRTUAL_NODES = 2000
"""Alluxio's server default (its Python clients use 5, which balances poorly)."""

DEFAULT_MAX_ATTEMPTS = 100
"""Alluxio's default number of rehash attempts per lookup."""

DEFAULT_SEGMENT_SIZE = 256 * 1024 * 1024
"""Bytes per placement segment: 64 pages of 4 MiB."""

IDENTIFIER_BYTES = 16
_INT32 = struct.Struct("<i")
_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1


def murmur3_32(data: bytes) -> int:
    """MurmurHash3 x86 32-bit, seed 0, as a signed int32: the ring's only hash function.

    Takes bytes, never ``str``: mmh3 (5.3) crashes the interpreter on a ``str`` holding a lone
    surrogate, and Alluxio hashes the UTF-8 bytes anyway.
    """
    return mmh3.hash(data, 0, True)


def _utf8(key: str) -> bytes:
    """UTF-8 as Java's ``String.getBytes(UTF_8)`` (Guava ``putString``): a lone surrogate is ``?``."""
    return key.encode("utf-8", "replace")


# identity -----------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True, slots=True)
class WorkerIdentity:
    """A worker's position on the ring: 16 opaque bytes and a version (Alluxio's WorkerIdentity).

    The identity, not the address, places data, so a worker that restarts with another IP keeps its
    ring position and its cache. It is persisted in the worker's cache dir (``random()`` at first
    start) or derived from the host name (``from_host``) where the host name is stable.
    Ordering is by ``(identifier, version)``; it decides point collisions (the greatest wins).
    """

    identifier: bytes
    version: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.identifier, bytes) or len(self.identifier) != IDENTIFIER_BYTES:
            raise ValueError(f"a worker identifier is {IDENTIFIER_BYTES} bytes, got {self.identifier!r}")
        if not _INT32_MIN <= self.version <= _INT32_MAX:
            raise ValueError(f"a worker identity version is an int32, got {self.version}")

    @property
    def hex(self) -> str:
        """The identifier as 32 lowercase hex digits (Alluxio's JSON ``identifier``)."""
        return self.identifier.hex()

    @property
    def uuid(self) -> uuid.UUID:
        """The identifier read as a UUID, as Alluxio's logs and tools show it."""
        return uuid.UUID(bytes=self.identifier)

    @classmethod
    def from_hex(cls, text: str, version: int = 1) -> WorkerIdentity:
        """From 32 hex digits; dashes are ignored so UUID text is accepted too."""
        digits = text.strip().replace("-", "")
        if len(digits) != 2 * IDENTIFIER_BYTES:
            raise ValueError(f"a worker identifier is {2 * IDENTIFIER_BYTES} hex digits, got {text!r}")
        return cls(bytes.fromhex(digits), version)

    @classmethod
    def from_host(cls, hostname: str) -> WorkerIdentity:
        """The identity Alluxio derives from a host name: a version-3 UUID of the name alone.

        That is Java's ``UUID.nameUUIDFromBytes(utf8(hostname))``: MD5 of the name, version and
        variant bits set; the "empty namespace" contributes no bytes. Python's ``uuid.uuid3`` cannot
        express it (its namespace is always 16 bytes, and a zero UUID gives other identities).
        """
        digest = hashlib.md5(_utf8(hostname), usedforsecurity=False).digest()
        return cls(uuid.UUID(bytes=digest, version=3).bytes, 1)

    @classmethod
    def random(cls) -> WorkerIdentity:
        """A fresh identity (uuid4 bytes), for a worker's first start."""
        return cls(uuid.uuid4().bytes, 1)

    def __str__(self) -> str:
        """Stable text for JSON, etcd keys and logs: the hex for version 1, ``vN:hex`` otherwise."""
        return self.hex if self.version == 1 else f"v{self.version}:{self.hex}"

    @classmethod
    def parse(cls, text: str) -> WorkerIdentity:
        """Inverse of ``str()``."""
        if text.startswith("v") and ":" in text:
            version, _, digits = text[1:].partition(":")
            return cls.from_hex(digits, int(version))
        return cls.from_hex(text)

    def to_json(self) -> dict[str, Any]:
        """Alluxio's JSON form: ``{"version": 1, "identifier": "<hex>"}``."""
        return {"version": self.version, "identifier": self.hex}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> WorkerIdentity:
        """Inverse of ``to_json`` (reads Alluxio's test vectors as they are)."""
        return cls.from_hex(str(obj["identifier"]), int(obj.get("version", 1)))

    def ring_points(self, virtual_nodes: int) -> list[int]:
        """This worker's points, in virtual-node order (before any collision is resolved)."""
        prefix = self.identifier + _INT32.pack(self.version)
        return [murmur3_32(prefix + _INT32.pack(i)) for i in range(virtual_nodes)]


# ring ---------------------------------------------------------------------------------------------


class HashRing(Generic[T]):
    """An immutable ring over workers, each carrying a value of type ``T`` (address, client, ...).

    Built once per membership change (O(workers * virtual_nodes)); lookups are a few hashes and
    bisections over a sorted int32 array. Use ``with_worker`` / ``without_worker`` to derive the
    ring of the next membership. An empty ring is allowed: every lookup returns ``[]`` (the caller
    reads the under store directly).
    """

    __slots__ = (
        "_attempt_suffixes",
        "_identities",
        "_owner_count",
        "_owners",
        "_points",
        "_values",
        "_virtual_nodes",
        "_workers",
    )

    def __init__(
        self,
        workers: Mapping[WorkerIdentity, T],
        virtual_nodes: int = DEFAULT_VIRTUAL_NODES,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        if virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be >= 1, got {virtual_nodes}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        # Ascending identity order + last put wins = the collision rule (module docstring).
        identities = tuple(sorted(workers))
        self._workers: dict[WorkerIdentity, T] = {ident: workers[ident] for ident in identities}
        self._identities = identities
        self._values: tuple[T, ...] = tuple(workers[ident] for ident in identities)
        self._virtual_nodes = virtual_nodes
        self._attempt_suffixes = tuple(_INT32.pack(a) for a in range(1, max_attempts + 1))
        table: dict[int, int] = {}
        vnode_suffixes = [_INT32.pack(i) for i in range(virtual_nodes)]
        hash32 = mmh3.hash
        for index, ident in enumerate(identities):
            prefix = ident.identifier + _INT32.pack(ident.version)
            for suffix in vnode_suffixes:
                table[hash32(prefix + suffix, 0, True)] = index
        # An int32 array rather than a list of ints: compact, and the bisection touches contiguous
        # memory instead of int objects scattered over the heap (about 30% faster on 200k points).
        self._points = array("i", sorted(table))
        self._owners: list[int] = [table[p] for p in self._points]
        # Workers that own at least one point; one that lost every point to collisions gets no key.
        self._owner_count = len(set(self._owners))

    @classmethod
    def from_identities(
        cls,
        identities: Iterable[WorkerIdentity],
        virtual_nodes: int = DEFAULT_VIRTUAL_NODES,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> HashRing[WorkerIdentity]:
        """A ring whose values are the identities themselves (duplicates count once)."""
        return HashRing({ident: ident for ident in identities}, virtual_nodes, max_attempts)

    # facts ----------------------------------------------------------------------------------------

    @property
    def virtual_nodes(self) -> int:
        return self._virtual_nodes

    @property
    def max_attempts(self) -> int:
        return len(self._attempt_suffixes)

    @property
    def identities(self) -> tuple[WorkerIdentity, ...]:
        """The workers, in ascending identity order."""
        return self._identities

    @property
    def workers(self) -> Mapping[WorkerIdentity, T]:
        """A copy of identity -> value."""
        return dict(self._workers)

    def __len__(self) -> int:
        return len(self._identities)

    def __contains__(self, identity: object) -> bool:
        return identity in self._workers

    def __iter__(self) -> Iterator[WorkerIdentity]:
        return iter(self._identities)

    def __getitem__(self, identity: WorkerIdentity) -> T:
        return self._workers[identity]

    def __repr__(self) -> str:
        return (
            f"HashRing(workers={len(self._identities)}, virtual_nodes={self._virtual_nodes}, "
            f"points={len(self._points)})"
        )

    def points(self) -> list[tuple[int, WorkerIdentity]]:
        """(point, owner) in ascending point order: Alluxio's ``activeNodesMap`` (for tests, tools)."""
        ids = self._identities
        return [(p, ids[o]) for p, o in zip(self._points, self._owners, strict=True)]

    # derived rings --------------------------------------------------------------------------------

    def with_worker(self, identity: WorkerIdentity, value: T) -> HashRing[T]:
        """The ring after ``identity`` joins (or changes its value)."""
        return HashRing({**self._workers, identity: value}, self._virtual_nodes, self.max_attempts)

    def without_worker(self, identity: WorkerIdentity) -> HashRing[T]:
        """The ring after ``identity`` leaves; a missing identity leaves the ring as it is."""
        rest = {k: v for k, v in self._workers.items() if k != identity}
        return HashRing(rest, self._virtual_nodes, self.max_attempts)

    # lookups --------------------------------------------------------------------------------------

    def lookup(self, key: str, count: int = 1) -> list[T]:
        """The first ``count`` distinct workers for ``key``, in preference order.

        Returns ``min(count, len(self))`` workers (less only if a worker lost every one of its
        points to collisions, which takes a ring with almost no virtual nodes); the order is
        Alluxio's ``getMultiple``.
        """
        if count == 1 and self._points:  # the common case, inlined: one hash, one bisection
            points = self._points
            i = bisect_left(points, mmh3.hash(_utf8(key) + self._attempt_suffixes[0], 0, True))
            return [self._values[self._owners[i if i < len(points) else 0]]]
        values = self._values
        return [values[i] for i in self._indices(key, count)]

    def lookup_identities(self, key: str, count: int = 1) -> list[WorkerIdentity]:
        """``lookup`` returning the identities rather than the values."""
        ids = self._identities
        return [ids[i] for i in self._indices(key, count)]

    def primary(self, key: str) -> T:
        """The first worker for ``key``; ``LookupError`` on an empty ring."""
        found = self._indices(key, 1)
        if not found:
            raise LookupError("the ring has no workers")
        return self._values[found[0]]

    def _indices(self, key: str, count: int) -> list[int]:
        """Indices (into the identity order) of the chosen workers; the hot path of every read."""
        points = self._points
        if count <= 0 or not points:
            return []
        want = min(count, self._owner_count)
        owners = self._owners
        n = len(points)
        data = _utf8(key)
        hash32 = mmh3.hash
        suffixes = self._attempt_suffixes
        if want == 1:
            i = bisect_left(points, hash32(data + suffixes[0], 0, True))
            return [owners[i if i < n else 0]]
        chosen: list[int] = []
        first = -1
        for suffix in suffixes:
            i = bisect_left(points, hash32(data + suffix, 0, True))
            if i == n:
                i = 0
            if first < 0:
                first = i
            owner = owners[i]
            if owner not in chosen:
                chosen.append(owner)
                if len(chosen) == want:
                    return chosen
        # Not enough distinct workers in max_attempts: walk the ring from attempt 1's point.
        seen = set(chosen)
        i = first
        while len(chosen) < want:
            i = i + 1 if i + 1 < n else 0
            owner = owners[i]
            if owner not in seen:
                seen.add(owner)
                chosen.append(owner)
        return chosen


# placement keys -----------------------------------------------------------------------------------


def placement_key(file_key: str, offset: int, segment_size: int) -> str:
    """The ring key for the byte at ``offset`` of a file.

    Segment 0 (and every byte when ``segment_size == 0``) is keyed by the file key alone, so a file
    of up to one segment lives on one worker and is placed exactly as Alluxio places the file.
    Segment ``k >= 1`` is keyed ``f"{file_key}#{k}"`` (decimal ``k``), so a large file spreads
    over the ring instead of one worker's disk and NIC. Keying segment 0 by the file (not ``#0``)
    makes the key independent of the file's size: a reader needs no ``stat`` to route its first
    bytes, and a file that grows keeps its first segment where it was.

    A placement key only chooses workers; it never names cached data (pages are keyed by file
    identity and version), so a file named ``a#1`` sharing workers with segment 1 of ``a`` is harmless.
    """
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if segment_size < 0:
        raise ValueError(f"segment_size must be >= 0, got {segment_size}")
    if segment_size == 0 or offset < segment_size:
        return file_key
    return f"{file_key}#{offset // segment_size}"


@dataclass(frozen=True, slots=True)
class PlacementPolicy:
    """How files map to workers: segment size, replication and ring density, in one value.

    ``replication=R`` lets readers spread a very hot key over its first R workers;
    ``candidates`` extends that list in the same order for failover.
    """

    segment_size: int = DEFAULT_SEGMENT_SIZE
    replication: int = 1
    virtual_nodes: int = DEFAULT_VIRTUAL_NODES

    def __post_init__(self) -> None:
        if self.segment_size < 0:
            raise ValueError(f"segment_size must be >= 0 (0: whole files), got {self.segment_size}")
        if self.replication < 1:
            raise ValueError(f"replication must be >= 1, got {self.replication}")
        if self.virtual_nodes < 1:
            raise ValueError(f"virtual_nodes must be >= 1, got {self.virtual_nodes}")

    def ring(self, workers: Mapping[WorkerIdentity, T]) -> HashRing[T]:
        """A ring over ``workers`` with this policy's density."""
        return HashRing(workers, self.virtual_nodes)

    def key_for(self, file_key: str, offset: int) -> str:
        """The ring key for the byte at ``offset`` (see ``placement_key``)."""
        return placement_key(file_key, offset, self.segment_size)

    def segment_count(self, file_size: int) -> int:
        """Number of placement segments of a file (1 for an empty file or whole-file placement)."""
        if file_size < 0:
            raise ValueError(f"file_size must be >= 0, got {file_size}")
        if self.segment_size == 0 or file_size <= self.segment_size:
            return 1
        return -(-file_size // self.segment_size)

    def segment_keys(self, file_key: str, file_size: int) -> list[str]:
        """Every ring key of a file, segment by segment (what a ``load`` job routes)."""
        count = self.segment_count(file_size)
        return [file_key] + [f"{file_key}#{k}" for k in range(1, count)]

    def workers_for(self, ring: HashRing[T], file_key: str, offset: int) -> list[T]:
        """The first ``replication`` workers of the key: any of them may serve the read."""
        return ring.lookup(self.key_for(file_key, offset), self.replication)

    def candidates(
        self, ring: HashRing[T], file_key: str, offset: int, count: int | None = None
    ) -> list[T]:
        """Failover order for the key: ``workers_for`` first, then the next workers on the ring.

        ``count=None`` means every worker of the ring.
        """
        n = len(ring) if count is None else count
        return ring.lookup(self.key_for(file_key, offset), n)
