"""The under-store (UFS) interface: the source of truth behind the cache.

Keys are relative to the store's root URI and use ``/`` separators with no leading slash.
Every implementation raises the typed errors of ``depot.core.errors`` (``NotFound``,
``PermissionDenied``, ``Throttled``, ``Unavailable``, ``StaleVersion``...), never library errors,
and runs ``depot.testing.ufs_contract``.

Semantics every backend shares (and the contract checks):

* Objects only: a "directory" is a prefix with keys under it. ``head`` of such a name raises
  ``NotFound``; ``list`` shows it as a common prefix ending in ``/``.
* ``get_range`` clips at the end of the object: a range starting at or past the end returns no
  bytes; a zero-length range still raises ``NotFound``/``StaleVersion`` as a longer one would.
  Negative or inverted ranges raise ``InvalidRange``. Bytes may come back as a ``memoryview``
  over the store's own buffer, not a copy.
* ``get_range_stream`` yields the same bytes as ``get_range`` in order, in non-empty chunks, as
  they arrive, with the same errors (raised before the first chunk where the store can tell:
  ``NotFound``, ``StaleVersion``...). With ``etag`` every chunk is of that version: a store
  never mixes bytes of two versions in one stream. The default yields the whole ``get_range``
  result as one chunk, so every backend streams; stores that can (obstore's) do it for real.
* ``list`` takes a plain string prefix (S3 semantics), returns entries in UTF-8 byte order, and
  its ``next_token`` is the name of the last entry returned; only ``/`` is a valid delimiter.
* ``ObjectInfo.mtime`` is in seconds since the epoch; ``etag`` is the store's, in quoted form,
  and can be passed back to ``get_range``.
* Attributes (content headers and user metadata): ``put``/``put_multipart`` take them, and
  ``head`` returns them (empty if none were given), on stores whose ``supports_attributes`` is
  true. Elsewhere they are ignored and ``head`` says None. Listings never carry them (object
  stores list none), so ``ObjectInfo.attributes`` of a listed object is None: "not known".
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, AsyncIterable
from dataclasses import dataclass, field

from depot.core.types import Attributes, FileStatus

# Anything exposing the buffer protocol: bytes, memoryview, obstore.Bytes.
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """Status of one object (or, with ``is_dir``, a common prefix) of an under store."""

    key: str
    size: int
    mtime: float
    etag: str | None = None
    version: str | None = None
    is_dir: bool = False
    attributes: Attributes | None = None


def file_status(path: str, info: ObjectInfo) -> FileStatus:
    """The namespace status of ``path`` from its under-store object (attributes included)."""
    return FileStatus(
        path=path,
        size=info.size,
        mtime=info.mtime,
        is_dir=info.is_dir,
        etag=info.etag,
        version=info.version,
        attributes=info.attributes,
    )


@dataclass(slots=True)
class ListPage:
    """One page of a listing: objects, common prefixes (with a delimiter) and a continuation."""

    objects: list[ObjectInfo] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    next_token: str | None = None


class UnderStore(abc.ABC):
    """A small async object-store interface that every backend implements."""

    #: The root URI this store was opened with, e.g. ``s3://bucket/prefix``.
    uri: str
    #: Whether ``put`` keeps attributes and ``head`` returns them (see the module doc).
    supports_attributes: bool = False

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo:
        """Status of the object ``key``; ``NotFound`` if there is none."""

    @abc.abstractmethod
    async def get_range(
        self, key: str, start: int, end: int, *, etag: str | None = None
    ) -> Buffer:
        """Bytes ``[start, end)`` of ``key`` (clipped at the end of the object).

        With ``etag``, raise ``StaleVersion`` instead of returning bytes of another version.
        """

    async def get_range_stream(
        self, key: str, start: int, end: int, *, etag: str | None = None
    ) -> AsyncGenerator[Buffer, None]:
        """Bytes ``[start, end)`` of ``key`` as they arrive: what ``get_range`` returns, in
        order, in non-empty chunks (see the module doc). The caller should read the stream to
        its end or close it (``aclose``), which releases the connection.

        This default yields the whole ``get_range`` result at once.
        """
        data = await self.get_range(key, start, end, etag=etag)
        if memoryview(data).nbytes:
            yield data

    @abc.abstractmethod
    async def get(self, key: str) -> Buffer:
        """The whole object."""

    @abc.abstractmethod
    async def list(
        self,
        prefix: str = "",
        *,
        delimiter: str | None = "/",
        token: str | None = None,
        limit: int = 1000,
    ) -> ListPage:
        """Objects under ``prefix``; with ``delimiter``, one level plus common prefixes.

        Prefixes end with the delimiter. Pass ``next_token`` back to get the next page.
        """

    @abc.abstractmethod
    async def put(
        self, key: str, data: Buffer, *, attributes: Attributes | None = None
    ) -> ObjectInfo:
        """Write a whole object, replacing any previous one (and its attributes)."""

    @abc.abstractmethod
    async def put_multipart(
        self,
        key: str,
        chunks: AsyncIterable[Buffer],
        *,
        part_size: int = 8 * 1024 * 1024,
        attributes: Attributes | None = None,
    ) -> ObjectInfo:
        """Write an object from a stream of chunks without holding it all in memory."""

    def check_attributes(self, key: str, attributes: Attributes) -> None:  # noqa: B027
        """Raise ``InvalidArgument`` if ``put`` could not keep ``attributes``: a write-back write
        is checked before it is acknowledged, not when its upload fails."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
