"""Write-back queue and journal: acknowledgement, upload, ordering, retries, recovery, quota."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depot.core.errors import Corrupted, NoSpace, NotFound, PermissionDenied, Throttled, Timeout
from depot.core.types import Attributes
from depot.ufs import FaultInjectingUnderStore, MemoryUnderStore
from depot.ufs.base import Buffer, UnderStore
from depot.worker.journal import MAGIC, Journal, decode, encode_frame
from depot.worker.writeback import WriteBackConfig, WriteBackQueue


def fast(**kw: object) -> WriteBackConfig:
    opts: dict[str, object] = {
        "backoff_base": 0.001, "backoff_max": 0.01, "concurrency": 4, "defer_uploads": 0.0,
    }
    opts.update(kw)
    return WriteBackConfig(**opts)  # type: ignore[arg-type]


class Env:
    def __init__(self, root: Path) -> None:
        self.dir = root / "wb"
        self.mem = MemoryUnderStore()
        self.store = FaultInjectingUnderStore(self.mem)

    def factory(self, uri: str) -> UnderStore:
        return self.store

    async def open(self, **kw: object) -> WriteBackQueue:
        start = bool(kw.pop("start", True))
        return await WriteBackQueue.open(self.dir, self.factory, fast(**kw), start=start)

    def obj(self, key: str) -> bytes | None:
        o = self.mem.bucket.objects.get(key)
        return None if o is None else o.data


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


async def agen(*chunks: bytes) -> AsyncIterator[Buffer]:
    for c in chunks:
        await asyncio.sleep(0)
        yield c


async def test_stage_upload_byte_identical(env: Env) -> None:
    q = await env.open()
    data = os.urandom(300_000)
    t = await q.stage("/a/x.bin", "a/x.bin", agen(data[:1000], data[1000:]))
    assert t.size == len(data) and t.staging_path.exists()
    await q.sync(timeout=5)
    assert env.obj("a/x.bin") == data
    assert not t.staging_path.exists()
    assert q.pending("/a/x.bin") is None
    s = q.stats()
    assert s["dirty_bytes"] == 0 and s["queue_length"] == 0 and s["uploaded"] == 1
    assert s["upload_rate"] > 0
    await q.close()


async def test_sources_bytes_and_file(env: Env) -> None:
    q = await env.open()
    await q.stage("/b", "b", b"bytes-source")
    await q.stage("/f", "f", io.BytesIO(b"file-source"))
    await q.sync(timeout=5)
    assert env.obj("b") == b"bytes-source" and env.obj("f") == b"file-source"
    await q.close()


async def test_pending_serves_staged_bytes_and_sync_waits(env: Env) -> None:
    env.store.set_latency(0.2, ops={"put"})
    q = await env.open()
    t = await q.stage("/p", "p", b"hello")
    info = q.pending("/p")
    assert info is not None and info.staging_path.read_bytes() == b"hello"
    assert env.obj("p") is None  # not uploaded yet: the read path must use the staged bytes
    with pytest.raises(Timeout):
        await q.sync("/p", timeout=0.01)
    await q.sync("/p", timeout=5)
    assert env.obj("p") == b"hello" and q.pending("/p") is None and t.seq == 1
    await q.close()


async def test_multipart_for_large_files(env: Env) -> None:
    q = await env.open(multipart_threshold=1000, part_size=256)
    data = os.urandom(5000)
    await q.stage("/big", "big", data)
    await q.sync(timeout=5)
    assert env.obj("big") == data
    assert env.store.calls["put_multipart"] == 1 and env.store.calls["put"] == 0
    await q.close()


async def test_supersede_last_write_wins(env: Env) -> None:
    env.store.set_latency(0.01)
    q = await env.open(concurrency=8)
    for i in range(30):
        await q.stage("/same", "same", f"version {i}".encode())
        if i % 7 == 0:
            await asyncio.sleep(0.015)  # let some uploads start in between
    await q.sync(timeout=10)
    assert env.obj("same") == b"version 29"
    s = q.stats()
    assert s["superseded"] > 0 and s["uploaded"] + s["superseded"] == 30
    await q.close()


async def test_inflight_older_upload_never_lands_after_newer(env: Env) -> None:
    landed: list[bytes] = []

    class Recording(MemoryUnderStore):
        async def put(self, key: str, data: Buffer, **kw: Any) -> object:  # type: ignore[override]
            await asyncio.sleep(0.05 if bytes(data) == b"old" else 0)
            landed.append(bytes(data))
            return await super().put(key, data, **kw)

    store = Recording()
    q = await WriteBackQueue.open(env.dir, lambda uri: store, fast())
    await q.stage("/k", "k", b"old")
    await asyncio.sleep(0.01)  # "old" is in flight now
    await q.stage("/k", "k", b"new")
    await q.sync(timeout=5)
    assert landed == [b"old", b"new"]
    assert store.bucket.objects["k"].data == b"new"
    await q.close()


async def test_retry_transient_errors(env: Env) -> None:
    env.store.fail_next(3, Throttled("slow down"), ops={"put"})
    q = await env.open()
    await q.stage("/r", "r", b"retry me")
    await q.sync(timeout=5)
    assert env.obj("r") == b"retry me"
    assert q.stats()["retries"] == 3 and env.store.calls["put"] == 4
    await q.close()


async def test_permanent_error_kept_for_operator(env: Env) -> None:
    env.store.fail_next(1, PermissionDenied("denied"), ops={"put"})
    q = await env.open()
    t = await q.stage("/d", "d", b"keep me")
    with pytest.raises(PermissionDenied):
        await q.sync(timeout=5)
    s = q.stats()
    assert [f["code"] for f in s["failures"]] == ["PermissionDenied"]
    assert s["dirty_bytes"] == 7 and t.staging_path.exists() and q.pending("/d") is not None
    await q.close()
    # Still there after a restart (and uploaded now that the store accepts it).
    q = await env.open()
    await q.sync(timeout=5)
    assert env.obj("d") == b"keep me" and q.stats()["failures"] == []
    await q.close()


async def test_retry_failed_and_abandon(env: Env) -> None:
    env.store.fail_next(2, PermissionDenied("denied"), ops={"put"})
    q = await env.open()
    t1 = await q.stage("/x", "x", b"1")
    t2 = await q.stage("/y", "y", b"2")
    with pytest.raises(PermissionDenied):
        await q.sync("/x", timeout=5)
    with pytest.raises(PermissionDenied):
        await q.sync("/y", timeout=5)
    assert q.stats()["upload_failures"] == 2
    assert await q.retry_failed(t1.seq) == 1
    await q.sync("/x", timeout=5)
    await q.abandon(t2.seq, "operator said so")
    assert not t2.staging_path.exists() and q.stats()["failures"] == []
    with pytest.raises(NotFound):
        await q.abandon(t2.seq, "again")
    await q.close()
    q = await env.open(start=False)
    assert q.stats()["queue_length"] == 0
    await q.close()


async def test_max_attempts_turns_retryable_into_failure(env: Env) -> None:
    env.store.fail_next(10, Throttled("slow"), ops={"put"})
    q = await env.open(max_attempts=3)
    await q.stage("/m", "m", b"x")
    with pytest.raises(Throttled):
        await q.sync(timeout=5)
    assert q.stats()["failures"][0]["attempts"] == 3
    assert q.stats()["upload_failures"] == 1 and q.stats()["retries"] == 2
    await q.close()


async def test_crash_before_upload_then_recover(env: Env) -> None:
    q = await env.open(start=False)
    blobs = {f"/c/{i}": os.urandom(1000 + i) for i in range(20)}
    for p, b in blobs.items():
        await q.stage(p, p[1:], b)
    await q.close()  # "crash": nothing was uploaded, no record beyond the acknowledged ones
    assert env.mem.bucket.objects == {}
    q = await env.open()
    assert q.stats()["queue_length"] == 20
    await q.sync(timeout=5)
    for p, b in blobs.items():
        assert env.obj(p[1:]) == b
    assert os.listdir(env.dir / "staging") == []
    await q.close()


async def test_attributes_survive_a_restart_and_old_records_still_replay(env: Env) -> None:
    attrs = Attributes.of({"Content-Type": "text/csv"}, {"owner": "team-a"})
    q = await env.open(start=False, multipart_threshold=100, part_size=64)
    small = await q.stage("/a/small", "a/small", b"x" * 10, attributes=attrs)
    await q.stage("/a/big", "a/big", b"y" * 300, attributes=attrs)
    await q.stage("/a/plain", "a/plain", b"z")
    assert small.attributes == attrs
    await q.close()  # "crash" before any upload: the attributes live in the journal only
    # A staged record as an older depot wrote it (no "attrs"), appended by hand.
    staged = env.dir / "staging" / "old.data"
    staged.write_bytes(b"old")
    record = {"t": "staged", "seq": 9, "path": "/a/old", "store": "", "key": "a/old",
              "file": "old.data", "file_id": "/a/old", "size": 3,
              "xxh3": xxhash.xxh3_64_hexdigest(b"old"), "at": 1.0}
    with open(env.dir / "journal", "ab") as f:
        f.write(encode_frame(record))
    q = await env.open(multipart_threshold=100, part_size=64)
    assert q.pending("/a/small") is not None and q.pending("/a/small").attributes == attrs  # type: ignore[union-attr]
    assert q.pending("/a/old").attributes is None  # type: ignore[union-attr]
    await q.sync(timeout=5)
    objects = env.mem.bucket.objects
    assert objects["a/small"].attributes == attrs and objects["a/big"].attributes == attrs
    assert objects["a/plain"].attributes == Attributes() and objects["a/old"].data == b"old"
    await q.close()


async def test_torn_tail_ignored(env: Env) -> None:
    q = await env.open(start=False)
    await q.stage("/t1", "t1", b"one")
    await q.stage("/t2", "t2", b"two")
    await q.close()
    journal = env.dir / "journal"
    # Emulate a crash in the middle of appending a third record: a prefix of its frame.
    frame = encode_frame({"t": "staged", "seq": 3, "path": "/t3", "x": "y" * 50})
    with open(journal, "ab") as f:
        f.write(frame[: len(frame) // 2])
    (env.dir / "staging" / "orphan.data").write_bytes(b"never acknowledged")
    q = await env.open()
    assert q.stats()["journal_torn_bytes"] == len(frame) // 2
    await q.sync(timeout=5)
    assert env.obj("t1") == b"one" and env.obj("t2") == b"two" and env.obj("t3") is None
    assert not (env.dir / "staging" / "orphan.data").exists()
    t = await q.stage("/t4", "t4", b"four")
    assert t.seq == 3  # seq numbers continue after the acknowledged ones
    await q.sync(timeout=5)
    await q.close()
    assert Journal.replay(journal).torn_bytes == 0  # the torn tail was cut off at reopen


async def test_truncated_acknowledged_journal_midrecord(env: Env) -> None:
    q = await env.open(start=False)
    for i in range(3):
        await q.stage(f"/u{i}", f"u{i}", b"x" * i)
    await q.close()
    journal = env.dir / "journal"
    data = journal.read_bytes()
    journal.write_bytes(data[:-5])  # the last record is cut: as if its append was torn
    q = await env.open()
    await q.sync(timeout=5)
    assert env.obj("u0") == b"" and env.obj("u1") == b"x" and env.obj("u2") is None
    await q.close()


def test_journal_decode_rules() -> None:
    a = encode_frame({"t": "seq", "next": 1})
    b = encode_frame({"t": "seq", "next": 2})
    assert decode(MAGIC + a + b).records == [{"t": "seq", "next": 1}, {"t": "seq", "next": 2}]
    assert decode(MAGIC[:3]).records == [] and decode(b"").records == []
    # A torn or zero-filled tail is ignored; garbage in the middle is corruption.
    assert decode(MAGIC + a + b"\x00" * 40).torn_bytes == 40
    bad = bytearray(a)
    bad[-2] ^= 0xFF
    with pytest.raises(Corrupted):
        decode(MAGIC + bytes(bad) + b)
    assert decode(MAGIC + b + bytes(bad)).records == [{"t": "seq", "next": 2}]
    with pytest.raises(Corrupted):
        decode(b"NOTAJOURNAL")


async def test_lost_staging_file_reported_loudly(env: Env) -> None:
    q = await env.open(start=False)
    big = 100_000  # above the inline size: the journal does not carry the content
    t1 = await q.stage("/l1", "l1", b"g" * big)
    t2 = await q.stage("/l2", "l2", b"f" * big)
    await q.close()
    t1.staging_path.unlink()
    t2.staging_path.write_bytes(b"F" * big)
    q = await env.open()
    failures = q.stats()["failures"]
    assert [(f["path"], f["state"], f["code"]) for f in failures] == [
        ("/l1", "lost", "Corrupted"),
        ("/l2", "lost", "Corrupted"),
    ]
    with pytest.raises(Corrupted):
        await q.sync("/l1", timeout=5)
    assert env.obj("l1") is None and env.obj("l2") is None
    await q.close()
    q = await env.open(start=False)  # still reported after another restart
    assert len(q.stats()["failures"]) == 2
    await q.abandon(t1.seq, "operator")
    await q.close()


async def test_small_write_carried_by_its_journal_record(env: Env) -> None:
    """A small write is acknowledged on the journal's fsync alone: its record holds the content,
    so a staging file lost with the page cache (emulated: deleted, emptied, or torn) is written
    again at recovery, and compaction makes the files durable before it drops the content."""
    q = await env.open(start=False)
    t1 = await q.stage("/s1", "s1", b"small one")
    t2 = await q.stage("/s2", "s2", agen(b"small ", b"two"))
    t3 = await q.stage("/s3", "s3", b"t" * 1000)
    big = await q.stage("/b", "b", b"b" * 100_000)
    journal = (env.dir / "journal").read_bytes()
    assert base64.b64encode(b"small one") in journal
    assert base64.b64encode(b"b" * 100_000) not in journal
    await q.close()
    t1.staging_path.unlink()
    t2.staging_path.write_bytes(b"")
    t3.staging_path.write_bytes(b"t" * 10)
    q = await env.open()
    assert q.stats()["failures"] == []
    await q.sync(timeout=10)
    assert env.obj("s1") == b"small one"
    assert env.obj("s2") == b"small two"
    assert env.obj("s3") == b"t" * 1000
    assert env.obj("b") == b"b" * 100_000
    assert big.seq == 4
    await q.close()
    # Recovery rewrote the journal without the content: the files are durable by then.
    assert base64.b64encode(b"small one") not in (env.dir / "journal").read_bytes()


async def test_compaction_makes_inline_writes_durable_first(env: Env) -> None:
    q = await env.open(start=False, compact_after=3)
    tickets = [await q.stage(f"/c{i}", f"c{i}", f"content {i}".encode()) for i in range(4)]
    journal = (env.dir / "journal").read_bytes()
    assert base64.b64encode(b"content 0") not in journal  # compacted after the third
    assert base64.b64encode(b"content 3") in journal
    await q.close()
    for ticket in tickets[:3]:  # their content now lives only in the (fsync'd) files
        assert ticket.staging_path.read_bytes() == f"content {ticket.seq - 1}".encode()
    q = await env.open()
    await q.sync(timeout=10)
    assert [env.obj(f"c{i}") for i in range(4)] == [f"content {i}".encode() for i in range(4)]
    await q.close()


async def test_quota_error_and_wait(env: Env) -> None:
    q = await env.open(start=False, staging_quota=100)
    await q.stage("/q1", "q1", b"x" * 80)
    with pytest.raises(NoSpace) as info:
        await q.stage("/q2", "q2", agen(b"y" * 10, b"y" * 20))
    assert info.value.errno == 28
    assert len(os.listdir(env.dir / "staging")) == 1  # the partial file is gone
    with pytest.raises(NoSpace):
        await q.stage("/q3", "q3", b"z", size_hint=1000)
    await q.close()

    q = await env.open(staging_quota=100, on_full="wait", full_wait_timeout=5)
    env.store.set_latency(0.05, ops={"put"})
    await q.stage("/q4", "q4", b"y" * 60)
    await q.stage("/q5", "q5", b"z" * 60)  # waits for uploads to free space
    await q.sync(timeout=5)
    assert env.obj("q1") == b"x" * 80 and env.obj("q5") == b"z" * 60
    await q.close()


async def test_no_partial_object_on_multipart_failure(env: Env) -> None:
    seen_at_failure: list[bytes] = []

    class FailingMultipart(MemoryUnderStore):
        fails = 1

        async def put_multipart(  # type: ignore[override]
            self, key: str, chunks: AsyncIterator[Buffer], *, part_size: int = 8 << 20, **kw: Any
        ) -> object:
            parts: list[bytes] = []
            async for chunk in chunks:
                parts.append(bytes(chunk))
                if self.fails and len(parts) == 2:
                    self.fails -= 1
                    seen_at_failure.append(self.bucket.objects[key].data)
                    raise Throttled("connection reset mid-upload")
            return await super().put_multipart(key, agen(*parts), part_size=part_size, **kw)

    store = FailingMultipart()
    store.bucket.store("m", b"old version")
    q = await WriteBackQueue.open(
        env.dir, lambda uri: store, fast(multipart_threshold=10, part_size=16)
    )
    data = os.urandom(100)
    await q.stage("/m", "m", data)
    await q.sync(timeout=5)
    assert seen_at_failure == [b"old version"]  # mid-upload, only the old object was visible
    assert store.bucket.objects["m"].data == data and q.stats()["retries"] == 1
    await q.close()


async def test_corrupt_staging_file_aborts_multipart_before_completion(env: Env) -> None:
    q = await env.open(start=False, multipart_threshold=10, part_size=16)
    env.mem.bucket.store("mp", b"old version")
    t = await q.stage("/mp", "mp", os.urandom(100))
    raw = bytearray(t.staging_path.read_bytes())
    raw[-1] ^= 0xFF  # bit rot after the acknowledgement, seen only while uploading
    t.staging_path.write_bytes(bytes(raw))
    q.start()
    with pytest.raises(Corrupted):
        await q.sync(timeout=5)
    assert env.obj("mp") == b"old version"  # no partial or wrong object under the name
    await q.close()


async def test_journal_compaction_keeps_live_records(env: Env) -> None:
    q = await env.open(compact_after=10)
    for i in range(40):
        await q.stage(f"/j{i % 5}", f"j{i % 5}", f"{i}".encode())
    await q.sync(timeout=5)
    await q.close()
    assert (env.dir / "journal").stat().st_size < 2000
    records = Journal.replay(env.dir / "journal").records
    assert all(r["t"] != "staged" or r["seq"] > 30 for r in records)
    q = await env.open()
    assert (await q.stage("/j", "j", b"n")).seq == 41
    await q.close()


async def test_bandwidth_limit(env: Env) -> None:
    q = await env.open(bandwidth_limit=100_000, concurrency=2)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(3):
        await q.stage(f"/bw{i}", f"bw{i}", b"b" * 100_000)
    await q.sync(timeout=10)
    assert loop.time() - start >= 1.5  # 300 kB at 100 kB/s with a 1 s burst
    await q.close()


# ---------------------------------------------------------------------- model-based

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("stage"), st.sampled_from(["/a", "/b", "/c"]), st.binary(max_size=64)),
        st.tuples(st.just("upload"), st.integers(0, 3), st.none()),
        st.tuples(st.just("crash"), st.booleans(), st.none()),
        st.tuples(st.just("fail"), st.integers(1, 2), st.none()),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_model_every_acknowledged_write_lands_last_wins(
    ops: list[tuple[str, object, object]],
) -> None:
    asyncio.run(_run_model(ops))


async def _run_model(ops: list[tuple[str, object, object]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = Env(Path(tmp))
        model: dict[str, bytes] = {}
        q = await env.open(start=False)
        for op, a, b in ops:
            if op == "stage":
                assert isinstance(a, str) and isinstance(b, bytes)
                await q.stage(a, a[1:], b)
                model[a] = b
                pending = q.pending(a)
                assert pending is not None and pending.staging_path.read_bytes() == b
            elif op == "upload":
                q.start()
                for _ in range(int(str(a))):
                    await asyncio.sleep(0)
            elif op == "crash":
                await q.close()
                if a:  # a torn, unacknowledged append on top
                    with open(env.dir / "journal", "ab") as f:
                        f.write(encode_frame({"t": "staged", "seq": 999})[:7])
                q = await env.open(start=False)
            elif op == "fail":
                env.store.fail_next(int(str(a)), Throttled("slow"), ops={"put"})
        q.start()
        await q.sync(timeout=10)
        for path, data in model.items():
            assert env.obj(path[1:]) == data
        assert q.stats()["queue_length"] == 0
        await q.close()


# local-write slots and deferred uploads -------------------------------------------------------


def _fill(path: Path, data: bytes) -> str:
    with open(path, "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return xxhash.xxh3_64_hexdigest(data)


async def test_slot_adopted_is_a_staged_write(env: Env) -> None:
    q = await env.open()
    slot = await q.open_slot("/s.bin", size_hint=5)
    assert slot.staging_path.exists() and slot.staging_path.parent == q.staging_dir
    checksum = _fill(slot.staging_path, b"hello")
    t = await q.adopt(slot.token, "/s.bin", "s.bin", 5, checksum)
    assert t.size == 5 and t.checksum == checksum and q.pending("/s.bin") == t
    await q.sync(timeout=5)
    assert env.obj("s.bin") == b"hello" and q.stats()["dirty_bytes"] == 0
    # A slot is used once; another path cannot take it; a wrong size drops it.
    with pytest.raises(NotFound):
        await q.adopt(slot.token, "/s.bin", "s.bin", 5, checksum)
    other = await q.open_slot("/o.bin")
    _fill(other.staging_path, b"abc")
    with pytest.raises(NotFound):
        await q.adopt(other.token, "/elsewhere.bin", "elsewhere.bin", 3, checksum)
    from depot.core.errors import InvalidArgument

    with pytest.raises(InvalidArgument):
        await q.adopt(other.token, "/o.bin", "o.bin", 4, checksum)
    assert not other.staging_path.exists() and q.stats()["queue_length"] == 0
    await q.close()


async def test_slot_quota_discard_and_recovery_drop(env: Env) -> None:
    q = await env.open(staging_quota=1000)
    with pytest.raises(NoSpace):
        await q.open_slot("/big", size_hint=2000)
    slot = await q.open_slot("/x")  # size unknown: checked at adopt
    data = os.urandom(1500)
    checksum = _fill(slot.staging_path, data)
    with pytest.raises(NoSpace):
        await q.adopt(slot.token, "/x", "x", len(data), checksum)
    assert not slot.staging_path.exists()
    kept = await q.open_slot("/y")
    assert await q.discard_slot(kept.token) and not kept.staging_path.exists()
    assert not await q.discard_slot(kept.token)
    left = await q.open_slot("/z")  # never committed: an orphan at the next open
    await q.close()
    q2 = await env.open()
    assert not left.staging_path.exists() and q2.pending("/z") is None
    with pytest.raises(NotFound):
        await q2.adopt(left.token, "/z", "z", 0, checksum)
    await q2.close()


async def test_uploads_wait_while_writes_come_in(env: Env) -> None:
    q = await env.open(defer_uploads=30.0)
    await q.stage("/first", "first", b"1")
    writing = await q.open_slot("/second")  # a write in progress: /first waits
    await asyncio.sleep(0.6)
    assert env.obj("first") is None
    checksum = _fill(writing.staging_path, b"2")
    await q.adopt(writing.token, "/second", "second", 1, checksum)
    # Then both go up once writes have been quiet for a moment.
    await _until(lambda: env.obj("first") is not None and env.obj("second") is not None, 5)
    assert env.obj("first") == b"1" and env.obj("second") == b"2"
    # A sync does not wait for the writes to stop.
    still = await q.open_slot("/third")
    await q.stage("/fourth", "fourth", b"4")
    await q.sync("/fourth", timeout=5)
    assert env.obj("fourth") == b"4"
    await q.discard_slot(still.token)
    await q.close()


async def _until(check: Callable[[], bool], seconds: float) -> None:
    """Poll ``check`` until it holds or ``seconds`` pass (the caller's assert says what)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not check() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.025)


async def test_deferral_is_capped_and_can_be_off(env: Env) -> None:
    q = await env.open(defer_uploads=0.5)
    writing = await q.open_slot("/open-for-long")
    await q.stage("/capped", "capped", b"c")
    await _until(lambda: env.obj("capped") is not None, 3)
    assert env.obj("capped") == b"c"  # uploaded within the cap though the slot is still open
    await q.discard_slot(writing.token)
    await q.close()
    q = await env.open(defer_uploads=0)
    writing = await q.open_slot("/open")
    await q.stage("/at-once", "at-once", b"a")
    await _until(lambda: env.obj("at-once") is not None, 1)
    assert env.obj("at-once") == b"a"
    await q.discard_slot(writing.token)
    await q.close()
