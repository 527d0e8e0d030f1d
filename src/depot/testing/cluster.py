"""A real multi-process cluster on loopback: etcd and N ``depot worker`` processes.

Tests and benchmarks of the cluster paths (placement, failover, restarts, etcd outages) need
real processes: a worker that is SIGKILLed must vanish the way a crashed host does, with its
sockets reset and its etcd lease left to expire. :class:`LocalCluster` starts them::

    with LocalCluster(tmp_path, workers=3) as cluster:   # its own etcd, a local-dir UFS
        (cluster.ufs_root / "f.bin").write_bytes(data)
        fs = fsspec.filesystem("depot", endpoint=cluster.endpoint)
        cluster.kill(0)                                    # SIGKILL
        cluster.restart(0)                                 # same port, same cache dir
        cluster.wait_ready()

Each worker gets a free loopback port, its own cache dir (so a restart keeps its ring identity
and its pages), its own YAML config and log file, and runs ``python -m depot.cli.main worker``
in the work dir (so no ``depot.yaml`` of the caller's directory is picked up, and ``DEPOT_*``
variables of the caller's environment are not passed on unless given in ``env``). Membership is
``etcd`` (an etcd the cluster starts itself, an :class:`EtcdControl` such as the test suite's
session etcd, or just a URL) or ``static`` (the worker URLs, fixed at construction).

Short timings by default, to keep tests fast: lease TTL 3 s, pages of 1 MiB, segments of 8 MiB.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

__all__ = [
    "ClusterNotReady",
    "EtcdControl",
    "LocalCluster",
    "LocalEtcd",
    "WorkerProcess",
    "etcd_binary",
    "free_port",
    "http_json",
]

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class ClusterNotReady(RuntimeError):
    """The cluster did not reach the state waited for; the message holds the workers' logs."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_json(url: str, timeout: float = 2.0) -> Any:
    """GET ``url`` and parse its JSON body (``urllib.error.URLError``/``OSError`` on failure)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def etcd_binary() -> str | None:
    """``etcd`` from ``DEPOT_ETCD``, ``PATH`` or ``/usr/bin/etcd``."""
    for candidate in (os.environ.get("DEPOT_ETCD", ""), shutil.which("etcd") or "", "/usr/bin/etcd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def _stop_process(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


@runtime_checkable
class EtcdControl(Protocol):
    """An etcd the cluster can stop and start again (same ports and data dir)."""

    @property
    def endpoint(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class LocalEtcd:
    """A single-node etcd on free loopback ports; ``stop()``/``start()`` keep its data."""

    def __init__(self, workdir: Path, binary: str | None = None) -> None:
        found = binary or etcd_binary()
        if found is None:
            raise FileNotFoundError("etcd not found (set DEPOT_ETCD or install etcd-server)")
        self.binary = found
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = workdir / "data"
        self.log_path = workdir / "etcd.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start and wait until etcd has a leader (``/health`` says true)."""
        if self.running:
            return
        client = self.endpoint
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            self.binary,
            "--name", "depot-local",
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"depot-local={peer}",
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"etcd exited with {self.proc.returncode}:\n{_tail(self.log_path)}"
                )
            try:
                with urllib.request.urlopen(client + "/health", timeout=1) as resp:
                    if b'"true"' in resp.read():
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd not healthy within {START_TIMEOUT}s:\n{_tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGTERM, STOP_TIMEOUT)

    def log_tail(self, limit: int = 4000) -> str:
        return _tail(self.log_path, limit)


@dataclass
class WorkerProcess:
    """One worker of a :class:`LocalCluster`: its port and cache dir outlive its process."""

    index: int
    port: int
    cache_dir: Path
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running and self.proc is not None else None

    @property
    def worker_uuid(self) -> str | None:
        """The identity persisted in the cache dir (None before the first start)."""
        try:
            return (self.cache_dir / "worker-id").read_text().strip()
        except FileNotFoundError:
            return None

    def log_tail(self, limit: int = 4000) -> str:
        return _tail(self.log_path, limit)


class LocalCluster:
    """etcd (or a static list) and N worker processes on loopback; a context manager.

    ``workdir``: where cache dirs, configs and logs go (a temp dir, removed at the end, when
    None). ``ufs``: the directory or URI mounted at ``/`` (default: ``workdir/ufs``, created);
    ``mounts``: mount dicts instead. ``etcd``: None (start one), an :class:`EtcdControl`, or
    etcd URLs (the cluster cannot stop those). ``config``: more config sections merged into every
    worker's file (``{"worker": {"prefetch_pages": 8}}``).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        workers: int = 3,
        *,
        ufs: str | os.PathLike[str] | None = None,
        mounts: Sequence[Mapping[str, Any]] | None = None,
        membership: str = "etcd",
        etcd: EtcdControl | str | Sequence[str] | None = None,
        cluster_name: str | None = None,
        lease_ttl: float = 3.0,
        page_size: str | int = "1MiB",
        segment_size: str | int = "8MiB",
        cache_size: str | int = "1GiB",
        replication: int = 1,
        metadata: str = "max-age=60s",
        config: Mapping[str, Mapping[str, Any]] | None = None,
        env: Mapping[str, str] | None = None,
        log_level: str = "info",
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        if membership not in ("etcd", "static"):
            raise ValueError(f"membership must be 'etcd' or 'static', not {membership!r}")
        if workers < 1:
            raise ValueError("a cluster needs at least one worker")
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="depot-cluster-")).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.membership = membership
        self.cluster_name = cluster_name or f"lc-{uuid.uuid4().hex[:12]}"
        self.lease_ttl = lease_ttl
        self.start_timeout = start_timeout
        self._initial = workers
        self._extra = {k: dict(v) for k, v in (config or {}).items()}
        self._env = dict(env or {})
        self._log_level = log_level
        self._page_size = page_size
        self._segment_size = segment_size
        self._cache_size = cache_size
        self._replication = replication

        self.ufs_root: Path | None = None
        if mounts is not None:
            self.mounts = [dict(m) for m in mounts]
        else:
            if ufs is None:
                self.ufs_root = self.workdir / "ufs"
                self.ufs_root.mkdir(exist_ok=True)
                uri = self.ufs_root.as_uri()
            elif "://" in str(ufs):
                uri = str(ufs)
            else:
                self.ufs_root = Path(ufs).resolve()
                uri = self.ufs_root.as_uri()
            self.mounts = [{"path": "/", "ufs": uri, "metadata": metadata}]

        self._etcd_control: EtcdControl | None = None
        self._own_etcd: LocalEtcd | None = None
        self._etcd_urls: list[str] = []
        if membership == "etcd":
            if etcd is None:
                self._own_etcd = LocalEtcd(self.workdir / "etcd")
                self._etcd_control = self._own_etcd
            elif isinstance(etcd, str):
                self._etcd_urls = [u for u in etcd.split(",") if u.strip()]
            elif isinstance(etcd, EtcdControl):
                self._etcd_control = etcd
            else:
                self._etcd_urls = list(etcd)

        self.workers: list[WorkerProcess] = []
        for _ in range(workers):
            self._new_worker()
        self._static_endpoints = [w.endpoint for w in self.workers]
        self._started = False
        self._closed = False

    # --- properties -----------------------------------------------------------------------

    @property
    def etcd_endpoints(self) -> list[str]:
        if self._etcd_control is not None:
            return [self._etcd_control.endpoint]
        return list(self._etcd_urls)

    @property
    def endpoints(self) -> list[str]:
        """Every worker's URL (running or not), by index."""
        return [w.endpoint for w in self.workers]

    @property
    def endpoint(self) -> str:
        """The URL of the first running worker (what a client is given)."""
        for w in self.workers:
            if w.running:
                return w.endpoint
        return self.workers[0].endpoint

    @property
    def running(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.running]

    def index_of(self, endpoint: str) -> int:
        for w in self.workers:
            if w.endpoint == endpoint.rstrip("/"):
                return w.index
        raise KeyError(endpoint)

    # --- configuration ---------------------------------------------------------------------

    def _new_worker(self) -> WorkerProcess:
        index = len(self.workers)
        name = f"w{index}"
        worker = WorkerProcess(
            index=index,
            port=free_port(),
            cache_dir=self.workdir / name / "cache",
            config_path=self.workdir / name / "depot.yaml",
            log_path=self.workdir / name / "worker.log",
        )
        worker.cache_dir.mkdir(parents=True, exist_ok=True)
        self.workers.append(worker)
        return worker

    def _worker_config(self, worker: WorkerProcess) -> dict[str, Any]:
        cluster: dict[str, Any] = {
            "name": self.cluster_name,
            "membership": self.membership,
            "lease_ttl": self.lease_ttl,
            "segment_size": self._segment_size,
            "replication": self._replication,
            "advertise": worker.endpoint,
        }
        if self.membership == "etcd":
            cluster["etcd"] = self.etcd_endpoints
        else:
            cluster["workers"] = self._static_endpoints
        cfg: dict[str, Any] = {
            "worker": {"host": "127.0.0.1", "port": worker.port},
            "cache": {
                "page_size": self._page_size,
                "dirs": [{"path": str(worker.cache_dir), "size": self._cache_size}],
            },
            "mounts": self.mounts,
            "cluster": cluster,
            "log_level": self._log_level,
        }
        for section, values in self._extra.items():
            if isinstance(cfg.get(section), dict):
                cfg[section] = {**cfg[section], **values}
            else:
                cfg[section] = values
        return cfg

    def _child_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEPOT_")}
        env.update(self._env)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Start etcd (if the cluster owns it) and every worker; wait until all see each other."""
        if self._started:
            return self
        self._started = True
        try:
            if self._own_etcd is not None:
                self._own_etcd.start()
            for worker in self.workers:
                self._spawn(worker)
            for worker in self.workers:
                self._wait_listening(worker)
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def _spawn(self, worker: WorkerProcess) -> None:
        import yaml

        if worker.running:
            raise RuntimeError(f"worker {worker.index} is already running")
        worker.config_path.write_text(yaml.safe_dump(self._worker_config(worker)))
        with worker.log_path.open("ab") as log:
            log.write(f"--- start {worker.starts} of worker {worker.index} ---\n".encode())
            log.flush()
            worker.proc = subprocess.Popen(
                [sys.executable, "-m", "depot.cli.main", "worker", "--config",
                 str(worker.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=worker.config_path.parent, env=self._child_env(),
            )  # fmt: skip
        worker.starts += 1

    def _wait_listening(self, worker: WorkerProcess, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while time.monotonic() < deadline:
            proc = worker.proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise ClusterNotReady(
                    f"worker {worker.index} exited with {code}:\n{worker.log_tail()}"
                )
            try:
                if http_json(worker.endpoint + "/healthz", timeout=1.0).get("status") == "ok":
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise ClusterNotReady(
            f"worker {worker.index} did not answer within the start timeout:\n{worker.log_tail()}"
        )

    def expected_endpoints(self) -> set[str]:
        """The live set a converged view holds: the running workers (static: the list)."""
        if self.membership == "static":
            return set(self._static_endpoints)
        return {w.endpoint for w in self.running}

    def documents(self, timeout: float = 2.0) -> dict[int, dict[str, Any]]:
        """``/api/v1/cluster`` of every running worker that answers, by index."""
        out: dict[int, dict[str, Any]] = {}
        for worker in self.running:
            try:
                out[worker.index] = http_json(worker.endpoint + "/api/v1/cluster", timeout)
            except (OSError, ValueError):
                continue
        return out

    def wait_ready(
        self, expected: int | set[str] | None = None, timeout: float | None = None
    ) -> dict[int, dict[str, Any]]:
        """Wait until every running worker serves a view whose live workers are ``expected``
        (default: the running workers) and says it is healthy; returns the documents."""
        deadline = time.monotonic() + (timeout or self.start_timeout)
        last: dict[int, dict[str, Any]] = {}
        while True:
            want = self.expected_endpoints() if not isinstance(expected, set) else expected
            last = self.documents()
            running = {w.index for w in self.running}
            if running and set(last) == running and all(
                self._converged(doc, want, expected) for doc in last.values()
            ):
                return last
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        views = {
            i: sorted((w["endpoint"], w["state"]) for w in doc.get("workers", []))
            for i, doc in last.items()
        }
        raise ClusterNotReady(
            f"cluster did not converge on {sorted(self.expected_endpoints())} "
            f"(expected={expected!r}); views: {views}\n{self.describe()}"
        )

    @staticmethod
    def _converged(doc: dict[str, Any], want: set[str], expected: int | set[str] | None) -> bool:
        live = {w["endpoint"] for w in doc.get("workers", []) if w.get("state") == "live"}
        if not doc.get("healthy", False):
            return False
        if isinstance(expected, int):
            return len(live) == expected
        return live == want

    def stop(self, index: int, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM: the worker leaves the ring and exits."""
        proc = self.workers[index].proc
        if proc is not None:
            _stop_process(proc, signal.SIGTERM, timeout)

    def kill(self, index: int) -> None:
        """SIGKILL: as a crashed host; its etcd entry stays until its lease expires."""
        proc = self.workers[index].proc
        if proc is not None:
            _stop_process(proc, signal.SIGKILL, STOP_TIMEOUT)

    def pause(self, index: int) -> None:
        """SIGSTOP: a hung worker (connections open, no answers), as behind a partition."""
        proc = self.workers[index].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGSTOP)

    def resume(self, index: int) -> None:
        proc = self.workers[index].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)

    def restart(self, index: int, *, wait: bool = True) -> None:
        """Start a stopped or killed worker again: same port, same cache dir, same identity."""
        worker = self.workers[index]
        if worker.running:
            self.stop(index)
        self._spawn(worker)
        if wait:
            self._wait_listening(worker)

    def add_worker(self, *, wait: bool = True) -> int:
        """Start one more worker (etcd membership only: a static list cannot grow)."""
        if self.membership == "static":
            raise ValueError("a static cluster cannot grow: its worker list is fixed")
        worker = self._new_worker()
        self._spawn(worker)
        if wait:
            self._wait_listening(worker)
        return worker.index

    # etcd ------------------------------------------------------------------------------------
    def _control(self) -> EtcdControl:
        if self._etcd_control is None:
            raise ValueError("this cluster cannot stop or start its etcd (given as URLs, or static)")
        return self._etcd_control

    def etcd_stop(self) -> None:
        self._control().stop()

    def etcd_start(self) -> None:
        self._control().start()

    # diagnostics -----------------------------------------------------------------------------
    def stats(self, index: int, timeout: float = 2.0) -> dict[str, Any]:
        """``/api/v1/cache/stats`` of a worker."""
        data: dict[str, Any] = http_json(
            self.workers[index].endpoint + "/api/v1/cache/stats", timeout
        )
        return data

    def describe(self, limit: int = 3000) -> str:
        """Every worker's state and the tail of its log (and etcd's, if the cluster owns it)."""
        parts = []
        for w in self.workers:
            state = "running" if w.running else f"exited {w.proc.returncode if w.proc else None}"
            parts.append(
                f"--- worker {w.index} {w.endpoint} ({state}) log {w.log_path}:\n"
                f"{w.log_tail(limit)}"
            )
        if self._own_etcd is not None:
            parts.append(f"--- etcd log:\n{self._own_etcd.log_tail(limit)}")
        return "\n".join(parts)

    def close(self) -> None:
        """Stop every worker (SIGTERM, SIGKILL after a while) and the etcd the cluster owns."""
        if self._closed:
            return
        self._closed = True
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                # A paused worker would never see the SIGTERM.
                w.proc.send_signal(signal.SIGCONT)
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(timeout=STOP_TIMEOUT)
        if self._own_etcd is not None:
            self._own_etcd.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is not None and not isinstance(exc, ClusterNotReady | KeyboardInterrupt):
                print(f"LocalCluster: {exc_type.__name__}; logs:\n{self.describe()}", file=sys.stderr)
        finally:
            self.close()
