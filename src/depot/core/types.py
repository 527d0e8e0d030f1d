"""Value types shared by every layer."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from depot.core.errors import InvalidRange

#: The content headers an object store keeps with an object, in their canonical spelling.
CONTENT_HEADERS = (
    "Cache-Control",
    "Content-Disposition",
    "Content-Encoding",
    "Content-Language",
    "Content-Type",
)
_CANONICAL = {name.lower(): name for name in CONTENT_HEADERS}


def _pairs(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"attributes: {what} must map strings to strings")
    return value


@dataclass(frozen=True, slots=True)
class Attributes:
    """What an object store keeps beside an object's bytes: content headers and user metadata.

    Two parts, so a user metadata name (S3's ``x-amz-meta-content-type``) never passes for the
    header of the same name. ``headers``: ``CONTENT_HEADERS`` that were given; ``metadata``: user
    metadata by lower-case name (S3 folds the case). Both are sorted pairs, so the value is
    immutable and hashable like the ``FileStatus`` that carries it: build it with ``of``.
    """

    headers: tuple[tuple[str, str], ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(
        cls, headers: Mapping[str, str] | None = None, metadata: Mapping[str, str] | None = None
    ) -> Attributes:
        """Normalised: header names in canonical case (``ValueError`` for any other name),
        metadata names in lower case."""
        found: dict[str, str] = {}
        for name, value in (headers or {}).items():
            canonical = _CANONICAL.get(name.lower())
            if canonical is None:
                raise ValueError(f"not a content header: {name!r}")
            found[canonical] = value
        meta = {name.lower(): value for name, value in (metadata or {}).items()}
        return cls(tuple(sorted(found.items())), tuple(sorted(meta.items())))

    def header(self, name: str) -> str | None:
        """The value of content header ``name`` (any case), if kept."""
        wanted = _CANONICAL.get(name.lower(), name)
        for key, value in self.headers:
            if key == wanted:
                return value
        return None

    @property
    def content_type(self) -> str | None:
        return self.header("Content-Type")

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {"headers": dict(self.headers), "metadata": dict(self.metadata)}

    @classmethod
    def from_dict(cls, data: object) -> Attributes:
        """The inverse of ``to_dict``; ``ValueError`` for anything else."""
        if not isinstance(data, dict) or not set(data) <= {"headers", "metadata"}:
            raise ValueError("attributes must be {\"headers\": {...}, \"metadata\": {...}}")
        return cls.of(
            _pairs(data.get("headers", {}), "headers"),
            _pairs(data.get("metadata", {}), "metadata"),
        )


@dataclass(frozen=True, slots=True)
class FileStatus:
    """What a client learns from ``stat``: a file or a directory of the namespace.

    ``attributes``: the object's content headers and user metadata; None where they are not
    known (a listing, a store that keeps none, a directory).
    """

    path: str
    size: int
    mtime: float
    is_dir: bool = False
    etag: str | None = None
    version: str | None = None
    attributes: Attributes | None = None

    @property
    def version_tag(self) -> str:
        """The identity of this content: version id, else ETag, else size and mtime."""
        if self.version:
            return f"v:{self.version}"
        if self.etag:
            return f"e:{self.etag}"
        return f"s:{self.size}:{int(self.mtime * 1_000_000)}"

    @property
    def entity_tag(self) -> str:
        """The version as an HTTP entity tag: quoted, with no quotes inside."""
        return '"' + self.version_tag.replace('"', "").replace("\\", "") + '"'

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "size": self.size,
            "mtime": self.mtime,
            "type": "directory" if self.is_dir else "file",
            "etag": self.etag,
            "version": self.version,
        }
        if self.attributes is not None:  # absent rather than null: listings stay small
            out["attributes"] = self.attributes.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileStatus:
        attributes = data.get("attributes")
        return cls(
            path=str(data["path"]),
            size=int(data["size"]),
            mtime=float(data["mtime"]),
            is_dir=data.get("type") == "directory",
            etag=data.get("etag"),
            version=data.get("version"),
            attributes=None if attributes is None else Attributes.from_dict(attributes),
        )


@dataclass(frozen=True, slots=True)
class FileId:
    """One version of one object: the unit that cached pages belong to.

    ``key`` is a fixed-length digest so it can name files and index entries safely; two versions of
    the same object never share a key, which is what keeps stale pages from being served.
    """

    ufs_uri: str
    version_tag: str
    key: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        digest = hashlib.blake2b(
            f"{self.ufs_uri}\x00{self.version_tag}".encode(), digest_size=16
        ).hexdigest()
        object.__setattr__(self, "key", digest)


@dataclass(frozen=True, slots=True)
class PageId:
    """Page ``index`` of the file version ``file_key``."""

    file_key: str
    index: int

    def __str__(self) -> str:
        return f"{self.file_key}-{self.index}"


@dataclass(frozen=True, slots=True)
class ByteRange:
    """The half-open byte range ``[start, end)``."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < self.start:
            raise InvalidRange(f"invalid byte range [{self.start}, {self.end})")

    @property
    def length(self) -> int:
        return self.end - self.start

    def pages(self, page_size: int) -> range:
        """Indexes of the pages this range touches."""
        if self.length == 0:
            return range(0)
        return range(self.start // page_size, (self.end - 1) // page_size + 1)

    @classmethod
    def parse_http(cls, header: str | None, size: int) -> ByteRange | None:
        """Parse one ``Range: bytes=...`` header against an object of ``size`` bytes.

        Returns None for "the whole object". Raises ``InvalidRange`` for a malformed or
        unsatisfiable range, and for multi-range requests, which depot does not serve.
        """
        if header is None:
            return None
        spec = header.strip()
        if not spec.startswith("bytes="):
            raise InvalidRange(f"unsupported range unit: {header!r}")
        spec = spec[6:].strip()
        if "," in spec:
            raise InvalidRange("multiple ranges in one request are not supported")
        first, sep, last = spec.partition("-")
        if not sep:
            raise InvalidRange(f"malformed range: {header!r}")
        first, last = first.strip(), last.strip()
        try:
            if first == "":
                if not last.isdigit():
                    raise ValueError
                suffix = int(last)
                if suffix == 0:
                    raise InvalidRange(f"unsatisfiable range {header!r} for size {size}")
                return cls(max(0, size - suffix), size)
            if not first.isdigit() or (last and not last.isdigit()):
                raise ValueError
            start = int(first)
            end = int(last) + 1 if last else size
        except ValueError:
            raise InvalidRange(f"malformed range: {header!r}") from None
        if end <= start and last:
            raise InvalidRange(f"malformed range: {header!r}")
        if start >= size:
            raise InvalidRange(f"unsatisfiable range {header!r} for size {size}")
        return cls(start, min(end, size))


def parse_size(value: str | int) -> int:
    """Parse ``4MiB``, ``10G``, ``512k`` or a plain integer into bytes."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"negative size: {value}")
        return value
    text = str(value).strip().replace(" ", "")
    units = {
        "": 1, "b": 1,
        "k": 1024, "kb": 1000, "kib": 1024,
        "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
        "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
        "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
    }
    number = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = text[len(number):].lower()
    if not number or unit not in units:
        raise ValueError(f"not a size: {value!r} (use e.g. 4MiB, 10GiB, 1048576)")
    try:
        amount = float(number)
    except ValueError:
        raise ValueError(f"not a size: {value!r}") from None
    if amount < 0:
        raise ValueError(f"negative size: {value!r}")
    return int(amount * units[unit])


def parse_rate(value: str | int | None) -> int | None:
    """A bandwidth in bytes/s: ``100MB``, ``1GiB/s``, ``52428800``; None or 0 means no limit.

    Raises ``InvalidArgument`` (a 400 at the HTTP boundary, one line in the CLI).
    """
    from depot.core.errors import InvalidArgument

    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError(value)
        rate = parse_size(value.strip().removesuffix("/s") if isinstance(value, str) else value)
    except ValueError:
        raise InvalidArgument(
            f"invalid bandwidth {value!r} (bytes per second, e.g. 100MB, 1GiB/s)"
        ) from None
    return rate or None


def parse_duration(value: str | float | int) -> float:
    """Parse ``60s``, ``5m``, ``2h``, ``1d``, ``250ms`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"negative duration: {value}")
        return float(value)
    text = str(value).strip().lower()
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "": 1.0}
    for suffix in ("ms", "s", "m", "h", "d", ""):
        if text.endswith(suffix):
            number = text[: len(text) - len(suffix)] if suffix else text
            try:
                amount = float(number)
            except ValueError:
                continue
            if amount < 0:
                raise ValueError(f"negative duration: {value!r}")
            return amount * units[suffix]
    raise ValueError(f"not a duration: {value!r} (use e.g. 60s, 5m, 1h)")
