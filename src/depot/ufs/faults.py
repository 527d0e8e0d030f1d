"""A wrapper that makes an under store fail or slow down on demand, for tests.

    store = FaultInjectingUnderStore(MemoryUnderStore())
    store.fail_next(2, Throttled("slow down"), ops={"get_range"})
    store.set_latency(0.05)

Failures are raised before the inner store is called, so a failed write changes nothing.
``calls`` counts every call per operation (failed ones included), which lets tests assert how
many times the store was really reached (retries, single flight, caching).
"""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass

from depot.core.errors import DepotError
from depot.core.types import Attributes
from depot.ufs.base import Buffer, ListPage, ObjectInfo, UnderStore

OPERATIONS = frozenset({"head", "get_range", "get", "list", "put", "put_multipart", "delete"})

ErrorSpec = BaseException | Callable[[], BaseException]


@dataclass(slots=True)
class _Fault:
    remaining: int
    error: ErrorSpec
    ops: frozenset[str]

    def make(self) -> BaseException:
        if isinstance(self.error, BaseException):
            if isinstance(self.error, DepotError):
                return type(self.error)(self.error.message, self.error.path)
            return copy.copy(self.error)
        return self.error()


def _ops(ops: Iterable[str] | None) -> frozenset[str]:
    chosen = OPERATIONS if ops is None else frozenset(ops)
    unknown = chosen - OPERATIONS
    if unknown:
        raise ValueError(f"unknown operations {sorted(unknown)}; known: {sorted(OPERATIONS)}")
    return chosen


class FaultInjectingUnderStore(UnderStore):
    """Wraps an ``UnderStore``; injects errors and latency, and counts calls."""

    def __init__(self, inner: UnderStore) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.supports_attributes = inner.supports_attributes
        self.calls: Counter[str] = Counter()
        self.injected = 0
        self._faults: list[_Fault] = []
        self._latency: dict[str, float] = {}

    def fail_next(self, count: int, error: ErrorSpec, *, ops: Iterable[str] | None = None) -> None:
        """Fail the next ``count`` calls of ``ops`` (default: every operation) with ``error``.

        ``error`` is an exception (a fresh copy is raised each time) or a factory of one.
        Faults queue up: a second ``fail_next`` applies once the first is used up.
        """
        if count < 0:
            raise ValueError("count must not be negative")
        if count:
            self._faults.append(_Fault(count, error, _ops(ops)))

    def set_latency(self, seconds: float, *, ops: Iterable[str] | None = None) -> None:
        """Delay every later call of ``ops`` by ``seconds`` (0 removes the delay)."""
        for op in _ops(ops):
            if seconds > 0:
                self._latency[op] = seconds
            else:
                self._latency.pop(op, None)

    def clear(self) -> None:
        """Drop pending faults and latency (counters are kept)."""
        self._faults.clear()
        self._latency.clear()

    @property
    def pending_faults(self) -> int:
        return sum(f.remaining for f in self._faults)

    async def _enter(self, op: str) -> None:
        self.calls[op] += 1
        delay = self._latency.get(op)
        if delay:
            await asyncio.sleep(delay)
        for fault in self._faults:
            if op in fault.ops and fault.remaining > 0:
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                self.injected += 1
                raise fault.make()

    async def head(self, key: str) -> ObjectInfo:
        await self._enter("head")
        return await self.inner.head(key)

    async def get_range(self, key: str, start: int, end: int, *, etag: str | None = None) -> Buffer:
        await self._enter("get_range")
        return await self.inner.get_range(key, start, end, etag=etag)

    async def get(self, key: str) -> Buffer:
        await self._enter("get")
        return await self.inner.get(key)

    async def list(
        self,
        prefix: str = "",
        *,
        delimiter: str | None = "/",
        token: str | None = None,
        limit: int = 1000,
    ) -> ListPage:
        await self._enter("list")
        return await self.inner.list(prefix, delimiter=delimiter, token=token, limit=limit)

    async def put(
        self, key: str, data: Buffer, *, attributes: Attributes | None = None
    ) -> ObjectInfo:
        await self._enter("put")
        return await self.inner.put(key, data, attributes=attributes)

    async def put_multipart(
        self,
        key: str,
        chunks: AsyncIterable[Buffer],
        *,
        part_size: int = 8 * 1024 * 1024,
        attributes: Attributes | None = None,
    ) -> ObjectInfo:
        await self._enter("put_multipart")
        return await self.inner.put_multipart(
            key, chunks, part_size=part_size, attributes=attributes
        )

    def check_attributes(self, key: str, attributes: Attributes) -> None:
        self.inner.check_attributes(key, attributes)

    async def delete(self, key: str) -> None:
        await self._enter("delete")
        await self.inner.delete(key)

    async def close(self) -> None:
        await self.inner.close()
