"""``depot mount``: the depot namespace as a POSIX file system (FUSE; writes with ``-o rw``).

- ``depot.fuse.ops``: the request handlers (pyfuse3 low-level API on the client's asyncio loop);
- ``depot.fuse.staging``: files being written, spooled locally and uploaded on close;
- ``depot.fuse.reader``: read-ahead, random-read detection and segment prefetch, pooled buffers;
- ``depot.fuse.inodes``: inode numbers and what is known of each;
- ``depot.fuse.errors``: depot errors as errno values;
- ``depot.fuse.mounts``: mount-point checks, unmount, the mount's kernel read-ahead;
- ``depot.fuse.serve`` / ``depot.fuse.supervise``: the mount process and its supervisor.

Importing this package does not import pyfuse3, so unmounting and the checks before a mount work
without it; see docs/fuse.md.
"""

from depot.fuse.errors import ERRNO_TABLE, errno_of
from depot.fuse.mounts import MountBusy, MountError, State, check_mount_point, state, unmount
from depot.fuse.options import kernel_options, parse_options
from depot.fuse.serve import MountRequest, run

__all__ = [
    "ERRNO_TABLE",
    "MountBusy",
    "MountError",
    "MountRequest",
    "State",
    "check_mount_point",
    "errno_of",
    "kernel_options",
    "parse_options",
    "run",
    "state",
    "unmount",
]
