"""depot errors as POSIX errno values: what a FUSE request answers when a call fails.

Every ``DepotError`` already carries an errno; a few are changed here because a file-system call
must answer with a value that programs expect from ``read``/``open``/``stat``: an unreachable
worker or store is ``EIO`` (not ``EHOSTUNREACH``), a throttled store is ``EIO`` after the client's
retries (``EAGAIN`` would make a blocking ``read`` look non-blocking), a corrupt page is ``EIO``.
"""

from __future__ import annotations

import errno
import logging

from depot.core.errors import (
    Corrupted,
    DepotError,
    RequestTooLarge,
    Throttled,
    Timeout,
    Unavailable,
)

log = logging.getLogger(__name__)

# Where a file-system call answers other than the error's own errno. Most specific first: the
# first class an error is an instance of gives its errno (Timeout is an Unavailable).
ERRNO_TABLE: tuple[tuple[type[DepotError], int], ...] = (
    (Timeout, errno.ETIMEDOUT),
    (Throttled, errno.EIO),
    (Unavailable, errno.EIO),
    (Corrupted, errno.EIO),
    (RequestTooLarge, errno.EINVAL),
)


def errno_of(error: BaseException) -> int:
    """The errno a FUSE request answers for ``error`` (never 0)."""
    if isinstance(error, DepotError):
        for cls, value in ERRNO_TABLE:
            if isinstance(error, cls):
                return value
        return error.errno_value or errno.EIO
    if isinstance(error, TimeoutError):
        return errno.ETIMEDOUT
    if isinstance(error, OSError) and isinstance(error.errno, int) and error.errno > 0:
        return error.errno
    return errno.EIO


__all__ = ["ERRNO_TABLE", "errno_of"]
