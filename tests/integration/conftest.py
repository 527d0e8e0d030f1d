"""Real servers for integration tests: moto (S3) and Azurite (Azure Blob), one per session.

Each server runs as a subprocess on a free loopback port and is stopped at the end of the
session. When a server cannot be found, its tests are skipped with the reason, except under CI
(``CI`` set in the environment), where a missing server is a failure: CI must not go green by
testing nothing. Install the servers with ``scripts/install-test-deps.sh``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0

AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def missing(what: str) -> NoReturn:
    """Fail under CI, skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI is set, so this is an error)", pytrace=False)
    pytest.skip(what)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """A server subprocess and where its output goes."""

    name: str
    args: list[str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        log = self.log_path.open("wb")
        try:
            # Run in the log's directory: whatever a server leaves behind stays out of the repo.
            self.proc = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.log_path.parent,
            )
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"{self.name} did not listen within {START_TIMEOUT}s:\n{self.log_tail()}"
        )

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


# --- moto (S3) ---------------------------------------------------------------------------


@dataclass
class MotoServer:
    endpoint: str
    access_key_id: str = "testing"
    secret_access_key: str = "testing"
    region: str = "us-east-1"

    @property
    def options(self) -> dict[str, str]:
        """Mount options that point an ``s3://`` URI at this server."""
        return {
            "endpoint": self.endpoint,
            "region": self.region,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
        }

    def client(self) -> Any:
        import boto3  # type: ignore[import-untyped]

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        )

    def new_bucket(self) -> str:
        name = f"depot-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        missing(f"moto server unavailable ({exc}); install the test extras")
    port = free_port()
    server = ServerProcess(
        "moto",
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        port,
        tmp_path_factory.mktemp("moto") / "moto.log",
    )
    server.start()
    try:
        yield MotoServer(endpoint=f"http://127.0.0.1:{port}")
    finally:
        server.stop()


# --- Azurite (Azure Blob) ------------------------------------------------------------------


def azurite_command() -> str | None:
    """``azurite-blob`` from DEPOT_AZURITE, ./.test-tools, or PATH."""
    candidates = [
        os.environ.get("DEPOT_AZURITE", ""),
        str(REPO / ".test-tools" / "node_modules" / ".bin" / "azurite-blob"),
        shutil.which("azurite-blob") or "",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass
class AzuriteServer:
    endpoint: str
    account: str = AZURITE_ACCOUNT
    key: str = AZURITE_KEY

    @property
    def options(self) -> dict[str, str]:
        """Mount options that point an ``az://`` URI at this server."""
        return {"account_name": self.account, "account_key": self.key, "endpoint": self.endpoint}

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={self.account};AccountKey={self.key};"
            f"BlobEndpoint={self.endpoint};"
        )

    def new_container(self) -> str:
        from azure.storage.blob import BlobServiceClient

        name = f"depot-{uuid.uuid4().hex[:20]}"
        with BlobServiceClient.from_connection_string(self.connection_string) as service:
            service.create_container(name)
        return name


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteServer]:
    command = azurite_command()
    if command is None:
        missing("azurite not installed: run scripts/install-test-deps.sh")
    try:
        import azure.storage.blob  # noqa: F401
    except ImportError as exc:
        missing(f"azure-storage-blob unavailable ({exc}); install the test extras")
    port = free_port()
    workdir = tmp_path_factory.mktemp("azurite")
    server = ServerProcess(
        "azurite",
        [
            command,
            "--silent",
            "--inMemoryPersistence",
            "--disableTelemetry",
            "--loose",
            "--skipApiVersionCheck",
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            str(port),
        ],
        port,
        workdir / "azurite.log",
    )
    server.start()
    try:
        yield AzuriteServer(endpoint=f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}")
    finally:
        server.stop()


# --- etcd (membership) ---------------------------------------------------------------------


def etcd_command() -> str | None:
    """``etcd`` from DEPOT_ETCD or PATH (Debian's etcd-server puts it in /usr/bin)."""
    candidates = [os.environ.get("DEPOT_ETCD", ""), shutil.which("etcd") or "", "/usr/bin/etcd"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@dataclass
class EtcdServer:
    """A single-node etcd. ``stop()`` then ``start()`` bring it back on the same ports and data
    dir, so its keys and leases survive, as after a real etcd restart."""

    process: ServerProcess
    data_dir: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.process.port}"

    @property
    def endpoints(self) -> list[str]:
        return [self.endpoint]

    @property
    def running(self) -> bool:
        return self.process.proc is not None and self.process.proc.poll() is None

    def new_cluster(self) -> str:
        """A cluster name no other test uses: its keys live under ``/depot/<name>/``."""
        return f"t-{uuid.uuid4().hex[:16]}"

    def start(self) -> None:
        """Start and wait until etcd has a leader (``/health`` says true)."""
        import urllib.request

        self.process.start()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.endpoint + "/health", timeout=1) as resp:
                    if b'"true"' in resp.read():
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.process.stop()
        raise RuntimeError(f"etcd not healthy within {START_TIMEOUT}s:\n{self.process.log_tail()}")

    def stop(self) -> None:
        self.process.stop()

    def ensure_running(self) -> None:
        if not self.running:
            self.start()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    command = etcd_command()
    if command is None:
        missing("etcd not installed: run scripts/install-test-deps.sh (apt: etcd-server)")
    try:
        import aetcd  # noqa: F401
    except ImportError as exc:
        missing(f"aetcd unavailable ({exc}); install the package")
    client_port, peer_port = free_port(), free_port()
    client_url = f"http://127.0.0.1:{client_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    workdir = tmp_path_factory.mktemp("etcd")
    data_dir = workdir / "data"
    args = [
        command,
        "--name", "depot-test",
        "--data-dir", str(data_dir),
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"depot-test={peer_url}",
        "--logger", "zap",
        "--log-level", "warn",
    ]  # fmt: skip
    server = EtcdServer(ServerProcess("etcd", args, client_port, workdir / "etcd.log"), data_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_cluster(etcd_server: EtcdServer) -> str:
    """A fresh cluster name on the shared etcd (restarted first if a test left it down)."""
    etcd_server.ensure_running()
    return etcd_server.new_cluster()
