"""Under stores on obstore: S3 and S3-compatible, GCS, Azure Blob and local directories.

obstore (Rust ``object_store``) does the HTTP, signing and multipart work off the Python thread;
this class only adapts it to ``UnderStore``: string prefixes, paged listings, clipped and
zero-length ranges, ETag-pinned reads and typed errors. Bytes come back as a ``memoryview`` over
obstore's own buffer, so a range is never copied on its way to the page store.

Store-specific behaviour worth knowing:

* Local directories (``LocalStore``): the ETag is ``"<inode>-<mtime µs>-<size>"`` (hex). Writes
  through depot replace the file (temp file + rename), so each gets a new inode and ETag. A file
  rewritten in place by another program keeps its inode; its change is seen only if its size or
  mtime changes, so two same-size rewrites within one mtime tick (a few ms on Linux) look alike.
  ``get_range(etag=...)`` checks the ETag on the open file handle and then reads from it, so a
  concurrent rename never mixes versions; an in-place rewrite during the read can.
  ``head()`` on a directory raises ``NotFound``: directories are prefixes, see ``list()``.
* Azure reports ETags quoted from HEAD and bare from LIST; ETags are normalised to the quoted
  form so that any ``ObjectInfo.etag`` can be passed back to ``get_range``.
* S3 "directory marker" objects (``dir/``, zero bytes) are reported by ``object_store`` as an
  object named ``dir``; they appear as such in recursive listings.
* Attributes (content headers, user metadata) are kept by S3, GCS and Azure; ``head`` then asks
  with a GET-with-HEAD (one request, like ``head_async``), which also returns them. The local
  directory store keeps none (``object_store`` refuses them, and depot adds no sidecar files), so
  there they are dropped. ``object_store`` reads a metadata name that is a content header's
  (``x-amz-meta-content-type``) as that header: such names are refused (``InvalidArgument``), as
  are, on Azure, names that are not C identifiers (Azure's rule: no ``-``).
* ``get_range_stream`` is one GET whose body is handed on in chunks of at least
  ``stream_chunk_size`` bytes (256 KiB) as it arrives, pinned with ``If-Match`` like
  ``get_range``: the store answers with one version or refuses before the first byte. A local
  directory does not stream (``object_store`` reads a file stream 8 KiB per blocking call, ~20x
  slower than one read); it answers with the whole range at once, as fast as a disk does.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Mapping
from typing import TYPE_CHECKING

import obstore as obs
from obstore.store import LocalStore

from depot.core.errors import InvalidArgument, InvalidRange, NotFound, StaleVersion
from depot.core.types import CONTENT_HEADERS, Attributes
from depot.ufs.base import Buffer, ListPage, ObjectInfo, UnderStore
from depot.ufs.errors import map_error
from depot.ufs.keys import (
    ListingSnapshots,
    check_key,
    check_list_args,
    check_prefix,
    check_range,
    page_from_sorted,
    paginate,
    split_prefix,
)

if TYPE_CHECKING:
    from obstore import GetOptions, ObjectMeta
    from obstore.store import ObjectStore

_EMPTY = memoryview(b"")
_LIST_CHUNK = 1000
#: Smallest chunk of a streamed range (the last excepted): the first one arrives after this
#: many bytes (~5 ms at 50 MB/s), and a 4 MiB page costs 16 hand-offs, not one per socket read.
STREAM_CHUNK = 256 * 1024


def normalize_etag(etag: str | None) -> str | None:
    """ETags in their quoted HTTP form, whichever call reported them."""
    if not etag:
        return None
    if etag.startswith('"') or etag.startswith('W/"'):
        return etag
    return f'"{etag}"'


def info_from_meta(meta: ObjectMeta, attributes: Attributes | None = None) -> ObjectInfo:
    return ObjectInfo(
        key=meta["path"],
        size=int(meta["size"]),
        mtime=meta["last_modified"].timestamp(),
        etag=normalize_etag(meta.get("e_tag")),
        version=meta.get("version") or None,
        attributes=attributes,
    )


# Names object_store takes as its own attributes, whatever their case.
_RESERVED = frozenset(name.lower() for name in (*CONTENT_HEADERS, "Storage-Class"))


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def to_obstore(
    attributes: Attributes, key: str, *, identifiers: bool = False
) -> dict[str, str]:
    """obstore's flat attribute map: content headers by name, any other name user metadata.
    ``identifiers``: metadata names must be C identifiers (Azure's rule)."""
    out = dict(attributes.headers)
    for name, value in attributes.metadata:
        if name in _RESERVED:
            raise InvalidArgument(
                f"user metadata named {name!r} cannot be stored (it is a content header's name)",
                key,
            )
        if identifiers and not _IDENTIFIER.match(name):
            raise InvalidArgument(
                f"user metadata named {name!r} cannot be stored: this store takes names of "
                "letters, digits and '_' only",
                key,
            )
        out[name] = value
    return out


def from_obstore(raw: Mapping[str, str]) -> Attributes:
    headers: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for name, value in raw.items():
        lowered = name.lower()
        if lowered == "storage-class":
            continue
        if lowered in _RESERVED:
            headers[name] = value
        else:
            metadata[name] = value
    return Attributes.of(headers, metadata)


class ObstoreUnderStore(UnderStore):
    """``UnderStore`` over any obstore ``ObjectStore``.

    ``ordered_listing`` says whether the store lists keys in byte order (every cloud store does;
    a local directory walk does not): ordered listings are streamed and cut after one page,
    unordered ones are read whole, sorted and served page by page from a snapshot.
    ``min_part_size`` is the smallest multipart part the service accepts (5 MiB on S3).
    ``upload_store`` (default: ``store``) serves ``put_multipart``: it may be configured with
    obstore's own retries, which can resend one part where a caller could only restart a stream.
    ``supports_attributes``: false for stores that keep no attributes (local directories);
    ``identifier_metadata``: metadata names must be C identifiers (Azure).
    ``stream_chunk_size``: smallest chunk ``get_range_stream`` hands on; 0 turns streaming off
    (the whole range at once). Default: ``STREAM_CHUNK``, or 0 for a local directory.
    """

    def __init__(
        self,
        store: ObjectStore,
        uri: str,
        *,
        ordered_listing: bool = True,
        min_part_size: int = 0,
        upload_store: ObjectStore | None = None,
        supports_attributes: bool = True,
        identifier_metadata: bool = False,
        stream_chunk_size: int | None = None,
    ) -> None:
        self.store = store
        if stream_chunk_size is None:
            stream_chunk_size = 0 if isinstance(store, LocalStore) else STREAM_CHUNK
        self.stream_chunk_size = max(0, stream_chunk_size)
        self.supports_attributes = supports_attributes
        self.identifier_metadata = identifier_metadata
        self.upload_store = upload_store if upload_store is not None else store
        self.uri = uri
        self.ordered_listing = ordered_listing
        self.min_part_size = min_part_size
        self._snapshots = ListingSnapshots()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    async def head(self, key: str) -> ObjectInfo:
        check_key(key)
        try:
            if self.supports_attributes:
                result = await obs.get_async(self.store, key, options={"head": True})
                return info_from_meta(result.meta, from_obstore(result.attributes))
            meta = await obs.head_async(self.store, key)
        except Exception as exc:
            raise map_error(exc, key) from exc
        return info_from_meta(meta)

    def _attributes(self, attributes: Attributes | None, key: str) -> dict[str, str] | None:
        if attributes is None or not self.supports_attributes:
            return None
        return to_obstore(attributes, key, identifiers=self.identifier_metadata)

    def check_attributes(self, key: str, attributes: Attributes) -> None:
        self._attributes(attributes, key)

    async def get_range(self, key: str, start: int, end: int, *, etag: str | None = None) -> Buffer:
        check_key(key)
        check_range(start, end)
        if start == end:
            # No store serves an empty range; existence and version still have to be checked.
            self._check_etag(await self.head(key), etag)
            return _EMPTY
        try:
            if etag is None:
                data = await obs.get_range_async(self.store, key, start=start, end=end)
            else:
                result = await obs.get_async(
                    self.store,
                    key,
                    options={"range": (start, end), "if_match": normalize_etag(etag)},
                )
                data = await result.bytes_async()
        except Exception as exc:
            err = map_error(exc, key)
            if isinstance(err, StaleVersion):
                # Some stores answer If-Match on a deleted object with 412: gone is NotFound.
                await self.head(key)
            elif isinstance(err, InvalidRange):
                # Past the end (or any range of an empty object): clipped to nothing.
                info = await self.head(key)
                self._check_etag(info, etag)
                if start >= info.size:
                    return _EMPTY
            raise err from exc
        return memoryview(data)

    async def get_range_stream(
        self, key: str, start: int, end: int, *, etag: str | None = None
    ) -> AsyncGenerator[Buffer, None]:
        if not self.stream_chunk_size:
            async for whole in super().get_range_stream(key, start, end, etag=etag):
                yield whole
            return
        check_key(key)
        check_range(start, end)
        if start == end:
            self._check_etag(await self.head(key), etag)
            return
        options: GetOptions = {"range": (start, end)}
        if etag is not None:
            options["if_match"] = normalize_etag(etag)
        try:
            # The answer's status (412 for another version, 404...) comes before any byte.
            result = await obs.get_async(self.store, key, options=options)
        except Exception as exc:
            err = map_error(exc, key)
            if isinstance(err, StaleVersion):
                await self.head(key)  # gone is NotFound (see get_range)
            elif isinstance(err, InvalidRange):
                info = await self.head(key)
                self._check_etag(info, etag)
                if start >= info.size:
                    return
            raise err from exc
        chunks = result.stream(min_chunk_size=self.stream_chunk_size)
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                return
            except Exception as exc:
                raise map_error(exc, key) from exc
            if chunk:
                yield memoryview(chunk)

    @staticmethod
    def _check_etag(info: ObjectInfo, etag: str | None) -> None:
        if etag is not None and normalize_etag(etag) != info.etag:
            raise StaleVersion(f"object changed: etag {info.etag} is not {etag}", info.key)

    async def get(self, key: str) -> Buffer:
        check_key(key)
        try:
            result = await obs.get_async(self.store, key)
            data = await result.bytes_async()
        except Exception as exc:
            raise map_error(exc, key) from exc
        return memoryview(data)

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
        kept = self._snapshots.next_page(prefix, delimiter, token, limit)
        if kept is not None:
            return kept
        directory, _ = split_prefix(prefix)
        # obstore prefixes are whole path segments: list the directory, filter the rest here.
        store_prefix = directory.rstrip("/") or None
        try:
            if delimiter is not None:
                return await self._list_level(store_prefix, prefix, token, limit)
            if self.ordered_listing:
                return await self._list_ordered(store_prefix, prefix, token, limit)
            return await self._list_unordered(store_prefix, prefix, token, limit)
        except Exception as exc:
            raise map_error(exc, prefix or "/") from exc

    async def _list_level(
        self, store_prefix: str | None, prefix: str, token: str | None, limit: int
    ) -> ListPage:
        result = await obs.list_with_delimiter_async(self.store, store_prefix)
        entries: list[ObjectInfo | str] = []
        for meta in result["objects"]:
            if meta["path"].startswith(prefix):
                entries.append(info_from_meta(meta))
        for common in result["common_prefixes"]:
            name = common + "/"
            if name.startswith(prefix):
                entries.append(name)
        return paginate(
            entries,
            token=token,
            limit=limit,
            snapshots=self._snapshots,
            prefix=prefix,
            delimiter="/",
        )

    async def _list_ordered(
        self, store_prefix: str | None, prefix: str, token: str | None, limit: int
    ) -> ListPage:
        found: list[ObjectInfo | str] = []
        stream = obs.list(self.store, store_prefix, offset=token, chunk_size=_LIST_CHUNK)
        async for chunk in stream:
            for meta in chunk:
                key = meta["path"]
                if token is not None and key <= token:
                    continue  # some stores (Azure) ignore the offset
                if not key.startswith(prefix):
                    if key > prefix:
                        return page_from_sorted(found, start=0, limit=limit)
                    continue
                found.append(info_from_meta(meta))
                if len(found) > limit:
                    return page_from_sorted(found, start=0, limit=limit)
        return page_from_sorted(found, start=0, limit=limit)

    async def _list_unordered(
        self, store_prefix: str | None, prefix: str, token: str | None, limit: int
    ) -> ListPage:
        entries: list[ObjectInfo | str] = []
        stream = obs.list(self.store, store_prefix, offset=token, chunk_size=_LIST_CHUNK)
        async for chunk in stream:
            for meta in chunk:
                if meta["path"].startswith(prefix):
                    entries.append(info_from_meta(meta))
        return paginate(
            entries,
            token=token,
            limit=limit,
            snapshots=self._snapshots,
            prefix=prefix,
            delimiter=None,
        )

    async def put(
        self, key: str, data: Buffer, *, attributes: Attributes | None = None
    ) -> ObjectInfo:
        check_key(key)
        attrs = self._attributes(attributes, key)
        try:
            # One request: left to itself obstore cuts anything over 5 MiB into parts, which
            # costs two more round trips (callers send large files through put_multipart).
            await obs.put_async(self.store, key, data, use_multipart=False, attributes=attrs)
        except Exception as exc:
            raise map_error(exc, key) from exc
        # The put response lacks size and mtime; one HEAD gives the store's own view.
        return await self.head(key)

    async def put_multipart(
        self,
        key: str,
        chunks: AsyncIterable[Buffer],
        *,
        part_size: int = 8 * 1024 * 1024,
        attributes: Attributes | None = None,
    ) -> ObjectInfo:
        check_key(key)
        attrs = self._attributes(attributes, key)
        failure: list[Exception] = []

        async def relay() -> AsyncIterator[Buffer]:
            # Remember the producer's own error: obstore would report it as a store failure.
            try:
                async for chunk in chunks:
                    yield chunk
            except Exception as exc:
                failure.append(exc)
                raise

        try:
            await obs.put_async(
                self.upload_store,
                key,
                relay(),
                chunk_size=max(part_size, self.min_part_size),
                use_multipart=True,
                attributes=attrs,
            )
        except Exception as exc:
            if failure:
                raise failure[0] from None
            raise map_error(exc, key) from exc
        return await self.head(key)

    async def delete(self, key: str) -> None:
        check_key(key)
        try:
            await obs.delete_async(self.store, key)
        except Exception as exc:
            err = map_error(exc, key)
            if not isinstance(err, NotFound):
                raise err from exc
