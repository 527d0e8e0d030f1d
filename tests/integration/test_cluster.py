"""A real cluster on loopback: etcd and 3-4 ``depot worker`` processes (``LocalCluster``).

Placement agreement between workers and clients, a worker killed (SIGKILL) under 8 concurrent
large reads, restarts that keep the cache, an etcd outage during reads, a join that moves only
the newcomer's share of keys, and single flight across the cluster. Timings are short (lease TTL
3 s, pages of 1 MiB, segments of 8 MiB) so the file runs in well under a minute.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from depot.client import CacheClient
from depot.core.config import DepotConfig
from depot.placement.view import ClusterView
from depot.testing.cluster import LocalCluster, http_json

from .conftest import EtcdServer

MiB = 1024 * 1024
PAGE = MiB
SEGMENT = 8 * MiB

MakeCluster = Callable[..., LocalCluster]


@pytest.fixture
def make_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeCluster]:
    """``make_cluster(workers=3, membership="etcd", **options)``: a started LocalCluster."""
    made: list[LocalCluster] = []
    etcd: EtcdServer | None = None

    def make(workers: int = 3, **options: Any) -> LocalCluster:
        nonlocal etcd
        if options.get("membership", "etcd") == "etcd" and "etcd" not in options:
            etcd = request.getfixturevalue("etcd_server")
            etcd.ensure_running()
            options["etcd"] = etcd
        cluster = LocalCluster(tmp_path / f"cluster{len(made)}", workers, **options)
        made.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in made:
        print(cluster.describe())  # pytest shows it when the test failed
        cluster.close()
    if etcd is not None:
        etcd.ensure_running()


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def client_config() -> DepotConfig:
    """Default client settings (no config file, no DEPOT_* environment)."""
    return DepotConfig()


def views(cluster: LocalCluster) -> dict[int, ClusterView]:
    return {i: ClusterView.from_document(doc) for i, doc in cluster.wait_ready().items()}


def stats(cluster: LocalCluster) -> dict[int, dict[str, Any]]:
    return {w.index: cluster.stats(w.index) for w in cluster.running}


async def settle(cluster: LocalCluster, pages: int, within: float = 10.0) -> dict[int, dict[str, Any]]:
    """Wait until the workers hold ``pages`` pages in all and no UFS read is in flight."""
    deadline = time.monotonic() + within
    while True:
        now = stats(cluster)
        if sum(s["pages"] for s in now.values()) >= pages and all(
            s["ufs_inflight"] == 0 for s in now.values()
        ):
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"pages did not settle at {pages}: {now}")
        await asyncio.sleep(0.05)


def owners(view: ClusterView, file_key: str, size: int) -> dict[str, int]:
    """Pages of each worker endpoint for a file of ``size`` bytes."""
    out: dict[str, int] = {}
    for offset in range(0, size, SEGMENT):
        owner = view.route(file_key, offset)[0].endpoint
        pages = -(-min(SEGMENT, size - offset) // PAGE)
        out[owner] = out.get(owner, 0) + pages
    return out


# --- placement --------------------------------------------------------------------------------


@pytest.mark.parametrize("membership", ["etcd", "static"])
async def test_workers_and_clients_agree_on_placement(
    make_cluster: MakeCluster, membership: str
) -> None:
    cluster = make_cluster(3, membership=membership)
    assert cluster.ufs_root is not None
    size = 40 * MiB + 12345  # 6 segments, the last one short
    data = payload(1, size)

    by_worker = views(cluster)
    assert len(by_worker) == 3
    reference = by_worker[0]
    # Worker identities are random: pick a name whose segments do not all hash to one worker.
    name = next(f"model-{i}.bin" for i in range(50)
                if len(owners(reference, f"{cluster.ufs_root.as_uri()}/model-{i}.bin", size)) >= 2)
    (cluster.ufs_root / name).write_bytes(data)
    assert {w.endpoint for w in reference.ring.workers.values()} == set(cluster.endpoints)
    assert {v.membership for v in by_worker.values()} == {membership}
    ids = {doc["self"] for doc in cluster.documents().values()}
    assert len(ids) == 3  # three ring identities, one per worker
    keys = [(f"{cluster.ufs_root.as_uri()}/shard-{i:05d}.bin", off) for i in range(400)
            for off in (0, SEGMENT, 5 * SEGMENT + 7)]  # fmt: skip
    expected = [[w.worker_id for w in reference.route(k, o)] for k, o in keys]
    for view in by_worker.values():
        assert [[w.worker_id for w in view.route(k, o)] for k, o in keys] == expected

    # A client bootstrapped from any worker routes every chunk the way the workers do.
    async with CacheClient(cluster.endpoints[2], config=client_config()) as client:
        await client.router.refresh()
        assert client.router.view is not None
        file_key = client.router.view.file_key(f"/{name}")
        assert file_key == f"{cluster.ufs_root.as_uri()}/{name}"
        for offset in range(0, size, PAGE):
            want = [w.endpoint for w in reference.route(file_key, offset)]
            assert client.router.targets(f"/{name}", offset) == want
        for i in range(200):
            path = f"/shard-{i:05d}.bin"
            want = [w.endpoint for w in reference.route(f"{cluster.ufs_root.as_uri()}{path}", 0)]
            assert client.router.targets(path, 0) == want

        # A cold read lands each segment's pages on its owner, and nowhere else.
        assert await client.read_range(f"/{name}", 0) == data
        plan = owners(reference, file_key, size)
        assert len(plan) >= 2, plan  # 6 segments over 3 workers
        after = await settle(cluster, -(-size // PAGE))
        for index, worker_stats in after.items():
            mine = plan.get(cluster.endpoints[index], 0)
            assert worker_stats["ufs_reads"] == mine, (index, plan, after)
            assert worker_stats["pages"] == mine, (index, plan, after)


async def test_a_join_moves_only_the_newcomers_share(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(3)
    before = views(cluster)[0]
    keys = [(f"s3://bucket/data/part-{i:06d}.parquet", off) for i in range(1500)
            for off in (0, 3 * SEGMENT)]  # fmt: skip
    old = [before.route(k, o)[0].worker_id for k, o in keys]

    new_index = cluster.add_worker()
    after_views = views(cluster)
    assert len(after_views) == 4
    new_id = cluster.documents()[new_index]["self"]
    for view in after_views.values():
        assert len(view.ring.workers) == 4
    after = after_views[1]
    new = [after.route(k, o)[0].worker_id for k, o in keys]
    moved = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
    assert all(b == new_id for _, b in moved), "a key moved between two old workers"
    share = len(moved) / len(keys)
    assert 0.17 < share < 0.33, share  # about 1/4
    # Every view agrees after the join.
    for view in after_views.values():
        assert [view.route(k, o)[0].worker_id for k, o in keys] == new


async def test_a_client_with_etcd_sees_joins_and_leaves_without_polling(
    make_cluster: MakeCluster,
) -> None:
    """A client configured with the cluster's etcd routes to a newcomer, and around a worker
    that left, as soon as etcd says so: its poll of the worker's view is set to an hour."""
    cluster = make_cluster(2)
    config = DepotConfig.model_validate({"cluster": {
        "membership": "etcd", "etcd": cluster.etcd_endpoints, "refresh_interval": 3600}})

    async def live_endpoints(client: CacheClient, want: set[str], within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while True:
            view = client.router.view
            live = {w.endpoint for w in view.workers if w.is_live} if view else set()
            if live == want:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"client view {sorted(live)} != {sorted(want)}")
            await asyncio.sleep(0.05)

    async with CacheClient(cluster.endpoint, config=config, ufs_fallback=False) as client:
        await client.router.current_view()
        await live_endpoints(client, set(cluster.endpoints))
        fetched_at = client.router._view_at
        index = cluster.add_worker()
        await live_endpoints(client, set(cluster.endpoints) | {cluster.workers[index].endpoint})
        cluster.stop(0)  # SIGTERM: it leaves the ring at once
        await live_endpoints(client, {w.endpoint for w in cluster.running})
        assert client.router._view_at == fetched_at, "the view was polled, not watched"
        # Reads route over the watched view, to live workers only.
        assert cluster.ufs_root is not None
        data = payload(5, 3 * SEGMENT)
        (cluster.ufs_root / "after-watch.bin").write_bytes(data)
        assert await client.read_range("/after-watch.bin", 0, len(data)) == data


# --- failures ---------------------------------------------------------------------------------


async def test_sigkill_under_concurrent_reads_loses_no_read(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(3)
    assert cluster.ufs_root is not None
    readers, size = 8, 48 * MiB
    digests = {}
    for i in range(readers):
        data = payload(100 + i, size)
        (cluster.ufs_root / f"r{i}.bin").write_bytes(data)
        digests[i] = hashlib.sha256(data).hexdigest()
    victim = 0  # the worker every client was given: the view must come from the others
    before = views(cluster)[0]
    owned = {w.index: 0 for w in cluster.workers}
    for i in range(readers):
        for endpoint, pages in owners(before, f"{cluster.ufs_root.as_uri()}/r{i}.bin", size).items():
            owned[cluster.index_of(endpoint)] += pages
    progress = [0] * readers
    gaps: list[list[float]] = [[] for _ in range(readers)]
    errors: list[BaseException] = []
    results: dict[int, str] = {}

    async def reader(i: int) -> None:
        async with CacheClient(cluster.endpoint, config=client_config()) as client:
            status = await client.stat(f"/r{i}.bin")
            parts = []
            last = time.monotonic()
            try:
                for offset in range(0, size, 4 * MiB):
                    parts.append(await client.read_range(
                        f"/r{i}.bin", offset, offset + 4 * MiB,
                        version=status.entity_tag, size=size,
                    ))  # fmt: skip
                    now = time.monotonic()
                    gaps[i].append(now - last)
                    last = now
                    progress[i] += 4 * MiB
            except Exception as exc:
                errors.append(exc)
                raise
            results[i] = hashlib.sha256(b"".join(parts)).hexdigest()

    async def killer() -> float:
        while sum(progress) < readers * size // 4:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(cluster.kill, victim)
        return time.monotonic()

    started = time.monotonic()
    tasks = [asyncio.create_task(reader(i)) for i in range(readers)]
    killed_at = await killer()
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.monotonic() - started
    assert not errors, errors
    assert results == {i: digests[i] for i in range(readers)}  # every byte right
    stall = max(max(g) for g in gaps)
    print(
        f"8 readers x 48 MiB, SIGKILL of worker {victim} at +{killed_at - started:.2f}s: "
        f"longest stall {stall:.3f}s, total {elapsed:.2f}s"
    )
    assert stall < 10.0, stall
    # The survivors took over pages of the victim's segments (failover really happened).
    survivors = stats(cluster)
    assert sum(st["ufs_reads"] for st in survivors.values()) > sum(
        owned[i] for i in survivors
    ), (owned, survivors)
    # The dead worker leaves everyone's view within the lease TTL.
    remaining = views(cluster)
    assert all(len(v.ring.workers) == 2 for v in remaining.values())


@pytest.mark.parametrize("short_circuit", [False, True], ids=["remote-client", "local-client"])
async def test_a_hung_worker_costs_readers_seconds_not_the_timeout(
    make_cluster: MakeCluster, short_circuit: bool
) -> None:
    """SIGSTOP leaves connections open and unanswered (a hang, or a partition that resets
    nothing): the liveness probe, not the 30 s request timeout, moves readers on. A client on
    another node reads over HTTP only; one on the worker's node also reads its page files."""
    cluster = make_cluster(3)
    assert cluster.ufs_root is not None
    readers, size = 4, 32 * MiB
    digests = {}
    for i in range(readers):
        data = payload(200 + i, size)
        (cluster.ufs_root / f"h{i}.bin").write_bytes(data)
        digests[i] = hashlib.sha256(data).hexdigest()
    victim = 1
    progress = [0] * readers
    gaps: list[list[float]] = [[] for _ in range(readers)]
    results: dict[int, str] = {}

    async def reader(i: int) -> None:
        config = client_config()
        config.client.short_circuit = short_circuit
        async with CacheClient(cluster.endpoint, config=config) as client:
            status = await client.stat(f"/h{i}.bin")
            parts = []
            last = time.monotonic()
            for offset in range(0, size, 2 * MiB):
                parts.append(await client.read_range(
                    f"/h{i}.bin", offset, offset + 2 * MiB, version=status.entity_tag, size=size,
                ))  # fmt: skip
                now = time.monotonic()
                gaps[i].append(now - last)
                last = now
                progress[i] += 2 * MiB
                await asyncio.sleep(0.02)  # a reader that also computes: the pause lands mid-file
            results[i] = hashlib.sha256(b"".join(parts)).hexdigest()

    tasks = [asyncio.create_task(reader(i)) for i in range(readers)]
    try:
        while sum(progress) < readers * size // 4:
            await asyncio.sleep(0.01)
        cluster.pause(victim)
        await asyncio.gather(*tasks)
    finally:
        cluster.resume(victim)
    assert results == {i: digests[i] for i in range(readers)}
    stall = max(max(g) for g in gaps)
    print(f"{readers} readers, SIGSTOP of worker {victim}: longest stall {stall:.3f}s")
    assert stall < 8.0, stall  # probe_after 1 s + connect_timeout 2 s, with room for CI


async def test_restart_keeps_ring_identity_and_cache(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(3)
    assert cluster.ufs_root is not None
    size = 48 * MiB
    data = payload(7, size)
    (cluster.ufs_root / "ckpt.bin").write_bytes(data)
    reference = views(cluster)[0]
    ring_ids = {i: doc["self"] for i, doc in cluster.documents().items()}
    file_key = f"{cluster.ufs_root.as_uri()}/ckpt.bin"
    plan = owners(reference, file_key, size)

    async with CacheClient(cluster.endpoint, config=client_config()) as client:
        assert await client.read_range("/ckpt.bin", 0) == data
    first = await settle(cluster, size // PAGE)

    # One worker stops gracefully, another is killed; both come back on their cache dirs.
    holders = sorted(cluster.index_of(e) for e in plan)
    graceful, crashed = (holders + [i for i in range(3) if i not in holders])[:2]
    cluster.stop(graceful)
    cluster.kill(crashed)
    cluster.restart(graceful)
    cluster.restart(crashed)
    after = cluster.wait_ready()
    assert {i: doc["self"] for i, doc in after.items()} == ring_ids
    again = ClusterView.from_document(after[graceful])
    assert owners(again, file_key, size) == plan  # same identities, same placement

    async with CacheClient(cluster.endpoints[2], config=client_config()) as client:
        assert await client.read_range("/ckpt.bin", 0) == data
    now = stats(cluster)
    for index in (graceful, crashed):
        mine = plan.get(cluster.endpoints[index], 0)
        assert now[index]["ufs_reads"] == 0, (index, now[index])
        assert now[index]["hits"] >= mine, (index, plan, now[index])
        assert now[index]["pages"] == mine, (index, now[index])
    others = [i for i in range(3) if i not in (graceful, crashed)]
    assert sum(now[i]["ufs_reads"] - first[i]["ufs_reads"] for i in others) == 0, (first, now)


async def test_etcd_outage_during_reads(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(3)
    assert cluster.ufs_root is not None
    files = {f"/e{i}.bin": payload(200 + i, 12 * MiB + i) for i in range(4)}
    for path, data in files.items():
        (cluster.ufs_root / path.lstrip("/")).write_bytes(data)
    stop = asyncio.Event()
    errors: list[BaseException] = []
    reads = [0]

    async def reader(seed: int) -> None:
        rnd = random.Random(seed)
        async with CacheClient(cluster.endpoints[seed % 3], config=client_config()) as client:
            while not stop.is_set():
                path = rnd.choice(sorted(files))
                data = files[path]
                start = rnd.randrange(0, len(data) - 1)
                end = min(len(data), start + rnd.choice((4096, MiB, 5 * MiB)))
                try:
                    got = await client.read_range(path, start, end)
                except Exception as exc:
                    errors.append(exc)
                    return
                if got != data[start:end]:
                    errors.append(AssertionError(f"wrong bytes {path}[{start}:{end}]"))
                    return
                reads[0] += 1
                await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(reader(s)) for s in range(4)]
    try:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(cluster.etcd_stop)
        # Past the lease TTL: workers keep their last view and say they are unhealthy.
        deadline = time.monotonic() + cluster.lease_ttl + 1.5
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            assert not errors, errors
        during = await asyncio.to_thread(cluster.documents)
        assert len(during) == 3
        for doc in during.values():
            assert doc["healthy"] is False, doc
            assert len([w for w in doc["workers"] if w["state"] == "live"]) == 3
        count_during = reads[0]
        await asyncio.to_thread(cluster.etcd_start)
        back = await asyncio.to_thread(cluster.wait_ready, None, 20.0)
        assert all(len(ClusterView.from_document(d).ring.workers) == 3 for d in back.values())
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert not errors, errors
    assert count_during > 20 and reads[0] > count_during, (count_during, reads[0])


# --- single flight ----------------------------------------------------------------------------


async def test_single_flight_across_the_cluster(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(3)
    assert cluster.ufs_root is not None
    size = 40 * MiB
    data = payload(9, size)
    (cluster.ufs_root / "hot.bin").write_bytes(data)
    clients = [CacheClient(cluster.endpoints[i % 3], config=client_config()) for i in range(8)]
    try:
        for client in clients:  # learn the ring first, so the reads start together
            await client.router.refresh()
        got = await asyncio.gather(*(c.read_range("/hot.bin", 0) for c in clients))
    finally:
        for client in clients:
            await client.close()
    assert all(g == data for g in got)
    after = await settle(cluster, size // PAGE)
    total_reads = sum(s["ufs_reads"] for s in after.values())
    shared = sum(s["ufs_read_shared"] for s in after.values())
    print(f"8 cold readers of one 40 MiB file: {total_reads} UFS page reads for "
          f"{size // PAGE} pages ({shared} shared)")  # fmt: skip
    assert total_reads == size // PAGE, after


# --- depot status -----------------------------------------------------------------------------


def test_status_command_shows_every_worker(make_cluster: MakeCluster) -> None:
    import json

    from click.testing import CliRunner

    from depot.cli.main import cli

    cluster = make_cluster(3, lease_ttl=10)
    cluster.kill(2)  # still in the view until its lease expires: shown unreachable
    runner = CliRunner()
    result = runner.invoke(cli, ["status", "--json", "--endpoint", cluster.endpoints[0]])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["cluster"] == cluster.cluster_name
    assert doc["membership"] == "etcd" and doc["healthy"] is True
    by_endpoint = {w["endpoint"]: w for w in doc["workers"]}
    assert set(by_endpoint) == set(cluster.endpoints)
    for index in (0, 1):
        w = by_endpoint[cluster.endpoints[index]]
        assert w["state"] == "live" and w["reachable"] is True, w
        assert w["capacity_bytes"] == 1024**3 and w["hit_ratio"] == 0.0
    dead = by_endpoint[cluster.endpoints[2]]
    assert dead["state"] == "unreachable" and dead["reachable"] is False, dead
    assert doc["summary"] == {"workers": 3, "live": 2, "unreachable": 1, "draining": 0}

    table = runner.invoke(cli, ["status", "--endpoint", cluster.endpoints[1]])
    assert table.exit_code == 0, table.output
    assert cluster.cluster_name in table.stdout and "unreachable" in table.stdout
    assert http_json(cluster.endpoints[1] + "/healthz")["status"] == "ok"
