"""Mount and serve: the body of ``depot mount --foreground``.

One asyncio loop runs everything: pyfuse3's request tasks and the ``CacheClient`` they call.
On SIGTERM or SIGINT the mount is detached at once (new opens no longer reach it, the path shows
the directory underneath again), files still open are served for up to ``fuse.shutdown_grace``
seconds, then the process exits; a second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from depot.client.client import CacheClient
from depot.core.config import DepotConfig
from depot.core.errors import Unavailable
from depot.fuse.mounts import MountError, check_mount_point, detach, set_read_ahead
from depot.fuse.options import kernel_options

log = logging.getLogger(__name__)

# Called once: None when the mount is up, else the reason it failed.
ReadyFn = Callable[[str | None], None]


@dataclass
class MountRequest:
    mount_point: str
    config: DepotConfig
    endpoint: str | None = None
    kernel: set[str] = field(default_factory=set)


def import_pyfuse3() -> None:
    """Fail with a clear message when the FUSE library is missing."""
    try:
        import pyfuse3
        import pyfuse3.asyncio  # noqa: F401
    except ImportError as exc:
        raise MountError(
            f"FUSE support is not installed ({exc}): pip install 'depot[fuse]' "
            "(needs libfuse3: apt-get install fuse3 libfuse3-dev)"
        ) from None


def run(request: MountRequest, ready: ReadyFn | None = None) -> None:
    """Mount ``request.mount_point`` and serve it until it is unmounted or the process is signalled."""
    import_pyfuse3()
    asyncio.run(_serve(request, ready))


class _Shutdown:
    def __init__(self, mount_point: str, grace: float) -> None:
        self.mount_point = mount_point
        self.grace = grace
        self.signals = 0
        self.detached = False
        self.finished = False
        self.task: asyncio.Task[None] | None = None

    def terminate(self) -> None:
        import pyfuse3

        if not self.finished:
            self.finished = True
            pyfuse3.terminate()


async def _serve(request: MountRequest, ready: ReadyFn | None) -> None:
    import pyfuse3
    import pyfuse3.asyncio

    from depot.fuse.ops import DepotOperations

    pyfuse3.asyncio.enable()
    config = request.config
    settings = config.fuse
    mount_point = request.mount_point
    check_mount_point(mount_point)
    client = CacheClient(request.endpoint, config=config)
    try:
        if not await client.health():
            if not (client.ufs_fallback and config.mounts):
                raise Unavailable(
                    f"no worker answers at {client.endpoint} and no mounts are configured for "
                    "reading the under store directly; start one (depot up) or pass --endpoint"
                )
            log.warning(
                "no worker answers at %s: reading the under store directly until it does",
                client.endpoint,
            )
        page_size = await client.page_size()
        options = kernel_options(settings, request.kernel)
        ops = DepotOperations(client, config, page_size, writable="ro" not in options)
        try:
            pyfuse3.init(ops, mount_point, options)
        except RuntimeError as exc:
            raise MountError(f"cannot mount {mount_point}: {exc}") from None
    except BaseException:
        await client.close()
        raise
    loop = asyncio.get_running_loop()
    shutdown = _Shutdown(mount_point, settings.shutdown_grace)

    async def wind_down() -> None:
        shutdown.detached = await asyncio.to_thread(detach, mount_point)
        deadline = time.monotonic() + shutdown.grace
        if ops.open_files:
            log.info(
                "detached %s; serving %d open file(s) for up to %.0fs (signal again to stop now)",
                mount_point,
                ops.open_files,
                shutdown.grace,
            )
        while ops.open_files and time.monotonic() < deadline and not shutdown.finished:
            await asyncio.sleep(0.05)
        shutdown.terminate()

    def on_signal(signum: int) -> None:
        shutdown.signals += 1
        log.info("%s: unmounting %s", signal.Signals(signum).name, mount_point)
        if shutdown.signals > 1:
            shutdown.terminate()
        elif shutdown.task is None:
            shutdown.task = loop.create_task(wind_down())

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)
    async def when_serving() -> None:
        # The kernel sets the mount's read-ahead when it gets our INIT reply (to its 128 KiB
        # default): raise it after that, which a first request through the mount waits for.
        try:
            await asyncio.to_thread(os.statvfs, mount_point)
        except OSError as exc:
            log.warning("probing the new mount failed: %s", exc)
        ahead = set_read_ahead(mount_point, settings.read_ahead_kb)
        log.info(
            "mounted %s on %s (read-ahead %s KiB, blocks of %d MiB, %d MiB of memory)",
            client.endpoint,
            mount_point,
            ahead if ahead is not None else "?",
            ops.cache.block_size >> 20,
            settings.memory >> 20,
        )
        if ready is not None:
            ready(None)

    started = loop.create_task(when_serving())
    try:
        await pyfuse3.main(min_tasks=4, max_tasks=settings.concurrency)
        shutdown.finished = True
    finally:
        if not started.done():
            started.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if shutdown.task is not None and not shutdown.task.done():
            shutdown.task.cancel()
        await ops.aclose()
        # After our own detach the path may show another mount: never unmount it a second time.
        pyfuse3.close(unmount=not shutdown.detached)
        await client.close()
        log.info("unmounted %s", mount_point)


__all__ = ["MountRequest", "ReadyFn", "import_pyfuse3", "run"]
