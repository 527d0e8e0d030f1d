"""Retries of transient under-store faults, with capped exponential backoff and full jitter.

Only errors marked ``retryable`` (``Throttled``, ``Unavailable``, ``Timeout``) are retried,
never ``StaleVersion`` (the object changed: the caller must re-read its metadata, not repeat
the read) and never ``NotFound``/``PermissionDenied``/``InvalidArgument``. A call makes at most
``retries + 1`` attempts; before attempt ``n`` (n >= 1) it sleeps a uniform random time in
``[0, min(backoff_max, backoff_base * 2**(n-1))]`` ("full jitter"), so many workers that hit
the same throttled store do not retry in lockstep.

``get_range_stream`` is retried like ``get_range`` when it fails before its first chunk. A
stream pinned to a version (``etag``) that fails later is resumed where it broke off (the rest
is of the same version or refused); an unpinned one is not, as the rest could be of another
version.

``put_multipart`` is not retried: its chunk stream is consumed by the first attempt. The
obstore backends retry individual parts themselves instead.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from typing import TypeVar

from depot.core.config import UfsConfig
from depot.core.errors import DepotError, StaleVersion
from depot.core.types import Attributes
from depot.ufs.base import Buffer, ListPage, ObjectInfo, UnderStore

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Called before each retry with (operation, key, error, attempt number that failed, delay).
RetryHook = Callable[[str, str, DepotError, int, float], None]


def is_retryable(exc: BaseException) -> bool:
    """Whether a fresh attempt of the same call may succeed."""
    return isinstance(exc, DepotError) and exc.retryable and not isinstance(exc, StaleVersion)


class RetryingUnderStore(UnderStore):
    """Wraps another ``UnderStore`` and retries its transient failures."""

    def __init__(
        self,
        inner: UnderStore,
        retries: int = 5,
        backoff_base: float = 0.05,
        backoff_max: float = 5.0,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        on_retry: RetryHook | None = None,
    ) -> None:
        if retries < 0 or backoff_base < 0 or backoff_max < 0:
            raise ValueError("retries and backoff times must not be negative")
        self.inner = inner
        self.uri = inner.uri
        self.supports_attributes = inner.supports_attributes
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.retried = 0  # retries made so far, for metrics and tests
        self._sleep = sleep
        self._rng = rng
        self._on_retry = on_retry

    @classmethod
    def from_config(
        cls, inner: UnderStore, config: UfsConfig, **kwargs: object
    ) -> RetryingUnderStore:
        return cls(
            inner,
            config.retries,
            config.backoff_base,
            config.backoff_max,
            **kwargs,  # type: ignore[arg-type]
        )

    def __repr__(self) -> str:
        return f"RetryingUnderStore({self.inner!r}, retries={self.retries})"

    def backoff(self, attempt: int) -> float:
        """The sleep before retry number ``attempt + 1`` (``attempt`` counts from 0)."""
        cap = min(self.backoff_max, self.backoff_base * (2.0 ** min(attempt, 62)))
        return self._rng() * cap

    async def _run(self, op: str, key: str, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await call()
            except DepotError as exc:
                if attempt >= self.retries or not is_retryable(exc):
                    raise
                attempt += 1
                await self._before_retry(op, key, exc, attempt)

    async def _before_retry(self, op: str, key: str, exc: DepotError, attempt: int) -> None:
        """Count, report and sleep before retry number ``attempt`` (from 1)."""
        delay = self.backoff(attempt - 1)
        self.retried += 1
        log.debug(
            "ufs %s %s failed (%s), retry %d/%d in %.3fs",
            op,
            key,
            exc.code,
            attempt,
            self.retries,
            delay,
        )
        if self._on_retry is not None:
            self._on_retry(op, key, exc, attempt, delay)
        await self._sleep(delay)

    async def head(self, key: str) -> ObjectInfo:
        return await self._run("head", key, lambda: self.inner.head(key))

    async def get_range(self, key: str, start: int, end: int, *, etag: str | None = None) -> Buffer:
        return await self._run(
            "get_range", key, lambda: self.inner.get_range(key, start, end, etag=etag)
        )

    async def get_range_stream(
        self, key: str, start: int, end: int, *, etag: str | None = None
    ) -> AsyncGenerator[Buffer, None]:
        attempt = 0
        pos = start
        while True:
            failure: DepotError | None = None
            chunks = self.inner.get_range_stream(key, pos, end, etag=etag)
            try:
                while True:
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        return
                    except DepotError as exc:
                        resumable = pos == start or etag is not None
                        if attempt >= self.retries or not resumable or not is_retryable(exc):
                            raise
                        attempt += 1
                        failure = exc
                        break
                    pos += memoryview(chunk).nbytes
                    yield chunk
            finally:
                await chunks.aclose()
            await self._before_retry("get_range_stream", key, failure, attempt)

    async def get(self, key: str) -> Buffer:
        return await self._run("get", key, lambda: self.inner.get(key))

    async def list(
        self,
        prefix: str = "",
        *,
        delimiter: str | None = "/",
        token: str | None = None,
        limit: int = 1000,
    ) -> ListPage:
        return await self._run(
            "list",
            prefix,
            lambda: self.inner.list(prefix, delimiter=delimiter, token=token, limit=limit),
        )

    async def put(
        self, key: str, data: Buffer, *, attributes: Attributes | None = None
    ) -> ObjectInfo:
        return await self._run(
            "put", key, lambda: self.inner.put(key, data, attributes=attributes)
        )

    async def put_multipart(
        self,
        key: str,
        chunks: AsyncIterable[Buffer],
        *,
        part_size: int = 8 * 1024 * 1024,
        attributes: Attributes | None = None,
    ) -> ObjectInfo:
        return await self.inner.put_multipart(
            key, chunks, part_size=part_size, attributes=attributes
        )

    def check_attributes(self, key: str, attributes: Attributes) -> None:
        self.inner.check_attributes(key, attributes)

    async def delete(self, key: str) -> None:
        await self._run("delete", key, lambda: self.inner.delete(key))

    async def close(self) -> None:
        await self.inner.close()
