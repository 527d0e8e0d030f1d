"""``depot status`` end to end on an embedded single node (no etcd needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from depot.testing.cluster import free_port
from depot.testing.local import LocalWorker

DEPOT = [sys.executable, "-m", "depot.cli.main"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPOT_")}
    return subprocess.run([*DEPOT, *args], capture_output=True, text=True, env=env, timeout=60)


def test_status_of_a_single_node(tmp_path: Path) -> None:
    (tmp_path / "ufs").mkdir()
    (tmp_path / "ufs" / "f.bin").write_bytes(b"x" * 300_000)
    with LocalWorker(ufs_uri=(tmp_path / "ufs").as_uri(), cache_dir=tmp_path / "cache") as worker:
        proc = run("status", "--json", "--endpoint", worker.endpoint)
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["membership"] == "embedded" and doc["healthy"] is True
        assert doc["summary"] == {"workers": 1, "live": 1, "unreachable": 0, "draining": 0}
        (row,) = doc["workers"]
        assert row["endpoint"] == worker.endpoint and row["reachable"] is True
        assert row["state"] == "live" and row["capacity_bytes"] == 1024**3
        assert row["worker_id"] == doc["self"] and row["id"] == row["worker_id"][:8]

        table = run("status", "--endpoint", worker.endpoint)
        assert table.returncode == 0, table.stderr
        assert worker.endpoint in table.stdout and "live" in table.stdout
        assert "membership embedded" in table.stdout


def test_status_of_an_unreachable_endpoint_is_one_line_error() -> None:
    proc = run("status", "--endpoint", f"http://127.0.0.1:{free_port()}", "--timeout", "0.5")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("depot: error: cannot reach"), proc.stderr
