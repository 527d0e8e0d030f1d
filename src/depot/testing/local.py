"""Run a real worker in a background thread: the fixture tests and benchmarks use."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from depot.core.config import DepotConfig, load_config
from depot.placement.membership import EmbeddedMembership, EmbeddedRegistry
from depot.worker.daemon import Worker


class LocalWorker:
    """A worker on 127.0.0.1 (port 0 by default) serving ``ufs_uri`` at ``/``, or ``mounts``.

    ``with LocalWorker(ufs_uri="file:///data", cache_dir=tmp) as w: w.endpoint``
    """

    def __init__(
        self,
        ufs_uri: str | None = None,
        cache_dir: str | Path = ".depot/cache",
        *,
        page_size: int | str = "4MiB",
        cache_size: int | str = "1GiB",
        metadata: str = "max-age=60s",
        mounts: list[Mapping[str, Any]] | None = None,
        port: int = 0,
        config: DepotConfig | None = None,
        extra: Mapping[str, Any] | None = None,
        registry: EmbeddedRegistry | None = None,
    ) -> None:
        """``registry``: workers given the same one form an in-process cluster (one ring, one
        job store), as with etcd. Give each its own ``cache_dir`` parent (the metadata store
        lives next to the cache dir)."""
        if config is None:
            mount_list = list(mounts or [])
            if ufs_uri is not None:
                mount_list.insert(0, {"path": "/", "ufs": ufs_uri, "metadata": metadata})
            overrides: dict[str, Any] = {
                "worker": {"host": "127.0.0.1", "port": port},
                "cache": {
                    "dirs": [{"path": str(Path(cache_dir)), "size": cache_size}],
                    "page_size": page_size,
                },
                "mounts": mount_list,
            }
            if extra:
                for key, value in extra.items():
                    overrides.setdefault(key, {}).update(value)
            config = load_config(environ={}, overrides=overrides)
        self.config = config
        membership = EmbeddedMembership(registry) if registry is not None else None
        self.worker = Worker(config, membership=membership)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def endpoint(self) -> str:
        return self.worker.endpoint

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def start(self) -> LocalWorker:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)

            async def main() -> None:
                self._stopped = asyncio.Event()
                try:
                    await self.worker.start()
                except BaseException as exc:
                    self._error = exc
                    ready.set()
                    return
                ready.set()
                await self._stopped.wait()
                await self.worker.stop()

            try:
                loop.run_until_complete(main())
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="depot-worker", daemon=True)
        self._thread.start()
        ready.wait(60)
        if self._error is not None:
            raise self._error
        return self

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the worker's loop (for tests that poke at its internals)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self._thread is None or self._loop is None or self._stopped is None:
            return
        self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(30)
        self._thread = None

    def __enter__(self) -> LocalWorker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
