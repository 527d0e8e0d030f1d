"""The checksums S3 clients send with a body: Content-MD5, ``x-amz-checksum-*`` and trailers.

CRC32 (zlib), SHA1 and SHA256 (hashlib) are native; CRC32C and CRC64NVME have no native module
in the standard library and are computed here, table-driven, eight bytes at a time (slow: tens of
MB/s). botocore sends CRC32 unless ``awscrt`` is installed, which is what makes CRC64NVME its
default.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import zlib
from typing import Protocol

# name in x-amz-checksum-<name> / x-amz-trailer -> algorithm
ALGORITHMS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")


class Checksum(Protocol):
    def update(self, data: bytes | bytearray | memoryview) -> None: ...

    def digest(self) -> bytes: ...


def _reflected_table(poly: int, bits: int) -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc & ((1 << bits) - 1))
    return table


_CRC32C_TABLE = _reflected_table(0x82F63B78, 32)
_CRC64NVME_TABLE = _reflected_table(0x9A6C9329AC4BC9B5, 64)


class _Crc32:
    __slots__ = ("_crc",)

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._crc = zlib.crc32(data, self._crc)

    def digest(self) -> bytes:
        return self._crc.to_bytes(4, "big")


class _TableCrc:
    """A reflected CRC with a 256-entry table (CRC32C, CRC64NVME)."""

    __slots__ = ("_crc", "_mask", "_size", "_table")

    def __init__(self, table: list[int], bits: int) -> None:
        self._table = table
        self._mask = (1 << bits) - 1
        self._size = bits // 8
        self._crc = self._mask

    def update(self, data: bytes | bytearray | memoryview) -> None:
        table = self._table
        crc = self._crc
        for byte in bytes(data):
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        self._crc = crc

    def digest(self) -> bytes:
        return (self._crc ^ self._mask).to_bytes(self._size, "big")


def new_checksum(algorithm: str) -> Checksum:
    """A running checksum for ``algorithm`` (lower case, one of ``ALGORITHMS``)."""
    if algorithm == "crc32":
        return _Crc32()
    if algorithm == "crc32c":
        return _TableCrc(_CRC32C_TABLE, 32)
    if algorithm == "crc64nvme":
        return _TableCrc(_CRC64NVME_TABLE, 64)
    if algorithm == "sha1":
        return hashlib.sha1()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def decode_b64(value: str, size: int) -> bytes | None:
    """The ``size`` bytes a base64 header value stands for, or None when it is not that."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == size else None


DIGEST_SIZES = {"crc32": 4, "crc32c": 4, "crc64nvme": 8, "sha1": 20, "sha256": 32}

__all__ = ["ALGORITHMS", "DIGEST_SIZES", "Checksum", "b64", "decode_b64", "new_checksum"]
