"""One error hierarchy for the whole project.

Every error is an ``OSError`` with a real errno so that POSIX boundaries (FUSE) can pass it on
unchanged, and carries a stable ``code`` and HTTP status so that the HTTP, S3 and CLI boundaries
map it without guessing. ``NotFound`` is also a ``FileNotFoundError`` so fsspec callers and plain
Python code catch it the usual way.
"""

from __future__ import annotations

import errno as _errno
from typing import Any, ClassVar


class DepotError(OSError):
    """Base class: an ``OSError`` with a stable code, an HTTP status and a retry hint."""

    errno_value: ClassVar[int] = _errno.EIO
    code: ClassVar[str] = "InternalError"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, path: str | None = None) -> None:
        if path is None:
            super().__init__(self.errno_value, message)
        else:
            super().__init__(self.errno_value, message, path)
        self.message = message
        self.path = path

    def __str__(self) -> str:
        if self.path:
            return f"{self.message}: {self.path}"
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.path))

    def to_dict(self) -> dict[str, Any]:
        """The JSON body every HTTP boundary sends for this error."""
        body: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "errno": self.errno_value,
        }
        if self.path is not None:
            body["path"] = self.path
        return body


class InvalidArgument(DepotError):
    errno_value = _errno.EINVAL
    code = "InvalidArgument"
    http_status = 400


class InvalidPath(InvalidArgument):
    """A malformed path, or one that would escape its mount."""

    code = "InvalidPath"


class InvalidRange(InvalidArgument):
    """A byte range that is malformed or lies outside the object."""

    code = "InvalidRange"
    http_status = 416


class ConfigError(InvalidArgument):
    code = "ConfigError"


class NotFound(DepotError, FileNotFoundError):
    errno_value = _errno.ENOENT
    code = "NotFound"
    http_status = 404


class AlreadyExists(DepotError, FileExistsError):
    errno_value = _errno.EEXIST
    code = "AlreadyExists"
    http_status = 409


class IsADirectory(DepotError, IsADirectoryError):
    errno_value = _errno.EISDIR
    code = "IsADirectory"
    http_status = 400


class NotADirectory(DepotError, NotADirectoryError):
    errno_value = _errno.ENOTDIR
    code = "NotADirectory"
    http_status = 400


class PermissionDenied(DepotError, PermissionError):
    errno_value = _errno.EACCES
    code = "PermissionDenied"
    http_status = 403


class ReadOnly(PermissionDenied):
    errno_value = _errno.EROFS
    code = "ReadOnly"


class StaleVersion(DepotError):
    """The object changed between the version a reader pinned and the one the store holds."""

    errno_value = _errno.ESTALE
    code = "StaleVersion"
    http_status = 412
    retryable = True


class Throttled(DepotError):
    errno_value = _errno.EAGAIN
    code = "Throttled"
    http_status = 503
    retryable = True


class Unavailable(DepotError):
    """A store or worker cannot be reached or answered with a server error."""

    errno_value = _errno.EHOSTUNREACH
    code = "Unavailable"
    http_status = 503
    retryable = True


class Timeout(Unavailable, TimeoutError):
    errno_value = _errno.ETIMEDOUT
    code = "Timeout"
    http_status = 504


class Corrupted(DepotError):
    """Bytes failed their checksum; they are never served."""

    errno_value = _errno.EBADMSG
    code = "Corrupted"
    http_status = 500


class NoSpace(DepotError):
    errno_value = _errno.ENOSPC
    code = "NoSpace"
    http_status = 507


class Unsupported(DepotError):
    errno_value = _errno.ENOTSUP
    code = "Unsupported"
    http_status = 501


class RequestTooLarge(InvalidArgument):
    errno_value = _errno.E2BIG
    code = "RequestTooLarge"
    http_status = 413


_BY_CODE: dict[str, type[DepotError]] = {}


def _register(cls: type[DepotError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(DepotError)


def error_from_code(code: str, message: str, path: str | None = None) -> DepotError:
    """Rebuild the typed error a worker reported (the inverse of ``to_dict``)."""
    cls = _BY_CODE.get(code, DepotError)
    return cls(message, path)


def error_for_http_status(status: int, message: str, path: str | None = None) -> DepotError:
    """A typed error for a bare HTTP status when the body carries no code."""
    if status == 404:
        return NotFound(message, path)
    if status in (401, 403):
        return PermissionDenied(message, path)
    if status == 412:
        return StaleVersion(message, path)
    if status == 416:
        return InvalidRange(message, path)
    if status == 429:
        return Throttled(message, path)
    if status == 504:
        return Timeout(message, path)
    if 400 <= status < 500:
        return InvalidArgument(message, path)
    return Unavailable(message, path)
