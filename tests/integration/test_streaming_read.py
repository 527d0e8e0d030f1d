"""A real worker over HTTP with a slow under store: a cold 4 KiB read is answered while the rest
of its page is still on its way, and a page that breaks off mid-body never reaches a reader as
a short or wrong answer."""

from __future__ import annotations

import asyncio
import http.client
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from depot.core.errors import Unavailable
from depot.testing.local import LocalWorker
from depot.ufs import FaultInjectingUnderStore

PAGE = 1024 * 1024
CHUNK = 64 * 1024


@dataclass
class Slow:
    worker: LocalWorker
    ufs: FaultInjectingUnderStore
    data: bytes

    def get(self, rng: str | None = None) -> http.client.HTTPResponse:
        parts = urlsplit(self.worker.endpoint)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
        conn.request("GET", f"/api/v1/read?path={quote('/f.bin', safe='')}",
                     headers={"Range": rng} if rng else {})
        return conn.getresponse()

    def hold(self, after: int) -> asyncio.Event:
        async def make() -> asyncio.Event:
            return self.ufs.hold_streams(after)
        gate: asyncio.Event = self.worker.call(make())
        return gate

    def open_gate(self, gate: asyncio.Event) -> None:
        self.worker.loop.call_soon_threadsafe(gate.set)


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[Slow]:
    root = tmp_path / "ufs"
    root.mkdir()
    data = os.urandom(PAGE)  # one page: no read-ahead, so UFS reads count fills of it
    (root / "f.bin").write_bytes(data)
    with LocalWorker(root.as_uri(), tmp_path / "cache", page_size=PAGE, cache_size="64MiB") as w:
        service = w.worker.service
        assert service is not None
        mount = service.mounts.mounts[0]
        ufs = FaultInjectingUnderStore(service.store_for(mount))
        ufs.stream_chunks(CHUNK)
        service._stores[mount.path] = ufs
        yield Slow(w, ufs, data)
        w.loop.call_soon_threadsafe(ufs.clear)  # opens any gate left closed


def test_cold_4k_read_is_answered_before_its_page_is_in(slow: Slow) -> None:
    gate = slow.hold(after=CHUNK)  # the store sends 64 KiB of the page, then stalls
    resp = slow.get("bytes=0-4095")
    assert resp.status == 206 and resp.getheader("X-Depot-Cache") == "miss"
    assert resp.read() == slow.data[:4096]
    assert slow.ufs.calls["get_range"] == 1  # and it is still stalled
    slow.open_gate(gate)
    for _ in range(200):  # the whole page is cached once in, and read from there after
        resp = slow.get("bytes=100-199")
        hit = resp.getheader("X-Depot-Cache") == "hit"
        assert resp.read() == slow.data[100:200]
        if hit:
            break
    assert hit and slow.ufs.calls["get_range"] == 1


def test_a_page_broken_off_mid_body_is_never_a_short_answer(slow: Slow) -> None:
    async def arm() -> None:
        slow.ufs.fail_stream(after=2 * CHUNK, error=Unavailable("connection reset by the store"))
    slow.worker.call(arm())
    gate = slow.hold(after=2 * CHUNK)
    # Bytes the store sent before the break are right and answered at once.
    resp = slow.get("bytes=0-4095")
    assert resp.status == 206 and resp.read() == slow.data[:4096]
    # A whole-page read has had its head and first bytes when the store breaks off: the answer
    # is cut, so the client sees an incomplete body (an error), never a short success.
    whole = slow.get("bytes=0-1048575")
    assert whole.status == 206 and whole.getheader("Content-Length") == str(PAGE)
    slow.open_gate(gate)
    with pytest.raises(http.client.IncompleteRead) as cut:
        whole.read()
    assert cut.value.partial == slow.data[: len(cut.value.partial)]
    # Nothing was cached; the next read fetches the page again, whole and right.
    resp = slow.get("bytes=0-1048575")
    assert resp.status == 206 and resp.read() == slow.data[:PAGE]
    assert slow.ufs.calls["get_range"] == 2


def test_a_break_before_a_range_gets_an_error_status(slow: Slow) -> None:
    async def arm() -> None:
        slow.ufs.fail_stream(after=0, error=Unavailable("the store is down"))
    slow.worker.call(arm())
    resp = slow.get("bytes=0-4095")
    assert resp.status == 503, resp.read()
    resp.read()
    resp = slow.get("bytes=0-4095")
    assert resp.status == 206 and resp.read() == slow.data[:4096]
