"""Multipart uploads staged on the gateway's disk until they are completed or aborted.

Layout under ``s3.staging_dir``: one directory per upload (its id: 32 hex digits), holding
``upload.json`` (bucket, key, depot path, initiation time, the object's attributes from
CreateMultipartUpload) and, per part, ``NNNNN`` (the bytes)
and ``NNNNN.json`` (size, MD5, time). A part is written to a temporary name, fsynced, then renamed
over the previous upload of that number, and its record is written the same way: a part is either
all there or not at all, and survives a gateway restart. Complete reads the parts back in order as
one file (``PartsFile``), so the object is written in one ``CacheClient.write`` and nothing partial
ever appears under its name; the directory is removed after Complete or Abort.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from depot.core.types import Attributes
from depot.s3.errors import S3Error

MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PARTS = 10_000
_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(slots=True)
class Upload:
    upload_id: str
    bucket: str
    key: str
    path: str
    initiated: float
    attributes: Attributes | None = None  # given at CreateMultipartUpload, set at Complete


@dataclass(slots=True)
class Part:
    number: int
    size: int
    md5: str  # hex
    mtime: float

    @property
    def etag(self) -> str:
        return f'"{self.md5}"'


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp-{secrets.token_hex(4)}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def no_such_upload(upload_id: str) -> S3Error:
    return S3Error("NoSuchUpload", UploadId=upload_id[:100])


class Staging:
    """The uploads in progress of one gateway."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, upload_id: str) -> Path:
        if not _ID.match(upload_id):
            raise no_such_upload(upload_id)
        return self.root / upload_id

    async def create(
        self, bucket: str, key: str, path: str, attributes: Attributes | None = None
    ) -> Upload:
        upload = Upload(secrets.token_hex(16), bucket, key, path, time.time(), attributes)

        def make() -> None:
            folder = self.root / upload.upload_id
            folder.mkdir(parents=True)
            record: dict[str, Any] = {
                "bucket": bucket, "key": key, "path": path, "initiated": upload.initiated
            }
            if attributes is not None:
                record["attributes"] = attributes.to_dict()
            _write_atomic(folder / "upload.json", json.dumps(record).encode())

        await asyncio.to_thread(make)
        return upload

    def _load(self, upload_id: str) -> Upload:
        folder = self._dir(upload_id)
        try:
            record = json.loads((folder / "upload.json").read_bytes())
            attributes = record.get("attributes")
            if attributes is not None:
                attributes = Attributes.from_dict(attributes)
        except (OSError, ValueError):
            raise no_such_upload(upload_id) from None
        return Upload(
            upload_id, record["bucket"], record["key"], record["path"], record["initiated"],
            attributes,
        )

    async def get(self, upload_id: str, bucket: str, key: str) -> Upload:
        upload = await asyncio.to_thread(self._load, upload_id)
        if upload.bucket != bucket or upload.key != key:
            raise no_such_upload(upload_id)
        return upload

    async def put_part(
        self, upload: Upload, number: int, chunks: AsyncIterator[bytes], md5_hex: Any
    ) -> Part:
        """Stage part ``number`` from ``chunks``; ``md5_hex()`` is read once they are exhausted
        (and verified: the iterator raises on a failed check, and nothing is staged then)."""
        folder = self.root / upload.upload_id
        tmp = folder / f"{number:05d}.tmp-{secrets.token_hex(4)}"
        f = await asyncio.to_thread(open, tmp, "wb")
        size = 0
        try:
            async for chunk in chunks:
                size += len(chunk)
                await asyncio.to_thread(f.write, chunk)
            await asyncio.to_thread(f.flush)
            await asyncio.to_thread(os.fsync, f.fileno())
        except BaseException:
            f.close()
            tmp.unlink(missing_ok=True)
            raise
        f.close()
        part = Part(number, size, str(md5_hex()), time.time())

        def commit() -> None:
            if not (folder / "upload.json").exists():  # aborted or completed meanwhile
                tmp.unlink(missing_ok=True)
                raise no_such_upload(upload.upload_id)
            os.replace(tmp, folder / f"{number:05d}")
            record = {"size": part.size, "md5": part.md5, "mtime": part.mtime}
            _write_atomic(folder / f"{number:05d}.json", json.dumps(record).encode())

        await asyncio.to_thread(commit)
        return part

    def _parts(self, upload_id: str) -> list[Part]:
        folder = self._dir(upload_id)
        parts = []
        for entry in os.listdir(folder):
            if len(entry) == 10 and entry.endswith(".json") and entry[:5].isdigit():
                try:
                    rec = json.loads((folder / entry).read_bytes())
                except (OSError, ValueError):
                    continue
                parts.append(Part(int(entry[:5]), rec["size"], rec["md5"], rec["mtime"]))
        parts.sort(key=lambda p: p.number)
        return parts

    async def parts(self, upload: Upload) -> list[Part]:
        return await asyncio.to_thread(self._parts, upload.upload_id)

    def part_path(self, upload: Upload, number: int) -> Path:
        return self.root / upload.upload_id / f"{number:05d}"

    async def remove(self, upload: Upload) -> None:
        def drop() -> None:
            folder = self.root / upload.upload_id
            (folder / "upload.json").unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)

        await asyncio.to_thread(drop)

    async def uploads(self, bucket: str) -> list[Upload]:
        def scan() -> list[Upload]:
            found = []
            try:
                names = os.listdir(self.root)
            except FileNotFoundError:
                return []
            for name in names:
                if not _ID.match(name):
                    continue
                try:
                    upload = self._load(name)
                except S3Error:
                    continue
                if upload.bucket == bucket:
                    found.append(upload)
            found.sort(key=lambda u: (u.key.encode(), u.initiated))
            return found

        return await asyncio.to_thread(scan)


class PartsFile:
    """The staged parts read back in order as one seekable, read-only binary file."""

    def __init__(self, paths: list[tuple[Path, int]]) -> None:
        self._paths = paths
        self._starts: list[int] = []
        total = 0
        for _, size in paths:
            self._starts.append(total)
            total += size
        self.size = total
        self._pos = 0
        self._open: tuple[int, Any] | None = None

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, count: int = -1) -> bytes:
        if count < 0:
            count = self.size - self._pos
        out = bytearray()
        while count > 0 and self._pos < self.size:
            index = next(i for i in range(len(self._paths) - 1, -1, -1) if self._starts[i] <= self._pos)
            path, size = self._paths[index]  # the last part starting at or before _pos: not empty
            if self._open is None or self._open[0] != index:
                self.close()
                self._open = (index, open(path, "rb"))  # noqa: SIM115
            f = self._open[1]
            within = self._pos - self._starts[index]
            f.seek(within)
            data = f.read(min(count, size - within))
            if not data:
                raise OSError(f"staged part {path} is shorter than recorded")
            out += data
            self._pos += len(data)
            count -= len(data)
        return bytes(out)

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
            self._open = None


__all__ = ["MAX_PARTS", "MIN_PART_SIZE", "Part", "PartsFile", "Staging", "Upload", "no_such_upload"]
