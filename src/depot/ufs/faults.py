"""A wrapper that makes an under store fail or slow down on demand, for tests.

    store = FaultInjectingUnderStore(MemoryUnderStore())
    store.fail_next(2, Throttled("slow down"), ops={"get_range"})
    store.set_latency(0.05)

Failures are raised before the inner store is called, so a failed write changes nothing.
``calls`` counts every call per operation (failed ones included), which lets tests assert how
many times the store was really reached (retries, single flight, caching).

A streamed range (``get_range_stream``) is a ``get_range`` call: it counts as one (and also
under ``calls["get_range_stream"]``), and ``get_range`` faults and latency hit it before its
first byte. Streams can also be shaped like a slow object store's body:

    store.stream_chunks(64 * 1024, delay=0.05)   # 64 KiB at once, then one more every 50 ms
    gate = store.hold_streams(after=64 * 1024)   # ...or stop after 64 KiB until gate.set()
    store.fail_stream(after=64 * 1024, error=Unavailable("reset"))  # the next one breaks there
"""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable
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
        self._stream_chunk = 0
        self._stream_delay = 0.0
        self._stream_gates: list[tuple[int, asyncio.Event]] = []
        self._stream_faults: list[tuple[int, ErrorSpec]] = []

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

    def stream_chunks(self, chunk_size: int, *, delay: float = 0.0) -> None:
        """Hand out streamed ranges in chunks of ``chunk_size`` bytes, each one after the first
        ``delay`` seconds after the one before (0: the whole range at once, the default)."""
        if chunk_size < 0 or delay < 0:
            raise ValueError("chunk size and delay must not be negative")
        self._stream_chunk = chunk_size
        self._stream_delay = delay

    def hold_streams(self, after: int) -> asyncio.Event:
        """Make every later stream stop once ``after`` bytes of it are out, until the returned
        event is set. Streams are cut in chunks ending there (see ``stream_chunks``)."""
        gate = asyncio.Event()
        self._stream_gates.append((after, gate))
        return gate

    def fail_stream(self, after: int, error: ErrorSpec, *, count: int = 1) -> None:
        """Make the next ``count`` streams raise ``error`` once ``after`` bytes of each are out
        (a connection lost mid-body)."""
        if after < 0 or count < 0:
            raise ValueError("after and count must not be negative")
        self._stream_faults.extend([(after, error)] * count)

    def clear(self) -> None:
        """Drop pending faults, latency and stream shaping (counters are kept)."""
        self._faults.clear()
        self._latency.clear()
        self._stream_chunk = 0
        self._stream_delay = 0.0
        for _, gate in self._stream_gates:
            gate.set()  # nothing waits forever on a gate dropped here
        self._stream_gates.clear()
        self._stream_faults.clear()

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

    async def get_range_stream(
        self, key: str, start: int, end: int, *, etag: str | None = None
    ) -> AsyncGenerator[Buffer, None]:
        self.calls["get_range_stream"] += 1
        fault = self._stream_faults.pop(0) if self._stream_faults else None
        # Through get_range: its faults and latency, and overrides of subclasses, apply.
        data = memoryview(await self.get_range(key, start, end, etag=etag)).cast("B")
        cuts = {len(data)}
        if self._stream_chunk:
            cuts.update(range(self._stream_chunk, len(data), self._stream_chunk))
        cuts.update(after for after, _ in self._stream_gates if 0 < after < len(data))
        if fault is not None and fault[0] < len(data):
            cuts.add(fault[0])
        pos = 0
        for cut in sorted(cuts):
            if pos and self._stream_delay:
                await asyncio.sleep(self._stream_delay)
            for after, gate in list(self._stream_gates):
                if after == pos:
                    await gate.wait()
            if fault is not None and pos >= fault[0]:
                raise _Fault(1, fault[1], frozenset()).make()
            if cut > pos:
                yield data[pos:cut]
            pos = cut

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
