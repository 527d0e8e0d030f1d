"""Any fsspec file system as an under store: HDFS and every store obstore does not speak.

URIs: ``fsspec+PROTOCOL://REST`` opens ``PROTOCOL://REST`` with fsspec, for example
``fsspec+hdfs://namenode:8020/user/data``, ``fsspec+sftp://host/srv/data``,
``fsspec+memory://bucket/root`` or ``fsspec+file:///mnt/data``. ``hdfs://...`` is a short form
of ``fsspec+hdfs://...``. The path of the URL is the store root; keys are relative to it.

Mount options are passed to the file system's constructor (``host``, ``user``, ``key_file``...);
its private listing cache is off unless ``use_listings_cache=true`` is given.
Option values are strings; ``true``/``false`` become booleans and whole numbers become ints, as
constructors expect. ``spool_dir`` is depot's own: where ``put_multipart`` stages a stream
before handing it to the file system (default: the system temp directory). When the class
takes no ``**kwargs``, options it does not accept are rejected with ``ConfigError``.

Async file systems (``AsyncFileSystem``: s3fs, gcsfs, adlfs...) run their coroutines on fsspec's
IO loop, awaited from the caller's loop without blocking a thread; blocking ones run in worker
threads.

Versions: when the file system reports an ETag (``ETag``/``etag``), it is used as is; otherwise
the ETag is a digest of size, mtime and inode (where reported). ``get_range(etag=...)`` checks
the version before and after reading, which catches any change that alters the ETag. A file
rewritten in place by another program with the same size within one mtime tick keeps its ETag;
writes through this store on a local file system replace the file (new inode) instead.

Attributes (content type, user metadata) are not kept: fsspec has no portable way to set them.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import os
import posixpath
import tempfile
import uuid
from collections.abc import AsyncIterable, Coroutine, Mapping
from datetime import datetime
from typing import Any

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

from depot.core.config import UfsConfig
from depot.core.errors import ConfigError, InvalidRange, IsADirectory, NotFound, StaleVersion
from depot.core.types import Attributes
from depot.ufs.base import Buffer, ListPage, ObjectInfo, UnderStore
from depot.ufs.errors import map_error, short_message
from depot.ufs.keys import (
    ListingSnapshots,
    check_key,
    check_list_args,
    check_prefix,
    check_range,
    paginate,
    split_prefix,
)

log = logging.getLogger(__name__)

_EMPTY = memoryview(b"")
# Where known async file systems keep their HTTP client: adlfs, s3fs, gcsfs and http.
_ASYNC_CLIENT_ATTRS = ("service_client", "_s3", "session", "_session")
TMP_MARKER = ".depot-tmp-"
ADAPTER_OPTIONS = ("spool_dir",)
_ETAG_FIELDS = ("ETag", "etag", "e_tag")
_VERSION_FIELDS = ("VersionId", "version_id", "version")
_MTIME_FIELDS = ("mtime", "LastModified", "last_modified", "modified", "updated", "created")


def _timestamp(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def info_from_fsspec(key: str, info: Mapping[str, Any]) -> ObjectInfo:
    """``ObjectInfo`` from an fsspec info dict, whichever spelling the file system uses."""
    size = int(info.get("size") or 0)
    mtime = 0.0
    for name in _MTIME_FIELDS:
        stamp = _timestamp(info.get(name))
        if stamp is not None:
            mtime = stamp
            break
    etag: str | None = None
    for name in _ETAG_FIELDS:
        if info.get(name):
            etag = str(info[name])
            if not etag.startswith(('"', 'W/"')):
                etag = f'"{etag}"'
            break
    if etag is None:
        basis = f"{size}:{round(mtime * 1_000_000)}:{info.get('ino', '')}"
        etag = '"' + hashlib.blake2b(basis.encode(), digest_size=12).hexdigest() + '"'
    version = next((str(info[n]) for n in _VERSION_FIELDS if info.get(n)), None)
    return ObjectInfo(key=key, size=size, mtime=mtime, etag=etag, version=version)


class FsspecUnderStore(UnderStore):
    """``UnderStore`` over an fsspec file system rooted at ``root`` (a path of that file system)."""

    def __init__(
        self, fs: AbstractFileSystem, root: str, uri: str, *, spool_dir: str | None = None
    ) -> None:
        self.fs = fs
        self.uri = uri
        self.base = root if (not root or root.endswith("/")) else root + "/"
        self.spool_dir = spool_dir
        self._async = isinstance(fs, AsyncFileSystem)
        # Local files are replaced by rename: readers never see a half-written file, and the
        # new inode changes the ETag even when size and mtime tick do not.
        self._local = isinstance(fs, LocalFileSystem)
        self._snapshots = ListingSnapshots()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if self._async:
            return await self._on_fs_loop(getattr(self.fs, "_" + name)(*args, **kwargs))
        return await asyncio.to_thread(getattr(self.fs, name), *args, **kwargs)

    async def _on_fs_loop(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Await a coroutine of the file system on fsspec's own IO loop.

        An async file system binds its HTTP session to one event loop; running it on fsspec's
        loop thread lets any caller loop (the worker's, a sync facade's) use one store, and
        cancelling the caller cancels the request there.
        """
        future = asyncio.run_coroutine_threadsafe(coro, self.fs.loop)
        return await asyncio.wrap_future(future)

    def _path(self, key: str) -> str:
        return self.base + key

    def _rel(self, name: str) -> str | None:
        path = str(self.fs._strip_protocol(name))
        if not path.startswith(self.base) or path == self.base:
            return None
        return path[len(self.base) :].rstrip("/")

    def _invalidate(self, path: str) -> None:
        """Forget cached listings of ``path`` and its directory after a write through us."""
        invalidate = getattr(self.fs, "invalidate_cache", None)
        if invalidate is not None:
            invalidate(path)
            invalidate(self.fs._parent(path))

    async def head(self, key: str) -> ObjectInfo:
        check_key(key)
        try:
            info = await self._call("info", self._path(key))
        except Exception as exc:
            raise map_error(exc, key) from exc
        if info.get("type") != "file":
            raise NotFound("not an object (a directory)", key)
        return info_from_fsspec(key, info)

    async def _check_version(self, key: str, etag: str) -> ObjectInfo:
        info = await self.head(key)
        if info.etag != etag:
            raise StaleVersion(f"object changed: etag {info.etag} is not {etag}", key)
        return info

    async def get_range(self, key: str, start: int, end: int, *, etag: str | None = None) -> Buffer:
        check_key(key)
        check_range(start, end)
        if etag is not None:
            await self._check_version(key, etag)
        elif start == end:
            await self.head(key)
        if start == end:
            return _EMPTY
        data = await self._read(key, start, end)
        if etag is not None:
            await self._check_version(key, etag)
        return data

    async def _read(self, key: str, start: int | None, end: int | None) -> memoryview:
        try:
            data = await self._call("cat_file", self._path(key), start=start, end=end)
        except Exception as exc:
            err = map_error(exc, key)
            if isinstance(err, IsADirectory):
                raise NotFound("not an object (a directory)", key) from exc
            # Some file systems refuse a range past the end instead of returning nothing.
            if (
                isinstance(err, InvalidRange)
                and start is not None
                and start >= (await self.head(key)).size
            ):
                return _EMPTY
            raise err from exc
        return memoryview(data)

    async def get(self, key: str) -> Buffer:
        check_key(key)
        return await self._read(key, None, None)

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
        dir_path = self.base + directory.rstrip("/") if directory else self.base.rstrip("/")
        if not dir_path:
            dir_path = self.base or "/"
        try:
            if delimiter is not None:
                items = await self._call("ls", dir_path, detail=True)
            else:
                found = await self._call("find", dir_path, detail=True, withdirs=False)
                items = list(found.values())
        except (FileNotFoundError, NotADirectoryError):
            items = []
        except Exception as exc:
            raise map_error(exc, prefix or "/") from exc
        entries: list[ObjectInfo | str] = []
        for item in items:
            rel = self._rel(item["name"])
            if rel is None or not rel.startswith(prefix) or TMP_MARKER in posixpath.basename(rel):
                continue
            if item.get("type") == "directory":
                if delimiter is not None:
                    entries.append(rel + "/")
            elif item.get("type") == "file":
                entries.append(info_from_fsspec(rel, item))
        return paginate(
            entries,
            token=token,
            limit=limit,
            snapshots=self._snapshots,
            prefix=prefix,
            delimiter=delimiter,
        )

    async def _with_parent(self, path: str, name: str, *args: Any) -> None:
        """Call ``name``, creating the parent directory if the file system needs one."""
        try:
            await self._call(name, *args)
        except FileNotFoundError:
            await self._call("makedirs", self.fs._parent(path), exist_ok=True)
            await self._call(name, *args)

    def _sibling(self, path: str) -> str:
        parent, base = posixpath.split(path)
        return posixpath.join(parent, f".{base}{TMP_MARKER}{uuid.uuid4().hex}")

    async def put(
        self, key: str, data: Buffer, *, attributes: Attributes | None = None
    ) -> ObjectInfo:
        check_key(key)
        path = self._path(key)
        try:
            if self._local:
                tmp = self._sibling(path)
                try:
                    await self._with_parent(tmp, "pipe_file", tmp, bytes(data))
                    await asyncio.to_thread(os.replace, tmp, path)
                except BaseException:
                    await asyncio.to_thread(_unlink_quietly, tmp)
                    raise
            else:
                await self._with_parent(path, "pipe_file", path, bytes(data))
        except Exception as exc:
            raise map_error(exc, key) from exc
        finally:
            self._invalidate(path)
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
        path = self._path(key)
        if self._local:
            spool = self._sibling(path)
            try:
                await self._call("makedirs", self.fs._parent(path), exist_ok=True)
            except Exception as exc:
                raise map_error(exc, key) from exc
        else:
            fd, spool = tempfile.mkstemp(prefix="depot-upload-", dir=self.spool_dir)
            os.close(fd)
        try:
            # Staged on local disk: the stream is not held in memory, and a producer that fails
            # halfway leaves the store untouched.
            with open(spool, "wb") as out:
                async for chunk in chunks:
                    await asyncio.to_thread(out.write, chunk)
            try:
                if self._local:
                    await asyncio.to_thread(os.replace, spool, path)
                else:
                    await self._with_parent(path, "put_file", spool, path)
            except Exception as exc:
                raise map_error(exc, key) from exc
        finally:
            await asyncio.to_thread(_unlink_quietly, spool)
            self._invalidate(path)
        return await self.head(key)

    async def delete(self, key: str) -> None:
        check_key(key)
        path = self._path(key)
        try:
            await self._call("rm_file", path)
        except FileNotFoundError:
            return
        except Exception as exc:
            err = map_error(exc, key)
            if not isinstance(err, NotFound):
                raise err from exc
            return
        finally:
            self._invalidate(path)
        if self._local:
            await asyncio.to_thread(self._prune_empty_parents, path)

    async def close(self) -> None:
        """Close the HTTP clients async file systems keep (fsspec has no common close)."""
        if not self._async:
            return
        for attr in _ASYNC_CLIENT_ATTRS:
            client = getattr(self.fs, attr, None)
            close = getattr(client, "close", None)
            if close is None:
                continue
            try:
                result = close()
                if inspect.iscoroutine(result):
                    await self._on_fs_loop(result)
            except Exception as exc:  # closing is best effort: never mask the caller's outcome
                log.debug("closing %s.%s failed: %s", type(self.fs).__name__, attr, exc)

    def _prune_empty_parents(self, path: str) -> None:
        """Drop directories left empty, as object stores drop a prefix with its last key."""
        parent = posixpath.dirname(path)
        while (parent + "/").startswith(self.base) and parent + "/" != self.base:
            try:
                os.rmdir(parent)
            except OSError:
                return
            parent = posixpath.dirname(parent)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _convert(value: str) -> Any:
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lstrip("-").isdigit():
        return int(text)
    return value


def build_fsspec(
    uri: str, target: str, options: Mapping[str, str], ufs_config: UfsConfig
) -> FsspecUnderStore:
    """Open ``target`` (an fsspec URL such as ``hdfs://nn:8020/data``) as an under store."""
    protocol = target.split("://", 1)[0] if "://" in target else ""
    if not protocol:
        raise ConfigError("fsspec URI must look like fsspec+PROTOCOL://PATH", uri)
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"fsspec protocol {protocol!r} unavailable: {exc}", uri) from None
    if protocol in ("file", "local") and not target.split("://", 1)[1].startswith("/"):
        # fsspec would resolve it against the working directory of whichever process opens it.
        raise ConfigError("a local path must be absolute (fsspec+file:///abs/dir)", uri)
    spool_dir = options.get("spool_dir")
    fs_options = {k: _convert(v) for k, v in options.items() if k not in ADAPTER_OPTIONS}
    params = inspect.signature(cls.__init__).parameters.values()
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    accepted = {p.name for p in params}
    if not open_ended:
        for name in fs_options:
            if name not in accepted:
                raise ConfigError(f"unknown option {name!r} for {protocol}:// file system", uri)
    if open_ended or "use_listings_cache" in accepted:
        # depot keeps its own metadata cache with its own revalidation; a second, private
        # listing cache below it would hide changes from that revalidation.
        fs_options.setdefault("use_listings_cache", False)
    try:
        kwargs: dict[str, Any] = dict(cls._get_kwargs_from_urls(target))
        kwargs.update(fs_options)
        root = cls._strip_protocol(target)
        fs = cls(skip_instance_cache=True, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"cannot open {protocol}:// file system: {short_message(exc)}", uri
        ) from None
    if isinstance(root, list):  # a few file systems strip lists; one URL gives one path
        root = root[0]
    return FsspecUnderStore(fs, str(root), uri, spool_dir=spool_dir)
