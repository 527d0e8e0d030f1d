"""``rclone mount --vfs-cache-mode full`` of a local directory, as the peer of ``depot mount``.

Used by ``bench/fuse_bench.py``: the remote is given on the command line (``:local:/dir``, no
config file, ``--config /dev/null``), so rclone reads the very directory depot's worker uses as
its under store. rclone runs in the foreground as a child process in a session of its own (a
Ctrl-C of the bench does not reach it; the bench unmounts it in order), and :meth:`stop` is
safe to call on every exit path: ``fusermount3 -u``, then a lazy ``-uz`` if the mount is busy,
then SIGTERM (rclone unmounts on it), SIGKILL, and ``umount -l`` if the mount is still listed.

The VFS cache (``--cache-dir``) outlives the process: a second mount with the same cache dir
finds the files read through the first (rclone checks size and modification time against the
remote), which is how the bench measures first byte of cached files with a kernel that holds
nothing of them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from depot.fuse.mounts import canonical, find_mount, set_read_ahead

RCLONE = "/usr/bin/rclone"

#: The flags of every mount besides the remote, the mount point and --cache-dir. Defaults of
#: rclone 1.60 are spelled out where the bench depends on them.
FLAGS: tuple[str, ...] = (
    "--vfs-cache-mode", "full",  # whole files (sparse, as read) in --cache-dir
    # rclone's docs recommend it over local: without it every open of a cached file hashes the
    # whole remote file (MD5 of the local file) to compare fingerprints.
    "--vfs-fast-fingerprint",
    "--read-only",  # like depot mount's default (ro)
    "--dir-cache-time", "600s",  # depot's worker: metadata max-age=600s
    "--attr-timeout", "5s",  # depot mount: fuse.attr_timeout 5 s (rclone's default: 1 s)
    "--vfs-read-chunk-size", "128Mi",  # rclone's default: ranged reads of the remote
    "--buffer-size", "16Mi",  # rclone's default: read-ahead buffer per open file
    "--vfs-read-ahead", "128Mi",  # full mode: download this far ahead of sequential readers
    "--max-read-ahead", "1Mi",  # FUSE max_readahead; read_ahead_kb set to depot's 1024 too
    "--vfs-cache-max-age", "1h",  # default; nothing is evicted during a run
    "--vfs-cache-max-size", "off",  # default
)

READ_AHEAD_KB = 1024  # depot mount's default fuse.read_ahead_kb, set on rclone's bdi as well


def version(binary: str = RCLONE) -> str:
    try:
        out = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=30)
    except OSError:
        return "rclone (version unknown)"
    return (out.stdout.splitlines() or ["rclone (version unknown)"])[0].strip()


def flags_note(extra: tuple[str, ...] = ()) -> str:
    pairs: list[str] = []
    args = [*FLAGS, *extra]
    i = 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            pairs.append(f"{args[i]} {args[i + 1]}")
            i += 2
        else:
            pairs.append(args[i])
            i += 1
    return " ".join(pairs)


class RcloneMount:
    """One ``rclone mount :local:REMOTE POINT`` process; a context manager that always unmounts."""

    def __init__(self, remote: Path, point: Path, cache_dir: Path, log: Path, *,
                 binary: str = RCLONE, extra: tuple[str, ...] = ()) -> None:
        self.remote = remote
        self.point = point
        self.cache_dir = cache_dir
        self.log = log
        self.binary = binary
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.read_ahead_kb: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def mounted(self) -> bool:
        return find_mount(canonical(self.point)) is not None

    def start(self, timeout: float = 60) -> RcloneMount:
        self.point.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "mount", f":local:{self.remote}", str(self.point),
                "--config", "/dev/null", "--cache-dir", str(self.cache_dir),
                *FLAGS, *self.extra, "--log-file", str(self.log), "-v"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.mounted():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text()[-2000:] if self.log.exists() else ""
                self.stop()
                raise RuntimeError(f"rclone mount did not come up (exit {self.proc.returncode}):"
                                   f"\n{tail}")
            time.sleep(0.05)
        os.statvfs(self.point)  # answered by rclone: it serves requests now
        self.read_ahead_kb = set_read_ahead(canonical(self.point), READ_AHEAD_KB)
        return self

    def stop(self) -> None:
        """Unmount and end the process; idempotent, never raises for an already gone mount."""
        point = str(self.point)
        fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
        if self.mounted() and fusermount is not None:
            for flags in ("-u", "-uz"):
                done = subprocess.run([fusermount, flags, point], capture_output=True, timeout=60)
                if done.returncode == 0 or not self.mounted():
                    break
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        if self.mounted():
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=60)

    def __enter__(self) -> RcloneMount:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def cached_bytes(cache_dir: Path) -> int:
    """Bytes the VFS cache holds on disk (allocated blocks: its files are sparse)."""
    total = 0
    for root, _dirs, names in os.walk(cache_dir / "vfs"):
        for name in names:
            total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


__all__ = ["FLAGS", "RCLONE", "RcloneMount", "cached_bytes", "flags_note", "version"]
