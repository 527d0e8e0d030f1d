"""Turn whatever a store library raises into the typed errors of ``depot.core.errors``.

obstore raises a few typed exceptions (``PreconditionError``, ``PermissionDeniedError``...) and,
for everything else, a ``GenericError`` whose message carries the HTTP status
(``Server returned non-2xx status code: 503 Service Unavailable``) or the transport failure
(``HttpError { kind: Connect ... }``). fsspec backends raise ``OSError`` subclasses with an errno,
or their HTTP client's response error with a ``status``. The retry wrapper and every boundary
above rely on the result: only transient faults come back ``retryable``.
"""

from __future__ import annotations

import asyncio
import errno
import re

import obstore.exceptions as obx

from depot.core.errors import (
    AlreadyExists,
    ConfigError,
    DepotError,
    InvalidArgument,
    InvalidPath,
    InvalidRange,
    IsADirectory,
    NoSpace,
    NotFound,
    PermissionDenied,
    ReadOnly,
    StaleVersion,
    Throttled,
    Timeout,
    Unavailable,
    Unsupported,
    error_for_http_status,
)

_STATUS_RE = re.compile(r"status code: (\d{3})")
_XML_TAIL_RE = re.compile(r":?\s*<\?xml.*$")
_URL_QUERY_RE = re.compile(r"(https?://[^\s?]+)\?\S*")
_MAX_MESSAGE = 400

_TIMEOUT_MARKERS = ("TimedOut", "timed out", "kind: Timeout", "deadline has elapsed")
_TRANSPORT_MARKERS = (
    "kind: Connect",
    "error sending request",
    "Connection refused",
    "connection reset",
    "Connection reset",
    "connection closed",
    "broken pipe",
    "kind: Decode",
    "kind: Body",
    "dns error",
    "IncompleteMessage",
)
_THROTTLE_MARKERS = ("SlowDown", "TooManyRequests", "Throttl", "RequestLimitExceeded")
_RANGE_MARKERS = ("InvalidRange", "Requested range was invalid", "Wanted range starting at")

_ERRNO_MAP: dict[int, type[DepotError]] = {
    errno.ENOENT: NotFound,
    errno.ENOTDIR: NotFound,
    errno.EACCES: PermissionDenied,
    errno.EPERM: PermissionDenied,
    errno.EROFS: ReadOnly,
    errno.EEXIST: AlreadyExists,
    errno.EISDIR: IsADirectory,
    errno.ENOSPC: NoSpace,
    errno.EDQUOT: NoSpace,
    errno.EINVAL: InvalidArgument,
    errno.ENAMETOOLONG: InvalidPath,
    errno.ENOTSUP: Unsupported,
    errno.ETIMEDOUT: Timeout,
    errno.ECONNREFUSED: Unavailable,
    errno.ECONNRESET: Unavailable,
    errno.ECONNABORTED: Unavailable,
    errno.EHOSTUNREACH: Unavailable,
    errno.ENETUNREACH: Unavailable,
    errno.ENETDOWN: Unavailable,
    errno.EPIPE: Unavailable,
    errno.EAGAIN: Throttled,
    errno.ESTALE: Unavailable,  # a stale NFS handle: the next attempt reopens the file
    errno.EIO: Unavailable,
}


def short_message(exc: BaseException) -> str:
    """The first line of a library message, without the response body obstore appends after
    it and without URL query strings (an Azure SAS token travels in one)."""
    text = str(exc).strip().split("\n", 1)[0]
    text = _XML_TAIL_RE.sub("", text)
    text = _URL_QUERY_RE.sub(r"\1?...", text).strip() or type(exc).__name__
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    return text


def http_status_of(message: str) -> int | None:
    """The HTTP status an obstore message reports, if any."""
    match = _STATUS_RE.search(message)
    return int(match.group(1)) if match else None


def _from_http_status(status: int, message: str, path: str | None) -> DepotError:
    if status in (429, 503) or (status >= 500 and _has(message, _THROTTLE_MARKERS)):
        return Throttled(message, path)
    if status == 408:
        return Timeout(message, path)
    return error_for_http_status(status, message, path)


def _has(text: str, markers: tuple[str, ...]) -> bool:
    return any(marker in text for marker in markers)


def _from_text(full: str, message: str, path: str | None) -> DepotError:
    """Classify an error we only know by its message (obstore ``GenericError``)."""
    status = http_status_of(full)
    if status is not None:
        if status == 416 or (400 <= status < 500 and _has(full, _RANGE_MARKERS)):
            return InvalidRange(message, path)
        return _from_http_status(status, message, path)
    if _has(full, _RANGE_MARKERS):
        return InvalidRange(message, path)
    if _has(full, _THROTTLE_MARKERS):
        return Throttled(message, path)
    if _has(full, _TIMEOUT_MARKERS):
        return Timeout(message, path)
    if _has(full, _TRANSPORT_MARKERS):
        return Unavailable(message, path)
    return DepotError(message, path)


def map_error(exc: BaseException, path: str | None = None) -> DepotError:
    """The ``DepotError`` that stands for ``exc`` (``exc`` itself if it already is one).

    Unknown faults map to the non-retryable ``DepotError`` base: retrying what we cannot
    classify hides bugs and multiplies load on a store that may be refusing us for a reason.
    """
    if isinstance(exc, DepotError):
        return exc
    message = short_message(exc)
    full = str(exc)
    if isinstance(exc, obx.BaseError):
        return _map_obstore(exc, full, message, path)
    if isinstance(exc, FileNotFoundError):
        return NotFound(message, path)
    if isinstance(exc, PermissionError):
        return PermissionDenied(message, path)
    if isinstance(exc, FileExistsError):
        return AlreadyExists(message, path)
    if isinstance(exc, IsADirectoryError):
        return IsADirectory(message, path)
    if isinstance(exc, NotADirectoryError):
        return NotFound(message, path)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return Timeout(message, path)
    if isinstance(exc, ConnectionError):
        return Unavailable(message, path)
    if isinstance(exc, OSError) and exc.errno in _ERRNO_MAP:
        return _ERRNO_MAP[exc.errno](message, path)
    if isinstance(exc, NotImplementedError):
        return Unsupported(message or "operation not supported by this store", path)
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    if isinstance(status, int) and 400 <= status < 600:
        return _from_http_status(status, message, path)
    if isinstance(exc, ValueError):
        if _has(full, _RANGE_MARKERS) or "range" in full.lower():
            return InvalidRange(message, path)
        if "path" in full.lower():
            return InvalidPath(message, path)
        return InvalidArgument(message, path)
    if isinstance(exc, OSError):
        return _from_text(full, message, path)
    return DepotError(message, path)


def _map_obstore(exc: obx.BaseError, full: str, message: str, path: str | None) -> DepotError:
    if isinstance(exc, obx.PreconditionError | obx.NotModifiedError):
        return StaleVersion(message, path)
    if isinstance(exc, obx.PermissionDeniedError | obx.UnauthenticatedError):
        return PermissionDenied(message, path)
    if isinstance(exc, obx.NotFoundError):
        return NotFound(message, path)
    if isinstance(exc, obx.AlreadyExistsError):
        return AlreadyExists(message, path)
    if isinstance(exc, obx.InvalidPathError):
        return InvalidPath(message, path)
    if isinstance(exc, obx.NotSupportedError):
        return Unsupported(message, path)
    if isinstance(exc, obx.UnknownConfigurationKeyError):
        return ConfigError(message, path)
    if isinstance(exc, obx.JoinError):
        return Unavailable(message, path)
    return _from_text(full, message, path)
