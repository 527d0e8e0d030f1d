"""Single flight: concurrent callers asking for the same key share one execution."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Run ``fn`` once per key at a time; late callers await the first caller's result.

    The shared task is shielded, so one caller being cancelled does not fail the others.
    """

    def __init__(self) -> None:
        self._inflight: dict[Hashable, asyncio.Future[T]] = {}
        self.shared = 0

    def __len__(self) -> int:
        return len(self._inflight)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._inflight

    async def do(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        fut = self._inflight.get(key)
        if fut is not None:
            self.shared += 1
            return await asyncio.shield(fut)
        task: asyncio.Future[T] = asyncio.ensure_future(fn())
        self._inflight[key] = task

        def _done(_: asyncio.Future[T]) -> None:
            if self._inflight.get(key) is task:
                del self._inflight[key]
            if not task.cancelled():
                task.exception()  # mark retrieved; callers see it through await

        task.add_done_callback(_done)
        return await asyncio.shield(task)
