"""``depot mount --supervise``: keep a mount alive across crashes of its filesystem process.

The supervisor runs the filesystem as a child process. When the child dies (killed, crashed: any
exit other than a clean one after an unmount) the mount point is left stale; the supervisor
detaches it and starts a new child, after a back-off that grows from 1 s to 30 s and resets once
a child has lived for a minute. A clean exit of the child (``depot unmount``) ends the supervisor;
SIGTERM/SIGINT to the supervisor stops the child cleanly (unmounting) and then itself.

Files that were open when the child died are not carried over (they answer ``ENOTCONN`` /
``EIO``): a new process cannot take over the kernel's open files. New opens work again once the
mount is back.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

from depot.fuse.mounts import State, detach, state
from depot.fuse.serve import ReadyFn

log = logging.getLogger(__name__)

READY_FD_ENV = "DEPOT_MOUNT_READY_FD"
READY = "ok"
READY_TIMEOUT = 120.0
_HEALTHY_AFTER = 60.0


def read_ready(fd: int, timeout: float = READY_TIMEOUT) -> str:
    """What a child reported on its readiness pipe ('ok' or an error), read until EOF."""
    chunks = []
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return f"the mount process did not report within {timeout:.0f}s"
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace").strip()


def report_ready(message: str | None) -> None:
    """Tell the parent (``depot mount`` in the background, or a supervisor) how mounting went."""
    fd_text = os.environ.pop(READY_FD_ENV, None)
    if not fd_text:
        return
    try:
        with os.fdopen(int(fd_text), "wb") as pipe:
            pipe.write((READY if message is None else message).encode())
    except (OSError, ValueError):
        pass


def start(command: Sequence[str], **kwargs: Any) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``command`` with a readiness pipe; the process and the pipe's read end."""
    read_fd, write_fd = os.pipe()
    env = dict(kwargs.pop("env", None) or os.environ)
    env[READY_FD_ENV] = str(write_fd)
    try:
        proc = subprocess.Popen(list(command), pass_fds=(write_fd,), env=env, **kwargs)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return proc, read_fd


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Wait for ``proc`` to end: SIGTERM if it is still running, SIGKILL if it does not stop."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def supervise(
    command: Sequence[str],
    mount_point: str,
    ready: ReadyFn | None = None,
    *,
    backoff_max: float = 30.0,
) -> int:
    """Run ``command`` (a ``depot mount --foreground``) and restart it when it dies; the exit code."""
    stop = threading.Event()
    current: list[subprocess.Popen[bytes]] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()
        for proc in current:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    delay = 1.0
    first = True
    while not stop.is_set():
        started = time.monotonic()
        proc, ready_fd = start(command)
        current[:] = [proc]
        message = read_ready(ready_fd)
        if message != "ok":
            stop_process(proc)
            reason = message or f"the filesystem process exited with {proc.returncode}"
            if first:
                if ready is not None:
                    ready(reason)
                return 1
            log.warning("remounting %s failed: %s", mount_point, reason)
        else:
            if first and ready is not None:
                ready(None)
            first = False
            log.info("filesystem process %d serves %s", proc.pid, mount_point)
            code = proc.wait()
            if stop.is_set():
                break
            if code == 0 and state(mount_point) is not State.MOUNTED:
                log.info("%s was unmounted: supervisor exits", mount_point)
                return 0
            log.warning(
                "filesystem process %d of %s died (exit %s); remounting in %.0fs",
                proc.pid,
                mount_point,
                code,
                delay,
            )
        if state(mount_point) is not State.FREE:
            detach(mount_point)
        if time.monotonic() - started > _HEALTHY_AFTER:
            delay = 1.0
        stop.wait(delay)
        delay = min(backoff_max, delay * 2)
    for proc in current:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


__all__ = ["READY", "READY_FD_ENV", "read_ready", "report_ready", "start", "stop_process", "supervise"]
