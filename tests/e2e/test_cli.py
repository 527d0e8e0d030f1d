"""The ``depot`` command end to end: a real ``depot up`` process and the client commands."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DEPOT = [sys.executable, "-m", "depot.cli.main"]


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DEPOT_")}
    full_env.update(env or {})
    return subprocess.run([*DEPOT, *args], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=60, errors="replace")


def run_bytes(*args: str, env: dict[str, str]) -> bytes:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DEPOT_")}
    full_env.update(env)
    proc = subprocess.run([*DEPOT, *args], capture_output=True, env=full_env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def assert_one_line_error(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("depot: error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    (data / "dir" / "sub").mkdir(parents=True)
    (data / "hello.txt").write_text("hello, depot\n")
    (data / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (data / "dir" / "a.json").write_text('{"a": 1}')
    (data / "dir" / "sub" / "b.json").write_text('{"b": 2}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEPOT_")}
    proc = subprocess.Popen(
        [*DEPOT, "up", "--ufs", str(data), "--port", "0", "--page-size", "1MiB"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert proc.stdout is not None
    endpoint = None
    banner = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        banner.append(line)
        match = re.search(r"HTTP API\s+(http://\S+)", line)
        if match:
            endpoint = match.group(1)
        if "Ctrl-C" in line:
            break
    assert endpoint, "".join(banner) + (proc.stderr.read() if proc.poll() is not None and proc.stderr else "")
    text = "".join(banner)
    assert "fs ls /" in text and "DEPOT_ENDPOINT" in text
    assert (root / ".depot" / "cache").is_dir()  # cache under ./.depot/
    yield endpoint, data
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0


def test_ls_stat_cat_head(node: tuple[str, Path]) -> None:
    endpoint, _ = node
    env = {"DEPOT_ENDPOINT": endpoint}
    out = run("fs", "ls", "/", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["big.bin", "dir/", "hello.txt"]
    listing = json.loads(run("fs", "ls", "/dir", "--json", env=env).stdout)
    assert [(e["name"], e["type"]) for e in listing] == [("/dir/a.json", "file"), ("/dir/sub", "directory")]
    stat = json.loads(run("fs", "stat", "/big.bin", "--json", env=env).stdout)
    assert stat["size"] == 3 * 1024 * 1024 + 17 and stat["type"] == "file"
    assert run("fs", "ls", "/hello.txt", env=env).stdout == "hello.txt\n"  # ls of a file: the file
    assert run("fs", "cat", "/hello.txt", env=env).stdout == "hello, depot\n"
    assert run("fs", "head", "-c", "5", "/hello.txt", env=env).stdout == "hello"
    assert run("fs", "cat", "--offset", "7", "--length", "5", "/hello.txt", "--endpoint", endpoint).stdout == "depot"


def test_cp_file_and_tree(node: tuple[str, Path], tmp_path: Path) -> None:
    endpoint, data = node
    env = {"DEPOT_ENDPOINT": endpoint}
    assert run("fs", "cp", "/big.bin", str(tmp_path / "big.bin"), env=env).returncode == 0
    assert (tmp_path / "big.bin").read_bytes() == (data / "big.bin").read_bytes()
    proc = run("fs", "cp", "-r", "/dir", str(tmp_path / "tree"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tree" / "sub" / "b.json").read_text() == '{"b": 2}'
    assert_one_line_error(run("fs", "cp", "/dir", str(tmp_path / "x"), env=env), "is a directory")


def test_second_read_shows_in_cache_stats(node: tuple[str, Path]) -> None:
    endpoint, _ = node
    env = {"DEPOT_ENDPOINT": endpoint}
    before = json.loads(run("cache", "stats", "--json", env=env).stdout)
    assert run_bytes("fs", "cat", "/big.bin", env=env) == (node[1] / "big.bin").read_bytes()
    middle = json.loads(run("cache", "stats", "--json", env=env).stdout)
    assert run_bytes("fs", "cat", "/big.bin", env=env) == (node[1] / "big.bin").read_bytes()
    after = json.loads(run("cache", "stats", "--json", env=env).stdout)
    assert after["hits"] - middle["hits"] >= 4  # every page of the second read came from the cache
    assert after["ufs_reads"] == middle["ufs_reads"]
    assert middle["bytes_from_ufs"] >= before["bytes_from_ufs"]
    text = run("cache", "stats", env=env).stdout
    assert "hit ratio" in text and "bytes from cache" in text
    assert "memory tier" in text and f"{after['memory_hits']} hits" in text


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("fs", "cat", "/nope"), "no such file"),
        (("fs", "cat", "/dir"), "is a directory"),
        (("fs", "stat", "/../etc/passwd"), "escapes its mount"),
        (("fs", "ls", "/nope"), "no such"),
    ],
)
def test_client_errors_are_one_line(node: tuple[str, Path], args: tuple[str, ...], fragment: str) -> None:
    proc = run(*args, env={"DEPOT_ENDPOINT": node[0]})
    assert_one_line_error(proc, fragment)


def test_unreachable_worker_is_one_line(tmp_path: Path) -> None:
    proc = run("fs", "ls", "/", "--endpoint", "http://127.0.0.1:9", cwd=tmp_path)
    assert_one_line_error(proc, "127.0.0.1:9")


def test_bad_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("worker: {port: 70000}\n")
    assert_one_line_error(run("config", "show", "--config", str(bad)), "worker.port")
    assert_one_line_error(run("worker", "--config", str(bad)), "worker.port")
    assert_one_line_error(run("config", "show", "--config", str(tmp_path / "missing.yaml")), "not found")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert_one_line_error(run("worker", "--config", str(empty), "--port", "0"), "no mounts")
    assert_one_line_error(run("up", "--ufs", str(tmp_path / "nope")), "not a directory")
    assert_one_line_error(run("up", "--ufs", "ftp://x/y", "--port", "0", cwd=tmp_path), "ftp")


def test_config_show_merges_env_and_masks_secrets(tmp_path: Path) -> None:
    cfg = tmp_path / "depot.yaml"
    cfg.write_text(
        "mounts:\n  - path: /m\n    ufs: s3://bucket/x\n    options: {secret_access_key: hunter2, region: eu-west-1}\n"
    )
    proc = run("config", "show", env={"DEPOT_CONFIG": str(cfg), "DEPOT_WORKER__PORT": "8123"})
    assert proc.returncode == 0, proc.stderr
    assert "port: 8123" in proc.stdout and "hunter2" not in proc.stdout and "eu-west-1" in proc.stdout


def test_version_and_help() -> None:
    assert run("--version").stdout.startswith("depot, version")
    helptext = run("--help").stdout
    for cmd in ("up", "worker", "fs", "cache", "config"):
        assert cmd in helptext
