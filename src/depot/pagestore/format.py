"""The page file format and the names pages have on disk.

A page file holds the page bytes, then one xxh3-64 checksum per ``BLOCK_SIZE`` block, then a
fixed footer::

    data (length bytes) | block checksums (8 bytes LE each) | footer (FOOTER.size bytes)

The footer carries a magic, the format version, the block size, the data length, a tag of the
page id (so a file found at the wrong path is not trusted) and a checksum over the checksum table
and the footer itself. Keeping checksums per block lets a small read verify only the blocks it
touches instead of the whole page. Block checksums are seeded with the block number, so blocks
that trade places are caught too.
"""

from __future__ import annotations

import re
import struct
import sys
from array import array
from dataclasses import dataclass

import xxhash

from depot.core.errors import InvalidArgument
from depot.core.types import PageId

BLOCK_SIZE = 64 * 1024
MAGIC = b"DEPOTPG\x00"
FORMAT_VERSION = 1
# magic, version, reserved, block size, data length, page tag, footer checksum
FOOTER = struct.Struct("<8sHHIQQQ")
_FOOTER_HEAD = FOOTER.size - 8
_SUM = struct.Struct("<Q")

TEMP_SUFFIX = ".tmp"
_SAFE_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")
_HEX_PREFIX = "="
_MAX_NAME = 255

_hash = xxhash.xxh3_64_intdigest


class PageFormatError(ValueError):
    """A page file whose footer or checksum table is not valid."""


class TrailerTooShort(PageFormatError):
    """The tail read did not include the whole checksum table; read ``needed`` bytes."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"need the last {needed} bytes")
        self.needed = needed


def block_count(length: int) -> int:
    return -(-length // BLOCK_SIZE)


def file_size(length: int) -> int:
    """Bytes on disk of a page holding ``length`` data bytes."""
    return length + 8 * block_count(length) + FOOTER.size


def page_tag(page: PageId) -> int:
    return _hash(f"{page.file_key}\x00{page.index}".encode())


def block_sums(data: memoryview) -> array[int]:
    """The checksum of each block of ``data``."""
    sums = array("Q")
    for i in range(block_count(len(data))):
        sums.append(_hash(data[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE], i))
    return sums


def encode_trailer(page: PageId, length: int, sums: array[int]) -> bytes:
    """The checksum table and footer that follow the data of a page."""
    table = _table_bytes(sums)
    head = FOOTER.pack(MAGIC, FORMAT_VERSION, 0, BLOCK_SIZE, length, page_tag(page), 0)
    head = head[:_FOOTER_HEAD]
    meta = xxhash.xxh3_64()
    meta.update(table)
    meta.update(head)
    return table + head + _SUM.pack(meta.intdigest())


def decode_trailer(
    page: PageId, tail: bytes | bytearray | memoryview, size: int
) -> tuple[int, array[int]]:
    """Check the end of a page file of ``size`` bytes; return (data length, block checksums).

    ``tail`` must be the last ``len(tail)`` bytes of the file and hold at least the footer; if it
    is too short to hold the whole checksum table, ``TrailerTooShort`` says how much is needed.
    """
    view = memoryview(tail)
    if len(view) < FOOTER.size or size < FOOTER.size:
        raise PageFormatError("file too short for a page footer")
    magic, version, _reserved, block, length, tag, checksum = FOOTER.unpack_from(
        view, len(view) - FOOTER.size
    )
    if magic != MAGIC:
        raise PageFormatError("bad magic")
    if version != FORMAT_VERSION:
        raise PageFormatError(f"unknown page format version {version}")
    if block != BLOCK_SIZE:
        raise PageFormatError(f"unexpected block size {block}")
    if file_size(length) != size:
        raise PageFormatError("file size does not match the data length in the footer")
    if tag != page_tag(page):
        raise PageFormatError("footer belongs to another page")
    table_len = 8 * block_count(length)
    if len(view) < table_len + FOOTER.size:
        raise TrailerTooShort(table_len + FOOTER.size)
    start = len(view) - FOOTER.size - table_len
    meta = xxhash.xxh3_64()
    meta.update(view[start : start + table_len + _FOOTER_HEAD])
    if meta.intdigest() != checksum:
        raise PageFormatError("footer checksum mismatch")
    sums = array("Q")
    sums.frombytes(view[start : start + table_len])
    if sys.byteorder == "big":
        sums.byteswap()
    return length, sums


def trailer_size_for(page_size: int) -> int:
    """The largest trailer a page of at most ``page_size`` bytes has."""
    return 8 * block_count(page_size) + FOOTER.size


def _table_bytes(sums: array[int]) -> bytes:
    if sys.byteorder == "big":
        swapped = array("Q", sums)
        swapped.byteswap()
        return swapped.tobytes()
    return sums.tobytes()


@dataclass(frozen=True, slots=True)
class PagePath:
    """Where a page lives below a cache dir's ``pages`` folder: ``shard/file_dir/index``."""

    shard: str
    file_dir: str
    name: str


def shard_of(file_key: str) -> str:
    return f"{_hash(file_key.encode()) & 0xFF:02x}"


def file_dir_name(file_key: str) -> str:
    """A safe, reversible directory name for ``file_key``."""
    if _SAFE_KEY.fullmatch(file_key) and file_key not in (".", ".."):
        return file_key
    name = _HEX_PREFIX + file_key.encode().hex()
    if len(name) > _MAX_NAME:
        raise InvalidArgument(f"file key too long to store: {file_key[:40]!r}...")
    return name


def file_key_of(dir_name: str) -> str | None:
    """The file key a directory name stands for, or None if it is not one of ours."""
    if dir_name.startswith(_HEX_PREFIX):
        try:
            key = bytes.fromhex(dir_name[len(_HEX_PREFIX) :]).decode()
        except ValueError:
            return None
        return key if file_dir_name(key) == dir_name else None
    if _SAFE_KEY.fullmatch(dir_name) and dir_name not in (".", ".."):
        return dir_name
    return None


def page_path(page: PageId) -> PagePath:
    if page.index < 0:
        raise InvalidArgument(f"negative page index {page.index}")
    return PagePath(shard_of(page.file_key), file_dir_name(page.file_key), str(page.index))


def parse_index(name: str) -> int | None:
    """The page index a file name stands for (canonical decimal only), or None."""
    if not name.isdigit() or not name.isascii():
        return None
    if len(name) > 1 and name[0] == "0":
        return None
    return int(name)
