"""Crash harness of write-back (docs/writes.md): kill -9 a real worker process mid-write and
mid-upload, restart it on the same cache dir, sync, and check what the under store holds.

Used by ``tests/integration/test_writeback.py`` (a few dozen iterations) and by
``bench/writeback_soak.py`` (many more). The under store is a local directory (``file://``),
whose writes land by rename, so a watcher polling it can tell a partial object from a whole one.
Every other file of a round is a local write (``/api/v1/write/open``, the file written and
fsync'd here, ``/api/v1/write/commit``), the rest are streamed PUTs: the kill lands in either.

Checked, every iteration:

- every write the worker acknowledged (HTTP 200) is in the under store byte-identical after
  the restart and ``sync``; for an overwritten path, the store holds the last acknowledged
  content or a later attempted one (a write journaled just before the kill whose answer never
  reached the client is durable too: it was acknowledged by the worker, not to the client);
- at every moment the watcher looked, each object under a final name was whole: equal to one
  content that some client tried to write to that name (never a prefix, never a mix);
- after the sync the worker reports no failures and nothing pending.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

SHARED = "shared.bin"  # overwritten by every iteration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Harness:
    """One worker process over ``root/ufs`` with its cache in ``root/cache``."""

    root: Path
    bandwidth: str = "3MiB"
    multipart_threshold: str = "512KiB"
    part_size: str = "128KiB"
    max_size: int = 1536 * 1024
    files_per_round: int = 4
    seed: int = 0
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    attempted: dict[str, set[str]] = field(default_factory=dict)  # name -> digests tried
    violations: list[str] = field(default_factory=list)
    observations: int = 0
    kills: int = 0
    recovered: int = 0  # acknowledged writes a restarted worker found in its journal
    acknowledged: int = 0

    def __post_init__(self) -> None:
        self.ufs = self.root / "ufs"
        self.cache = self.root / "cache"
        self.ufs.mkdir(parents=True, exist_ok=True)
        self.config = self.root / "depot.yaml"
        self.config.write_text(
            json.dumps(
                {
                    "worker": {"host": "127.0.0.1", "port": self.port},
                    "cache": {"dirs": [{"path": str(self.cache), "size": "1GiB"}],
                              "page_size": "64KiB"},
                    "mounts": [{"path": "/", "ufs": self.ufs.as_uri(), "write_mode": "write-back",
                                "metadata": "max-age=0s"}],
                    "writeback": {"bandwidth": self.bandwidth,
                                  "multipart_threshold": self.multipart_threshold,
                                  "part_size": self.part_size, "concurrency": 4},
                    "log_level": "warning",
                }
            )
        )
        self.rng = random.Random(self.seed)
        self.last_acked_shared: str | None = None
        self.shared_after_ack: set[str] = set()
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # process ---------------------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> None:
        log = open(self.root / "worker.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "depot.cli.main", "worker", "--config", str(self.config)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "DEPOT_CONFIG": ""},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}: {self.log_tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, _ = self.request("GET", "/healthz", timeout=1.0)
                if status == 200:
                    return
            time.sleep(0.02)
        raise RuntimeError(f"worker did not start: {self.log_tail()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        self._stop_watch.set()
        if self._watcher is not None:
            self._watcher.join(5)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "worker.log").read_text()[-2000:]
        return ""

    def request(
        self, method: str, target: str, body: bytes | None = None, timeout: float = 30.0
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, target, body=body)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    # watcher ---------------------------------------------------------------------------------
    def watch(self) -> None:
        """Poll the under store in a thread: every object under a final name must be whole."""

        def run() -> None:
            while not self._stop_watch.is_set():
                self.check_objects()
                time.sleep(0.002)

        self._watcher = threading.Thread(target=run, name="ufs-watcher", daemon=True)
        self._watcher.start()

    def check_objects(self) -> None:
        for dirpath, _dirs, names in os.walk(self.ufs):
            for name in names:
                if "#" in name or name.startswith("."):
                    continue  # the store's temp files, renamed over the final name when whole
                path = Path(dirpath) / name
                rel = path.relative_to(self.ufs).as_posix()
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue
                self.observations += 1
                if _digest(data) not in self.attempted.get(rel, set()):
                    self.violations.append(
                        f"{rel}: {len(data)} bytes that no client wrote (a partial object?)"
                    )

    # one round --------------------------------------------------------------------------------
    def _payload(self) -> bytes:
        big = self.rng.randrange(self.max_size // 2, self.max_size + 1)
        size = self.rng.choice([0, 1, 4096, big, big, big])
        return self.rng.randbytes(size)

    def round(self, index: int, kill_at: float | None) -> dict[str, bytes]:
        """Write a few files at once (and ``SHARED``); kill -9 the worker ``kill_at`` seconds
        in (None: no kill). Returns the acknowledged writes (name -> content)."""
        jobs = [(f"r{index}/f{i}.bin", self._payload()) for i in range(self.files_per_round)]
        jobs.append((SHARED, self._payload()))
        for name, data in jobs:
            self.attempted.setdefault(name, set()).add(_digest(data))
        acked: dict[str, bytes] = {}
        lock = threading.Lock()

        def put(name: str, data: bytes) -> None:
            try:
                status, _ = self.request("PUT", f"/api/v1/write?path=/{name}", data)
            except (OSError, http.client.HTTPException):
                return
            if status == 200:
                with lock:
                    acked[name] = data

        def put_local(name: str, data: bytes) -> None:
            try:
                status, body = self.request("POST", f"/api/v1/write/open?path=/{name}")
                if status != 200:
                    return
                slot = json.loads(body)
                fd = os.open(slot["file"], os.O_WRONLY)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                status, _ = self.request(
                    "POST",
                    f"/api/v1/write/commit?path=/{name}&token={slot['token']}"
                    f"&size={len(data)}&checksum={xxhash.xxh3_64_hexdigest(data)}",
                )
            except (OSError, http.client.HTTPException, ValueError):
                return  # the worker died (its slot file with it): not acknowledged
            if status == 200:
                with lock:
                    acked[name] = data

        threads = [
            threading.Thread(target=put_local if i % 2 else put, args=job)
            for i, job in enumerate(jobs)
        ]
        for t in threads:
            t.start()
        if kill_at is not None:
            time.sleep(kill_at)
            self.kill()
        for t in threads:
            t.join(30)
        if SHARED in acked:
            self.last_acked_shared = _digest(acked[SHARED])
            self.shared_after_ack = set()
        else:
            self.shared_after_ack |= self.attempted_round_shared(jobs)
        return acked

    @staticmethod
    def attempted_round_shared(jobs: list[tuple[str, bytes]]) -> set[str]:
        return {_digest(d) for n, d in jobs if n == SHARED}

    def sync(self, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.request("POST", "/api/v1/sync?wait=1&timeout=10", timeout=30)
            if status == 200:
                doc: dict[str, Any] = json.loads(body)
                return doc
            if status != 504 or time.monotonic() > deadline:
                raise AssertionError(f"sync answered {status}: {body[:300]!r}")

    def verify(self, acked: dict[str, bytes]) -> None:
        """After a sync: acknowledged files are in the store, byte-identical."""
        for name, data in acked.items():
            if name == SHARED:
                continue
            path = self.ufs / name
            if not path.exists():
                self.violations.append(f"{name}: acknowledged but not in the under store")
            elif path.read_bytes() != data:
                self.violations.append(f"{name}: acknowledged but the store holds other bytes")
        shared = self.ufs / SHARED
        if self.last_acked_shared is not None:
            allowed = {self.last_acked_shared} | self.shared_after_ack
            if not shared.exists() or _digest(shared.read_bytes()) not in allowed:
                self.violations.append(f"{SHARED}: not the last acknowledged content")
        _status, body = self.request("GET", "/api/v1/cache/stats")
        stats = json.loads(body).get("writeback", {})
        if stats.get("failures") or stats.get("queue_length"):
            self.violations.append(f"after sync: {stats.get('failures')} {stats.get('queue_length')}")


def run(root: Path, iterations: int, seed: int = 0, **kw: Any) -> Harness:
    """``iterations`` rounds of write / kill -9 / restart / sync / verify. Check
    ``harness.violations`` (empty when every guarantee held)."""
    h = Harness(root, seed=seed, **kw)
    h.watch()
    try:
        h.start()
        for i in range(iterations):
            kill_at = h.rng.uniform(0.0, 0.25) if i % 5 != 4 else None
            acked = h.round(i, kill_at)
            h.acknowledged += len(acked)
            if h.proc is None:
                h.kills += 1
                h.start()
                _, body = h.request("GET", "/api/v1/cache/stats")
                wb = json.loads(body).get("writeback", {})
                h.recovered += int(wb.get("queue_length", 0)) + int(wb.get("uploaded", 0))
            h.sync()
            h.verify(acked)
            if h.violations:
                break
    finally:
        h.stop()
    h.check_objects()
    return h


__all__ = ["Harness", "free_port", "run"]
