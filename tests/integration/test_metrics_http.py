"""``GET /metrics`` of a real worker: Prometheus text that parses, counters that move by what the
requests did, and write-back gauges that drain to zero after a sync."""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from depot.testing.local import LocalWorker

PAGE = 64 * 1024
SIZE = 5 * PAGE + 123  # six pages
DURATION = "depot_http_request_duration_seconds"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Api:
    """Plain http.client requests, so these tests do not depend on depot's own client."""

    def __init__(self, endpoint: str) -> None:
        parts = urlsplit(endpoint)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80

    def request(self, method: str, target: str, body: bytes | None = None
                ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, target, body=body)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def json(self, target: str, method: str = "GET") -> Any:
        status, _, body = self.request(method, target)
        assert status == 200, body
        return json.loads(body)

    def read(self, path: str) -> bytes:
        status, _, body = self.request("GET", f"/api/v1/read?path={quote(path, safe='')}")
        assert status == 200, body
        return body

    def scrape(self) -> Samples:
        """Every sample of ``/metrics`` by (name, labels); parsing it is part of the test."""
        status, headers, body = self.request("GET", "/metrics")
        assert status == 200, body
        assert headers["content-type"].startswith("text/plain; version=")
        out: Samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                assert key not in out, f"duplicate sample {key}"
                out[key] = sample.value
        return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def wait_for(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "ufs"
    root.mkdir()
    (root / "a.bin").write_bytes(os.urandom(SIZE))
    return root


@pytest.fixture
def worker(tmp_path: Path, data_dir: Path) -> Iterator[LocalWorker]:
    with LocalWorker(data_dir.as_uri(), tmp_path / "cache", page_size=PAGE, cache_size="64MiB",
                     metadata="always") as w:
        yield w


def test_read_twice_moves_the_counters(worker: LocalWorker, data_dir: Path) -> None:
    api = Api(worker.endpoint)
    expected = (data_dir / "a.bin").read_bytes()
    before = api.scrape()
    assert value(before, "depot_cache_hits_total") == 0
    assert value(before, "depot_cache_misses_total") == 0

    assert api.read("/a.bin") == expected
    # Filled pages are written to the page store in the background.
    wait_for(lambda: api.json("/api/v1/cache/stats")["pages"] == 6, "six cached pages")
    assert api.read("/a.bin") == expected
    after = api.scrape()

    def moved(name: str, **labels: str) -> float:
        # A route's series appears with its first request.
        return value(after, name, **labels) - before.get((name, frozenset(labels.items())), 0)

    assert moved("depot_cache_misses_total") == 6  # first read: every page from the UFS
    assert moved("depot_cache_hits_total") == 6  # second read: every page from the cache
    assert moved("depot_read_bytes_total", source="ufs") == SIZE
    assert moved("depot_read_bytes_total", source="cache") == SIZE
    assert moved("depot_ufs_reads_total") == 6
    assert value(after, "depot_ufs_inflight_reads") == 0
    assert moved(DURATION + "_count", route="/api/v1/read") == 2
    assert value(after, DURATION + "_bucket", route="/api/v1/read", le="+Inf") == 2
    assert moved(DURATION + "_count", route="/metrics") == 1  # the first scrape, timed

    # The same numbers as the stats document and the info route.
    stats = api.json("/api/v1/cache/stats")
    assert value(after, "depot_cache_pages") == stats["pages"] == 6
    assert value(after, "depot_cache_used_bytes") == stats["used_bytes"] > 0
    assert value(after, "depot_cache_capacity_bytes") == stats["capacity_bytes"] == 64 * 1024**2
    info = api.json("/api/v1/info")
    assert value(after, "depot_worker_info", worker_id=info["worker_id"],
                 version=info["version"]) == 1


def test_metrics_route_and_unknown_paths(worker: LocalWorker) -> None:
    api = Api(worker.endpoint)
    assert api.request("POST", "/metrics")[0] == 405
    status, headers, body = api.request("HEAD", "/metrics")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    for i in range(3):  # raw paths never become labels: one "other" series
        assert api.request("GET", f"/no/such/route/{i}")[0] == 404
    samples = api.scrape()
    assert value(samples, DURATION + "_count", route="other") == 3
    assert not [k for k in samples if k[0].startswith(DURATION)
                and any(v.startswith("/no/") for _, v in k[1])]


def test_writeback_dirty_bytes_drain_after_sync(tmp_path: Path) -> None:
    ufs = tmp_path / "ufs"
    ufs.mkdir()
    mounts = [{"path": "/", "ufs": ufs.as_uri(), "write_mode": "write-back"}]
    # 512 KiB/s upload: a 2 MiB write stays dirty for about three seconds.
    with LocalWorker(None, tmp_path / "cache", page_size=PAGE, mounts=mounts,
                     extra={"writeback": {"bandwidth": "512KiB"}}) as w:
        api = Api(w.endpoint)
        data = os.urandom(2 * 1024 * 1024 + 17)
        status, _, body = api.request("PUT", "/api/v1/write?path=%2Fck%2Fstep1.bin", data)
        assert status == 200, body
        dirty = api.scrape()
        assert value(dirty, "depot_writeback_dirty_bytes") == len(data)
        assert value(dirty, "depot_writeback_dirty_files") == 1
        assert value(dirty, "depot_writeback_staged_bytes_total") == len(data)
        assert value(dirty, "depot_writeback_uploaded_bytes_total") == 0
        assert value(dirty, "depot_writeback_oldest_dirty_age_seconds") >= 0
        assert value(dirty, "depot_writes_total") == 1

        synced = api.json("/api/v1/sync?wait=1&timeout=30", method="POST")
        assert synced["synced"] is True
        clean = api.scrape()
        assert (ufs / "ck" / "step1.bin").read_bytes() == data
        assert value(clean, "depot_writeback_dirty_bytes") == 0
        assert value(clean, "depot_writeback_dirty_files") == 0
        assert value(clean, "depot_writeback_upload_queue_depth") == 0
        assert value(clean, "depot_writeback_oldest_dirty_age_seconds") == 0
        assert value(clean, "depot_writeback_uploaded_total") == 1
        assert value(clean, "depot_writeback_uploaded_bytes_total") == len(data)
        assert value(clean, "depot_writeback_failed_writes", state="failed") == 0
        assert value(clean, "depot_writeback_failed_writes", state="lost") == 0
