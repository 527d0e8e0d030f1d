"""Distributed preload and free (``depot load`` / ``depot free``), on real workers.

Single node: every page lands in the cache, verify finds pages dropped or damaged behind the
worker's back, per-file failures are reported while the rest loads, stop, free, the CLI and bad
input. Cluster: three in-process workers sharing one embedded registry (one ring, one job
store, as with etcd): each segment lands on its owner, and a job survives an owner or its
coordinator being stopped and restarted mid-way.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from depot.client.client import CacheClient
from depot.core.directio import takes_direct_io
from depot.core.errors import InvalidArgument, NotFound, PermissionDenied
from depot.core.types import PageId
from depot.placement.membership import EmbeddedRegistry
from depot.placement.view import ClusterView
from depot.testing.local import LocalWorker
from depot.ufs.faults import FaultInjectingUnderStore

PAGE = 256 * 1024
DEPOT = [sys.executable, "-m", "depot.cli.main"]

SIZES = {
    "small.txt": 1000,
    "one-page.bin": PAGE,
    "multi.bin": 3 * PAGE + 17,
    "empty": 0,
    "dir/a.bin": PAGE + 1,
    "dir/b.bin": 2 * PAGE,
    "dir/sub/c.bin": 5 * PAGE + 3,
    "dir/sub/deeper/d.txt": 10,
}


def pages_of(size: int) -> int:
    return -(-size // PAGE)


def make_tree(root: Path, sizes: dict[str, int] = SIZES) -> Path:
    for name, size in sizes.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    return root


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _load(endpoint: str, path: str, **kw: Any) -> dict[str, Any]:
    async with CacheClient(endpoint, ufs_fallback=False) as client:
        doc: dict[str, Any] = await client.load(path, poll_interval=0.05, **kw)
        return doc


def load(endpoint: str, path: str, **kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = run(_load(endpoint, path, **kw))
    return doc


def stats(endpoint: str) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with CacheClient(endpoint) as client:
            data: dict[str, Any] = await client.cache_stats()
            return data

    result: dict[str, Any] = run(go())
    return result


def post(endpoint: str, target: str, method: str = "POST") -> tuple[int, Any]:
    host, port = endpoint.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request(method, target)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    is_json = (resp.getheader("Content-Type") or "").startswith("application/json")
    return resp.status, json.loads(body) if body and is_json else body


def cached_pages(w: LocalWorker, path: str) -> list[int]:
    service = w.worker.service
    assert service is not None

    async def go() -> list[int]:
        opened = await service.open(path)
        return service.pages.file_pages(opened.file_id.key)

    result: list[int] = w.call(go())
    return result


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data")


@pytest.fixture
def worker(tmp_path: Path, data: Path) -> Iterator[LocalWorker]:
    with LocalWorker(data.as_uri(), tmp_path / "w" / "cache", page_size=PAGE,
                     cache_size="64MiB") as w:
        yield w


# --- single node ---------------------------------------------------------------------------------


def test_load_caches_every_page_and_reads_then_hit(worker: LocalWorker, data: Path) -> None:
    doc = load(worker.endpoint, "/", recursive=True)
    total_pages = sum(pages_of(s) for s in SIZES.values())
    assert doc["state"] == "completed" and doc["failures"] == []
    assert doc["files"] == {"total": len(SIZES), "done": len(SIZES), "failed": 0}
    assert doc["bytes"]["total"] == doc["bytes"]["done"] == sum(SIZES.values())
    assert doc["bytes"]["from_ufs"] == sum(SIZES.values())
    assert doc["pages"]["loaded"] == total_pages and doc["pages"]["not_cached"] == 0
    assert doc["walk_done"] and doc["eta"] == 0.0 and doc["attempts"] == 1
    before = stats(worker.endpoint)
    assert before["pages"] == total_pages and before["loaded_pages"] == total_pages

    async def read_all() -> None:
        async with CacheClient(worker.endpoint, ufs_fallback=False) as client:
            for name, size in SIZES.items():
                assert await client.read_range("/" + name, 0, size) == (data / name).read_bytes()

    run(read_all())
    after = stats(worker.endpoint)
    assert after["misses"] == before["misses"] == 0
    assert after["ufs_reads"] == before["ufs_reads"]
    assert after["hits"] == total_pages
    # loading again costs no UFS read: every page is found cached
    again = load(worker.endpoint, "/", recursive=True)
    assert again["pages"]["cached_before"] == total_pages and again["bytes"]["from_ufs"] == 0
    assert stats(worker.endpoint)["ufs_reads"] == before["ufs_reads"]


def test_preload_direct_io_writes_pages_around_the_page_cache(
    tmp_path: Path, data: Path, worker: LocalWorker
) -> None:
    """``cache.preload_direct_io``: the pages of a load are written with O_DIRECT (their aligned
    part), reads and verify see exactly the UFS bytes; by default nothing is written that way."""
    cache = tmp_path / "direct" / "cache"
    cache.mkdir(parents=True)
    if not takes_direct_io(cache):
        pytest.skip("the test dir's filesystem has no O_DIRECT")
    expected = sum(
        min(PAGE, size - start) // 4096 * 4096
        for size in SIZES.values() for start in range(0, size, PAGE)
    )
    with LocalWorker(data.as_uri(), cache, page_size=PAGE, cache_size="64MiB",
                     extra={"cache": {"preload_direct_io": True}}) as direct:
        doc = load(direct.endpoint, "/", recursive=True)
        assert doc["state"] == "completed" and doc["failures"] == []
        assert stats(direct.endpoint)["direct_write_bytes"] == expected

        async def read_all() -> None:
            async with CacheClient(direct.endpoint, ufs_fallback=False) as client:
                for name, size in SIZES.items():
                    got = await client.read_range("/" + name, 0, size)
                    assert got == (data / name).read_bytes()

        run(read_all())
        after = stats(direct.endpoint)
        assert after["misses"] == 0 and after["ufs_reads"] == doc["pages"]["loaded"]
        checked = load(direct.endpoint, "/", recursive=True, verify=True)
        assert checked["verify"]["missing"] == 0
    load(worker.endpoint, "/", recursive=True)
    assert stats(worker.endpoint)["direct_write_bytes"] == 0


def test_directory_without_recursive_is_one_level_and_file_is_itself(worker: LocalWorker) -> None:
    doc = load(worker.endpoint, "/dir")
    assert doc["files"]["done"] == 2  # a.bin, b.bin; not sub/
    assert cached_pages(worker, "/dir/sub/c.bin") == []
    doc = load(worker.endpoint, "/dir/sub/c.bin")
    assert doc["files"]["done"] == 1 and cached_pages(worker, "/dir/sub/c.bin") == list(range(6))


class _TimedStore(FaultInjectingUnderStore):
    """Records when each call starts and ends: (operation, prefix or key, start, end)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.spans: list[tuple[str, str, float, float]] = []

    async def head(self, key: str) -> Any:
        start = time.monotonic()
        try:
            return await super().head(key)
        finally:
            self.spans.append(("head", key, start, time.monotonic()))

    async def list(self, prefix: str = "", *, delimiter: str | None = "/",
                   token: str | None = None, limit: int = 1000) -> Any:
        start = time.monotonic()
        try:
            return await super().list(prefix, delimiter=delimiter, token=token, limit=limit)
        finally:
            op = "list" if limit > 1 else "probe"  # a stat's probe asks for one entry
            self.spans.append((op, prefix, start, time.monotonic()))


def test_a_directory_load_lists_it_while_the_path_is_checked(
    worker: LocalWorker, data: Path
) -> None:
    """The job's first listing starts with the submit's stat, not after it, and the walk uses
    that answer: one UFS round trip less before the first page, no listing twice."""
    service = worker.worker.service
    assert service is not None
    root = service.mounts.mounts[0]
    store = _TimedStore(service.store_for(root))
    store.set_latency(0.2, ops={"head", "list"})
    service._stores[root.path] = store
    doc = load(worker.endpoint, "/dir")
    assert doc["state"] == "completed" and doc["files"]["done"] == 2
    listings = [s for s in store.spans if s[0] == "list" and s[1] == "dir/"]
    assert len(listings) == 1, store.spans
    head_done = min(end for op, key, _, end in store.spans if op == "head" and key == "dir")
    assert listings[0][2] < head_done  # listed while the stat was still waiting
    # a file's load: the listing started with its check finds no directory and is dropped
    store.spans.clear()
    doc = load(worker.endpoint, "/dir/sub/c.bin")
    assert doc["state"] == "completed" and doc["files"]["done"] == 1 and not doc["failures"]
    assert cached_pages(worker, "/dir/sub/c.bin") == list(range(6))


def test_metadata_only_warms_stat_without_pages(worker: LocalWorker) -> None:
    doc = load(worker.endpoint, "/", recursive=True, metadata_only=True)
    assert doc["state"] == "completed" and doc["files"]["done"] == len(SIZES)
    assert doc["bytes"]["from_ufs"] == 0 and stats(worker.endpoint)["pages"] == 0


def test_verify_reloads_pages_dropped_or_damaged(worker: LocalWorker, tmp_path: Path) -> None:
    load(worker.endpoint, "/", recursive=True)
    service = worker.worker.service
    assert service is not None
    opened = worker.call(service.open("/multi.bin"))
    # a page deleted behind the worker's back: the load pass finds it missing
    assert worker.call(service.pages.delete(PageId(opened.file_id.key, 1)))
    # a page damaged on disk: only verify, which reads every page back, notices
    page_files = sorted((tmp_path / "w" / "cache" / "pages").rglob(f"{opened.file_id.key}/2"))
    assert len(page_files) == 1
    raw = bytearray(page_files[0].read_bytes())
    raw[100] ^= 0xFF
    page_files[0].write_bytes(bytes(raw))
    doc = load(worker.endpoint, "/", recursive=True, verify=True)
    total_pages = sum(pages_of(s) for s in SIZES.values())
    assert doc["state"] == "completed" and doc["failures"] == []
    assert doc["pages"]["loaded"] == 1
    assert doc["verify"]["pages"] == total_pages
    assert doc["verify"]["missing"] == 1 and doc["verify"]["loaded"] == 1
    assert doc["verify"]["not_cached"] == 0
    assert cached_pages(worker, "/multi.bin") == [0, 1, 2, 3]


class _DeniedStore(FaultInjectingUnderStore):
    """Refuses reads of keys containing 'secret' (a permission error of the under store)."""

    async def get_range(self, key: str, start: int, end: int, *, etag: str | None = None) -> Any:
        if "secret" in key:
            raise PermissionDenied("access denied by the under store", key)
        return await super().get_range(key, start, end, etag=etag)


def test_per_file_failures_are_reported_and_the_rest_loads(
    worker: LocalWorker, data: Path
) -> None:
    (data / "dir" / "secret.bin").write_bytes(b"x" * 1000)
    service = worker.worker.service
    assert service is not None
    root = service.mounts.mounts[0]
    service._stores[root.path] = _DeniedStore(service.store_for(root))
    # a file deleted after it was listed (the listing is cached, the object is gone)
    run(CacheClient(worker.endpoint).list("/dir"))
    (data / "dir" / "b.bin").unlink()
    doc = load(worker.endpoint, "/", recursive=True)
    assert doc["state"] == "completed"
    assert doc["files"]["failed"] == 2 and doc["files"]["done"] == len(SIZES) - 1
    failures = {f["path"]: f for f in doc["failures"]}
    assert set(failures) == {"/dir/secret.bin", "/dir/b.bin"}
    assert failures["/dir/secret.bin"]["code"] == "PermissionDenied"
    assert "denied" in failures["/dir/secret.bin"]["reason"]
    assert failures["/dir/b.bin"]["code"] in ("NotFound", "StaleVersion")
    assert cached_pages(worker, "/dir/sub/c.bin") == list(range(6))


class _UnlistableStore(FaultInjectingUnderStore):
    """Refuses listings of 'dir/' (a page of a listing, not the probe of a stat)."""

    async def list(self, prefix: str = "", *, delimiter: str | None = "/",
                   token: str | None = None, limit: int = 1000) -> Any:
        if prefix.startswith("dir/") and limit > 1:
            raise PermissionDenied("listing denied by the under store", prefix)
        return await super().list(prefix, delimiter=delimiter, token=token, limit=limit)


def test_a_job_whose_own_path_fails_is_failed_with_the_reason(worker: LocalWorker) -> None:
    service = worker.worker.service
    assert service is not None
    root = service.mounts.mounts[0]
    service._stores[root.path] = _UnlistableStore(service.store_for(root))
    doc = load(worker.endpoint, "/dir", recursive=True)
    assert doc["state"] == "failed"
    assert doc["error"]["code"] == "PermissionDenied" and "denied" in doc["error"]["reason"]
    proc = cli("load", "/dir", endpoint=worker.endpoint)
    assert_one_line_error(proc, "failed: listing denied")
    assert proc.returncode == 1


def test_stop_a_running_job(worker: LocalWorker) -> None:
    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        async with CacheClient(worker.endpoint, ufs_fallback=False) as client:
            first = await client.load("/", recursive=True, bandwidth="400KB", wait=False)
            await asyncio.sleep(0.5)
            stopping = await client.stop_job(first["id"])
            final = await client.wait_job(first["id"], poll_interval=0.05)
            return stopping, final

    stopping, final = run(go())
    assert stopping["state"] in ("stopping", "stopped")
    assert final["state"] == "stopped" and final["finished"]
    assert final["bytes"]["done"] < sum(SIZES.values())


def test_free_drops_pages_and_the_next_read_misses(worker: LocalWorker, data: Path) -> None:
    load(worker.endpoint, "/", recursive=True)

    async def go() -> dict[str, Any]:
        async with CacheClient(worker.endpoint, ufs_fallback=False) as client:
            doc: dict[str, Any] = await client.free("/dir", recursive=True, poll_interval=0.05)
            return doc

    doc = run(go())
    assert doc["state"] == "completed" and doc["kind"] == "free"
    freed_pages = sum(pages_of(s) for n, s in SIZES.items() if n.startswith("dir/"))
    assert doc["freed"]["pages"] == freed_pages
    assert doc["workers"] == {"total": 1, "done": 1, "failed": 0}
    assert cached_pages(worker, "/dir/a.bin") == []
    assert cached_pages(worker, "/multi.bin") == [0, 1, 2, 3]  # outside /dir: kept
    before = stats(worker.endpoint)
    status, _ = post(worker.endpoint, "/api/v1/read?path=%2Fdir%2Fa.bin", "GET")
    assert status == 200
    assert stats(worker.endpoint)["misses"] == before["misses"] + 2


def test_free_non_recursive_keeps_subdirectories(worker: LocalWorker) -> None:
    load(worker.endpoint, "/", recursive=True)
    status, body = post(worker.endpoint, "/api/v1/cache/free?path=%2Fdir")
    assert status == 200 and body["files"] == 2 and body["pages"] == 2 + 2
    assert cached_pages(worker, "/dir/sub/c.bin") == list(range(6))


def test_bad_input_is_a_clear_4xx(worker: LocalWorker) -> None:
    ep = worker.endpoint
    assert post(ep, "/api/v1/jobs")[0] == 400
    status, body = post(ep, "/api/v1/jobs?path=%2F&bandwidth=fast")
    assert status == 400 and "bandwidth" in body["error"]["message"]
    assert post(ep, "/api/v1/jobs?path=%2F&kind=explode")[0] == 400
    assert post(ep, "/api/v1/jobs?path=%2F&recursive=maybe")[0] == 400
    assert post(ep, "/api/v1/jobs?path=%2Fmissing")[0] == 404
    assert post(ep, "/api/v1/jobs/0123abcd", "GET")[0] == 404
    assert post(ep, "/api/v1/jobs/nope!", "GET")[0] == 400
    assert post(ep, "/api/v1/jobs/0123abcd/stop")[0] == 404
    assert post(ep, "/api/v1/cache/load?path=%2Fmulti.bin", "GET")[0] == 405
    assert post(ep, "/api/v1/cache/load?path=%2Fmulti.bin&start=x")[0] == 400
    assert post(ep, "/api/v1/cache/load?path=%2Fnope")[0] == 404
    assert post(ep, "/api/v1/read?path=%2Fmulti.bin")[0] == 405
    assert post(ep, "/api/v1/jobs/0123abcd", "DELETE")[0] == 405
    status, body = post(ep, "/api/v1/cache/load?path=%2Fmulti.bin&start=0&end=300000")
    assert status == 200 and body["pages"] == 2 and body["loaded"] == 2
    with pytest.raises(NotFound):
        load(ep, "/missing")
    with pytest.raises(InvalidArgument):
        load(ep, "/", bandwidth="lots")


def test_jobs_list_and_resume_after_restart(tmp_path: Path, data: Path) -> None:
    """A single node keeps its jobs in its cache dir: a job cut short by a stop resumes."""
    cache = tmp_path / "r" / "cache"
    w = LocalWorker(data.as_uri(), cache, page_size=PAGE).start()
    try:
        async def submit() -> dict[str, Any]:
            async with CacheClient(w.endpoint) as client:
                doc: dict[str, Any] = await client.load(
                    "/", recursive=True, bandwidth="1500KB", wait=False
                )
                await asyncio.sleep(0.6)
                return doc

        first = run(submit())
    finally:
        w.stop()
    w = LocalWorker(data.as_uri(), cache, page_size=PAGE).start()
    try:
        async def wait() -> tuple[dict[str, Any], list[dict[str, Any]]]:
            async with CacheClient(w.endpoint) as client:
                doc = await client.wait_job(first["id"], poll_interval=0.05)
                return doc, await client.jobs()

        doc, jobs = run(wait())
        assert doc["state"] == "completed" and doc["attempts"] == 2 and doc["failures"] == []
        assert doc["files"]["done"] == len(SIZES)
        assert [j["id"] for j in jobs] == [first["id"]]
    finally:
        w.stop()


# --- CLI -----------------------------------------------------------------------------------------


def cli(*args: str, endpoint: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPOT_")}
    env["DEPOT_ENDPOINT"] = endpoint
    return subprocess.run([*DEPOT, *args], capture_output=True, text=True, env=env, timeout=60)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("depot: error: ") and fragment in lines[0], lines[0]


def test_cli_load_free_and_errors(worker: LocalWorker, data: Path) -> None:
    ep = worker.endpoint
    proc = cli("load", "/", "--recursive", "--verify", "--json", endpoint=ep)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["state"] == "completed" and doc["files"]["done"] == len(SIZES)
    assert doc["verify"]["missing"] == 0

    proc = cli("load", "/dir", endpoint=ep)
    assert proc.returncode == 0 and "2 of 2 file(s) loaded" in proc.stdout, proc.stdout

    proc = cli("load", "/dir", "--detach", endpoint=ep)
    assert proc.returncode == 0
    job_id = proc.stdout.strip()
    proc = cli("load", "--progress", job_id, "--json", endpoint=ep)
    assert proc.returncode == 0 and json.loads(proc.stdout)["id"] == job_id

    proc = cli("free", "/", "-r", endpoint=ep)
    assert proc.returncode == 0 and "dropped on 1 worker(s)" in proc.stdout, proc.stdout
    assert stats(ep)["pages"] == 0

    assert_one_line_error(cli("load", "/missing", endpoint=ep), "no such file")
    assert_one_line_error(cli("load", "/", "--bandwidth", "fast", endpoint=ep), "bandwidth")
    assert_one_line_error(cli("load", "--progress", "0123abcd", endpoint=ep), "no such job")
    usage = cli("load", endpoint=ep)
    assert usage.returncode == 2
    assert_one_line_error(usage, "PATH")


def test_cli_stop_and_progress_of_a_stopped_job(worker: LocalWorker) -> None:
    ep = worker.endpoint
    proc = cli("load", "/", "-r", "--bandwidth", "300KB", "--detach", endpoint=ep)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    proc = cli("load", "--stop", job_id, endpoint=ep)
    assert proc.returncode == 0 and proc.stdout.strip() == f"job {job_id} stopped", proc
    proc = cli("load", "--progress", job_id, endpoint=ep)
    assert proc.returncode == 4 and "stopped before it completed" in proc.stderr


def test_cli_partial_failure_exit_code(worker: LocalWorker, data: Path) -> None:
    run(CacheClient(worker.endpoint).list("/dir"))
    (data / "dir" / "b.bin").unlink()
    proc = cli("load", "/dir", endpoint=worker.endpoint)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "1 of 2 file(s) loaded" in proc.stdout
    assert "/dir/b.bin" in proc.stderr and "failure" in proc.stderr


# --- cluster -------------------------------------------------------------------------------------

CLUSTER = {"cluster": {"segment_size": 2 * PAGE}}


def start_worker(tmp_path: Path, data: Path, name: str, registry: EmbeddedRegistry,
                 port: int = 0) -> LocalWorker:
    return LocalWorker(data.as_uri(), tmp_path / name / "cache", page_size=PAGE,
                       cache_size="64MiB", registry=registry, extra=CLUSTER, port=port).start()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[list[LocalWorker], EmbeddedRegistry, Path]]:
    data = make_tree(tmp_path / "cdata", {f"f{i:02d}.bin": (i % 7) * PAGE + 100 * i
                                          for i in range(24)})
    registry = EmbeddedRegistry()
    workers = [start_worker(tmp_path, data, f"w{i}", registry) for i in range(3)]
    try:
        yield workers, registry, data
    finally:
        for w in workers:
            w.stop()


def view_of(w: LocalWorker) -> ClusterView:
    assert w.worker.cluster is not None
    return w.worker.cluster.view


def test_cluster_load_puts_each_segment_on_its_owner(
    cluster: tuple[list[LocalWorker], EmbeddedRegistry, Path],
) -> None:
    workers, _, data = cluster
    view = view_of(workers[0])
    assert len(view.ring) == 3
    doc = load(workers[1].endpoint, "/", recursive=True)
    assert doc["state"] == "completed" and doc["failures"] == []
    by_id = {w.worker.cluster.worker_id: w for w in workers if w.worker.cluster}
    holders = set()
    for path in sorted(data.iterdir()):
        size = path.stat().st_size
        name = "/" + path.name
        file_key = view.file_key(name)
        assert file_key is not None
        expected: dict[str, list[int]] = {}
        for index in range(pages_of(size)):
            owner = view.route(file_key, index * PAGE)[0].worker_id
            expected.setdefault(owner, []).append(index)
        for wid, w in by_id.items():
            assert cached_pages(w, name) == expected.get(wid, []), (name, wid)
        holders.update(expected)
    assert len(holders) == 3  # the data spread over every worker
    assert doc["segments"]["total"] == sum(
        max(1, -(-p.stat().st_size // (2 * PAGE))) for p in data.iterdir()
    )


def test_cluster_load_with_replication_fills_every_replica(tmp_path: Path) -> None:
    """With replication 2 each page lands on both workers readers spread over, and no other."""
    data = make_tree(tmp_path / "rdata", {f"r{i:02d}.bin": (i % 5 + 1) * PAGE + 7 * i
                                          for i in range(12)})
    registry = EmbeddedRegistry()
    extra = {"cluster": {"segment_size": 2 * PAGE, "replication": 2}}
    workers = [LocalWorker(data.as_uri(), tmp_path / f"rw{i}" / "cache", page_size=PAGE,
                           cache_size="64MiB", registry=registry, extra=extra).start()
               for i in range(3)]
    try:
        view = view_of(workers[0])
        assert view.policy.replication == 2
        doc = load(workers[0].endpoint, "/", recursive=True)
        assert doc["state"] == "completed" and doc["failures"] == [], doc
        by_id = {w.worker.cluster.worker_id: w for w in workers if w.worker.cluster}
        total_pages = 0
        for path in sorted(data.iterdir()):
            name = "/" + path.name
            file_key = view.file_key(name)
            assert file_key is not None
            expected: dict[str, list[int]] = {}
            for index in range(pages_of(path.stat().st_size)):
                for replica in view.route(file_key, index * PAGE)[:2]:
                    expected.setdefault(replica.worker_id, []).append(index)
                total_pages += 1
            for wid, w in by_id.items():
                assert cached_pages(w, name) == expected.get(wid, []), (name, wid)
        assert doc["pages"]["loaded"] == 2 * total_pages
        again = load(workers[2].endpoint, "/", recursive=True)
        assert again["pages"]["loaded"] == 0
        assert again["pages"]["cached_before"] == 2 * total_pages
    finally:
        for w in workers:
            w.stop()


def test_cluster_job_survives_owner_and_coordinator_restarts(
    cluster: tuple[list[LocalWorker], EmbeddedRegistry, Path], tmp_path: Path,
) -> None:
    workers, registry, data = cluster
    total = sum(p.stat().st_size for p in data.iterdir())

    async def submit() -> dict[str, Any]:
        async with CacheClient(workers[0].endpoint) as client:
            doc: dict[str, Any] = await client.load(
                "/", recursive=True, bandwidth=int(total / 3), wait=False
            )
            return doc

    first = run(submit())
    time.sleep(0.5)
    # an owner goes away mid-job and comes back on the same port
    port = int(workers[2].endpoint.rsplit(":", 1)[1])
    workers[2].stop()
    time.sleep(0.4)
    workers[2] = start_worker(tmp_path, data, "w2", registry, port=port)
    time.sleep(0.3)
    # then the coordinator itself: the job stays active in the store and resumes at its restart
    port = int(workers[0].endpoint.rsplit(":", 1)[1])
    workers[0].stop()
    mid = json.loads(registry.kv["jobs/" + first["id"]][0])
    assert mid["state"] == "running"
    workers[0] = start_worker(tmp_path, data, "w0", registry, port=port)

    async def wait() -> dict[str, Any]:
        async with CacheClient(workers[1].endpoint) as client:
            doc: dict[str, Any] = await client.wait_job(first["id"], poll_interval=0.05)
            return doc

    doc = run(wait())
    assert doc["state"] == "completed", doc
    assert doc["failures"] == [] and doc["files"]["failed"] == 0
    assert doc["files"]["done"] == len(list(data.iterdir()))
    assert doc["attempts"] == 2
    view = view_of(workers[1])
    for path in data.iterdir():
        name = "/" + path.name
        file_key = view.file_key(name)
        assert file_key is not None
        for index in range(pages_of(path.stat().st_size)):
            owner = view.route(file_key, index * PAGE)[0].worker_id
            w = next(x for x in workers if x.worker.cluster.worker_id == owner)
            assert index in cached_pages(w, name)


def test_cluster_adopts_the_job_of_a_coordinator_that_does_not_come_back(
    cluster: tuple[list[LocalWorker], EmbeddedRegistry, Path],
) -> None:
    workers, registry, data = cluster
    total = sum(p.stat().st_size for p in data.iterdir())

    async def submit() -> dict[str, Any]:
        async with CacheClient(workers[0].endpoint) as client:
            doc: dict[str, Any] = await client.load(
                "/", recursive=True, bandwidth=int(total / 2), wait=False
            )
            return doc

    first = run(submit())
    time.sleep(0.3)
    workers[0].stop()
    survivor = workers[1]
    jobs = survivor.worker.jobs
    assert jobs is not None
    assert survivor.call(jobs.adopt()) == []  # not stale yet: its coordinator may come back
    jobs.stale_after = 0.2
    time.sleep(0.3)
    assert survivor.call(jobs.adopt()) == [first["id"]]
    assert workers[2].call(workers[2].worker.jobs.adopt()) == []  # claimed already

    async def wait() -> dict[str, Any]:
        async with CacheClient(workers[2].endpoint) as client:
            doc: dict[str, Any] = await client.wait_job(first["id"], poll_interval=0.05)
            return doc

    doc = run(wait())
    assert doc["state"] == "completed" and doc["failures"] == [] and doc["attempts"] == 2
    assert doc["coordinator"] == survivor.worker.cluster.worker_id
    assert not [k for k in registry.kv if not k.startswith("jobs/")]  # claims, index cleaned up
