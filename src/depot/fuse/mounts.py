"""Mount points: is it mounted, stale or free; unmounting; the kernel read-ahead of a mount.

Nothing here needs pyfuse3, so ``depot unmount`` and the checks before a mount work (and say
what is missing) on a machine without it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from depot.core.errors import DepotError, NotFound, PermissionDenied

FSTYPE = "fuse.depot"
MOUNTINFO = Path("/proc/self/mountinfo")
MNT_DETACH = 2
# What stat(2) answers on a FUSE mount whose filesystem process is gone.
_STALE_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


class MountError(DepotError):
    """A mount or unmount that cannot be done; the message says what to do."""

    errno_value = errno.EINVAL
    code = "MountError"
    http_status = 400


class MountBusy(MountError):
    errno_value = errno.EBUSY
    code = "MountBusy"


class State(enum.Enum):
    FREE = "free"  # nothing mounted: a directory to mount on
    MOUNTED = "mounted"  # a live mount
    STALE = "stale"  # a FUSE mount whose process died: stat gives ENOTCONN


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    fstype: str
    source: str
    device: str  # "major:minor"


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    if "\\" not in field:
        return field
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and len(field) - i >= 4 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_table(path: Path = MOUNTINFO) -> list[MountEntry]:
    """The mounts this process sees (``/proc/self/mountinfo``)."""
    entries: list[MountEntry] = []
    try:
        text = path.read_text()
    except OSError:
        return entries
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        tail = right.split()
        if len(fields) < 5 or len(tail) < 2:
            continue
        entries.append(MountEntry(_unescape(fields[4]), tail[0], _unescape(tail[1]), fields[2]))
    return entries


def find_mount(mount_point: str) -> MountEntry | None:
    """The topmost mount at ``mount_point``, if any."""
    found = None
    for entry in mount_table():
        if entry.mount_point == mount_point:
            found = entry
    return found


def canonical(mount_point: str | os.PathLike[str]) -> str:
    """An absolute path with symlinks of the parents resolved (the last part is not touched:
    stat on a stale mount point fails)."""
    path = os.path.abspath(os.fspath(mount_point))
    if path == "/":
        return path
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name)


def state(mount_point: str) -> State:
    """Whether ``mount_point`` is free, a live mount or a stale one.

    A FUSE mount is probed with ``statvfs``, which the kernel always sends to the filesystem
    process (a ``stat`` may be answered from cached attributes even when the process is gone).
    """
    entry = find_mount(mount_point)
    try:
        if entry is not None and entry.fstype.startswith("fuse"):
            os.statvfs(mount_point)
            return State.MOUNTED
        os.stat(mount_point)
    except OSError as exc:
        if exc.errno in _STALE_ERRNOS:
            return State.STALE
    return State.FREE


def unmount_hint(mount_point: str) -> str:
    return f"depot unmount {mount_point}"


def check_mount_point(mount_point: str) -> None:
    """Raise ``MountError`` unless ``mount_point`` is a directory that is free to mount on."""
    current = state(mount_point)
    if current is State.STALE:
        raise MountError(
            f"{mount_point} is a stale mount (its filesystem process is gone: 'Transport endpoint "
            f"is not connected'); clear it with: {unmount_hint(mount_point)} "
            f"(or: fusermount3 -u {mount_point})"
        )
    if current is State.MOUNTED:
        entry = find_mount(mount_point)
        what = f"a {entry.fstype} filesystem" if entry else "a filesystem"
        raise MountError(
            f"{mount_point} already has {what} mounted on it; unmount it first: "
            f"{unmount_hint(mount_point)}"
        )
    if not os.path.exists(mount_point):
        raise NotFound("mount point does not exist (create the directory first)", mount_point)
    if not os.path.isdir(mount_point):
        raise MountError(f"mount point is not a directory: {mount_point}")
    if not os.access(mount_point, os.R_OK | os.W_OK | os.X_OK) and os.geteuid() != 0:
        raise PermissionDenied("no write access to the mount point", mount_point)


def _libc_umount(mount_point: str, flags: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.umount2(os.fsencode(mount_point), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), mount_point)


def _fusermount() -> str | None:
    return shutil.which("fusermount3") or shutil.which("fusermount")


def unmount(mount_point: str, *, lazy: bool = False) -> None:
    """Unmount a depot (or any FUSE) mount, live or stale.

    A live mount with open files is busy: ``MountBusy`` unless ``lazy``, which detaches the mount
    at once (new opens no longer reach it) while open files keep working until they are closed.
    """
    current = state(mount_point)
    if current is State.FREE:
        entry = find_mount(mount_point)
        if entry is None:
            raise MountError(f"{mount_point} is not mounted")
        if not entry.fstype.startswith("fuse"):
            raise MountError(f"{mount_point} is a {entry.fstype} mount, not a depot mount")
    if current is State.STALE:
        lazy = True  # nothing can be open on a dead filesystem that a detach would hurt
    try:
        if os.geteuid() == 0:
            _libc_umount(mount_point, MNT_DETACH if lazy else 0)
            return
        tool = _fusermount()
        if tool is None:
            raise MountError("fusermount3 not found: install the fuse3 package")
        args = [tool, "-u", *(["-z"] if lazy else []), mount_point]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            message = proc.stderr.strip() or f"{tool} exited with {proc.returncode}"
            if "busy" in message.lower():
                raise OSError(errno.EBUSY, message, mount_point)
            raise MountError(message)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise MountBusy(
                f"{mount_point} is busy (files are open or a process has its working directory "
                f"there); detach it now and let open files finish with: "
                f"depot unmount --lazy {mount_point}"
            ) from None
        if exc.errno == errno.EPERM:
            raise PermissionDenied("not allowed to unmount", mount_point) from None
        if exc.errno == errno.EINVAL:
            raise MountError(f"{mount_point} is not mounted") from None
        raise


def detach(mount_point: str) -> bool:
    """Lazily detach ``mount_point`` (what a filesystem does to itself on SIGTERM); False on failure."""
    try:
        unmount(mount_point, lazy=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def bdi_path(mount_point: str) -> Path | None:
    """The backing-device-info directory of a mount (where ``read_ahead_kb`` lives).

    Found from the mount table, never by ``stat`` on the mount point: the filesystem process
    calls this before it serves requests, and a ``stat`` would wait on itself.
    """
    entry = find_mount(mount_point)
    if entry is None:
        return None
    return Path("/sys/class/bdi") / entry.device


def set_read_ahead(mount_point: str, kib: int) -> int | None:
    """Set the kernel read-ahead of the mount; the value in force, or None if it cannot be read."""
    bdi = bdi_path(mount_point)
    if bdi is None:
        return None
    path = bdi / "read_ahead_kb"
    try:
        path.write_text(f"{kib}\n")
    except OSError:
        pass  # not root: the kernel default (128 KiB) stays
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


__all__ = [
    "FSTYPE",
    "MountBusy",
    "MountEntry",
    "MountError",
    "State",
    "canonical",
    "check_mount_point",
    "detach",
    "find_mount",
    "mount_table",
    "set_read_ahead",
    "state",
    "unmount",
]
