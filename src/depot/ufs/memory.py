"""``memory://NAME[/PREFIX]``: a pure-Python in-memory under store for tests.

Stores opened with the same NAME in one process share their objects (like two clients of one
bucket), so a test can write through one handle and read through the worker's own. ETags are
the MD5 of the content (what S3 reports for a single-part upload) or, with ``etag=counter``, a
generation number that changes on every write even when the bytes do not. ``versioning=true``
also assigns a version id to every write. Attributes are kept and returned by ``head`` (not by
``list``, as on real object stores).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import time
from collections.abc import AsyncIterable, Callable, Mapping
from dataclasses import dataclass

from depot.core.errors import ConfigError, NotFound, StaleVersion
from depot.core.types import Attributes
from depot.ufs.base import Buffer, ListPage, ObjectInfo, UnderStore
from depot.ufs.keys import (
    check_key,
    check_list_args,
    check_prefix,
    check_range,
    collapse,
    join_key,
    page_from_sorted,
    sort_entries,
)

ETAG_MODES = ("md5", "counter")


@dataclass(frozen=True, slots=True)
class _Object:
    data: bytes
    mtime: float
    etag: str
    version: str | None
    attributes: Attributes


class MemoryBucket:
    """The shared state behind every ``memory://NAME`` handle: objects and sorted keys."""

    def __init__(
        self,
        *,
        etag_mode: str = "md5",
        versioning: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if etag_mode not in ETAG_MODES:
            raise ConfigError(f"memory store etag must be one of {ETAG_MODES}, not {etag_mode!r}")
        self.etag_mode = etag_mode
        self.versioning = versioning
        self.clock = clock
        self.objects: dict[str, _Object] = {}
        self.keys: list[str] = []  # sorted, for ordered listings without a sort per call
        self.generation = 0

    def store(self, key: str, data: bytes, attributes: Attributes | None = None) -> _Object:
        self.generation += 1
        if self.etag_mode == "md5":
            etag = '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'
        else:
            etag = f'"{self.generation}"'
        version = str(self.generation) if self.versioning else None
        obj = _Object(
            data, self.clock(), etag, version, attributes if attributes is not None else Attributes()
        )
        if key not in self.objects:
            bisect.insort(self.keys, key)
        self.objects[key] = obj
        return obj

    def remove(self, key: str) -> None:
        if self.objects.pop(key, None) is not None:
            del self.keys[bisect.bisect_left(self.keys, key)]


_BUCKETS: dict[str, MemoryBucket] = {}


def memory_bucket(name: str, options: Mapping[str, str] | None = None) -> MemoryBucket:
    """The process-wide bucket NAME, created on first use with ``options``."""
    opts = dict(options or {})
    etag_mode = opts.pop("etag", "md5")
    versioning_text = opts.pop("versioning", "false").lower()
    if opts:
        raise ConfigError(
            f"unknown option {sorted(opts)[0]!r} for memory:// (known: etag, versioning)"
        )
    if versioning_text not in ("true", "false"):
        raise ConfigError(f"option 'versioning' must be true or false, not {versioning_text!r}")
    bucket = _BUCKETS.get(name)
    if bucket is None:
        bucket = MemoryBucket(etag_mode=etag_mode, versioning=versioning_text == "true")
        _BUCKETS[name] = bucket
    return bucket


def drop_memory_bucket(name: str) -> None:
    """Forget bucket NAME (tests call this to start from an empty store)."""
    _BUCKETS.pop(name, None)


class MemoryUnderStore(UnderStore):
    """An ``UnderStore`` over a ``MemoryBucket``, optionally below a key prefix."""

    supports_attributes = True

    def __init__(
        self, bucket: MemoryBucket | None = None, *, prefix: str = "", uri: str = "memory://"
    ) -> None:
        self.bucket = bucket if bucket is not None else MemoryBucket()
        self.root = prefix.strip("/")
        self.uri = uri

    def _full(self, key: str) -> str:
        return join_key(self.root, check_key(key))

    def _info(self, key: str, obj: _Object, *, attributes: bool = True) -> ObjectInfo:
        return ObjectInfo(
            key, len(obj.data), obj.mtime, obj.etag, obj.version,
            attributes=obj.attributes if attributes else None,
        )

    def _get(self, key: str) -> _Object:
        obj = self.bucket.objects.get(self._full(key))
        if obj is None:
            raise NotFound("no such object", key)
        return obj

    async def head(self, key: str) -> ObjectInfo:
        return self._info(key, self._get(key))

    async def get_range(self, key: str, start: int, end: int, *, etag: str | None = None) -> Buffer:
        check_range(start, end)
        obj = self._get(key)
        if etag is not None and etag != obj.etag:
            raise StaleVersion(f"object changed: etag {obj.etag} is not {etag}", key)
        return memoryview(obj.data)[start:end]

    async def get(self, key: str) -> Buffer:
        return memoryview(self._get(key).data)

    async def list(
        self,
        prefix: str = "",
        *,
        delimiter: str | None = "/",
        token: str | None = None,
        limit: int = 1000,
    ) -> ListPage:
        check_prefix(prefix)
        check_list_args(delimiter, limit)
        keys = self.bucket.keys
        base = join_key(self.root, "") if self.root else ""
        lo = bisect.bisect_left(keys, base + prefix)
        if token is not None:
            after = base + token
            if delimiter is not None and token.endswith(delimiter):
                # Everything under a common prefix already returned is skipped at once.
                after = after[:-1] + chr(ord(delimiter) + 1)
                lo = max(lo, bisect.bisect_left(keys, after))
            else:
                lo = max(lo, bisect.bisect_right(keys, after))
        cut = len(base)

        def infos() -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            for full in keys[lo:]:
                if not full.startswith(base + prefix):
                    break
                rel = full[cut:]
                out.append(self._info(rel, self.bucket.objects[full], attributes=False))
                # Without a delimiter one extra entry is enough to know there is a next page.
                if delimiter is None and len(out) > limit:
                    break
            return out

        entries = sort_entries(collapse(infos(), prefix, delimiter))
        if token is not None:
            entries = [e for e in entries if (e if isinstance(e, str) else e.key) > token]
        return page_from_sorted(entries, start=0, limit=limit)

    async def put(
        self, key: str, data: Buffer, *, attributes: Attributes | None = None
    ) -> ObjectInfo:
        full = self._full(key)
        return self._info(key, self.bucket.store(full, bytes(data), attributes))

    async def put_multipart(
        self,
        key: str,
        chunks: AsyncIterable[Buffer],
        *,
        part_size: int = 8 * 1024 * 1024,
        attributes: Attributes | None = None,
    ) -> ObjectInfo:
        full = self._full(key)
        parts = bytearray()
        async for chunk in chunks:
            parts += chunk
            await asyncio.sleep(0)
        # The object appears only once every part arrived, as with a completed multipart upload.
        return self._info(key, self.bucket.store(full, bytes(parts), attributes))

    async def delete(self, key: str) -> None:
        self.bucket.remove(self._full(key))
