"""``depot mount`` for real: a FUSE mount over a worker process serving a local-directory UFS.

The worker and every mount run as their own processes (a FUSE server in the test process could
deadlock: a page fault taken while holding the GIL would wait for a handler that needs it). The
mounts go through the CLI (``python -m depot.cli.mount``), so the commands are tested too.
Skipped when FUSE is not usable here, and a failure under CI (``CI`` set).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from depot.core import directio
from depot.core import errors as depot_errors
from depot.fuse.errors import errno_of
from depot.fuse.mounts import State, state
from depot.fuse.options import kernel_options, parse_options

from .conftest import MotoServer, ServerProcess, free_port, missing

MiB = 1024 * 1024
DEPOT_MOUNT = [sys.executable, "-m", "depot.cli.mount"]
DEPOT = [sys.executable, "-m", "depot.cli.main"]
STATS = "user.depot.stats"


def _pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


BIG = _pattern(12 * MiB + 4321, 1)
MODEL = _pattern(24 * MiB, 2)  # random-access target (mmap with MADV_RANDOM)


# -- environment -----------------------------------------------------------------------------------


def fuse_unavailable() -> str | None:
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 unavailable ({exc}); pip install 'depot[fuse]'"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        return "fusermount3 not installed (apt-get install fuse3)"
    return None


@pytest.fixture(scope="module", autouse=True)
def _fuse_usable() -> None:
    reason = fuse_unavailable()
    if reason:
        missing(f"FUSE unavailable: {reason}")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DEPOT_")}


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DEPOT_MOUNT, *args], capture_output=True, text=True, env=_env(), timeout=timeout
    )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def force_unmount(mount_point: Path) -> None:
    if state(str(mount_point)) is not State.FREE:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)
        if state(str(mount_point)) is not State.FREE:
            subprocess.run(["fusermount3", "-u", "-z", str(mount_point)], capture_output=True)


# -- worker and mounts ------------------------------------------------------------------------------


@dataclass
class Worker:
    proc: subprocess.Popen[str]
    endpoint: str
    config: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_worker(
    root: Path,
    ufs: Path,
    name: str,
    mounts: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> Worker:
    """A worker process; ``extra``: more config sections (merged into those set here)."""
    port = free_port()
    config = root / f"{name}.yaml"
    settings: dict[str, Any] = {
        "worker": {"host": "127.0.0.1", "port": port},
        "cache": {"dirs": [{"path": str(root / f"{name}-cache"), "size": "512MiB"}],
                  "page_size": "1MiB"},
        "mounts": mounts or [{"path": "/", "ufs": ufs.as_uri(), "metadata": "always"}],
        "client": {"endpoint": f"http://127.0.0.1:{port}"},
    }
    for section, values in (extra or {}).items():
        settings[section] = {**settings.get(section, {}), **values}
    config.write_text(json.dumps(settings))
    log = open(root / f"{name}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [*DEPOT, "worker", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=root,
    )
    log.close()
    import socket

    def listening() -> bool:
        assert proc.poll() is None, (root / f"{name}.log").read_text()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_for(listening, 30, "the worker to listen")
    return Worker(proc, f"http://127.0.0.1:{port}", config)


@dataclass
class Mount:
    path: Path
    pid: int
    log: Path

    def stats(self) -> dict[str, int]:
        data: dict[str, int] = json.loads(os.getxattr(self.path, STATS))
        return data


def mount_background(mount_point: Path, config: Path, *options: str, log: Path) -> Mount:
    mount_point.mkdir(parents=True, exist_ok=True)
    args = ["mount", str(mount_point), "--config", str(config), "--log-file", str(log)]
    for option in options:
        args += ["-o", option]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr + (log.read_text() if log.exists() else "")
    pid = int(proc.stdout.split("(pid ")[1].split(",")[0])
    assert state(str(mount_point)) is State.MOUNTED
    return Mount(mount_point, pid, log)


def stop_mount(mount: Mount) -> None:
    if state(str(mount.path)) is State.MOUNTED:
        cli("unmount", "--lazy", str(mount.path))
    deadline = time.monotonic() + 10
    while alive(mount.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(mount.pid):
        os.kill(mount.pid, signal.SIGKILL)
    force_unmount(mount.path)


def _write_tree(root: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    (root / "data" / "sub" / "deep").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "data" / "big.bin").write_bytes(BIG)
    (root / "data" / "small.txt").write_bytes(b"hello depot\n")
    (root / "data" / "empty").write_bytes(b"")
    (root / "data" / "with space é.txt").write_bytes(b"unicode and spaces\n")
    (root / "data" / "sub" / "a.csv").write_bytes(b"x,y\n1,2\n3,4\n")
    (root / "data" / "sub" / "deep" / "b.json").write_bytes(b'{"k": 1}')
    for i in range(20):
        (root / "data" / "sub" / f"part-{i:03d}.bin").write_bytes(_pattern(10_000 + i * 777, 100 + i))
    (root / "models" / "weights.bin").write_bytes(MODEL)
    rng = np.random.default_rng(7)
    tensors = {
        "embed": rng.standard_normal((512, 256), dtype=np.float32),
        "layer.0.w": rng.standard_normal((256, 1024), dtype=np.float32),
        "layer.0.b": rng.standard_normal((1024,), dtype=np.float32),
        "head": rng.integers(0, 1000, (300, 700), dtype=np.int32),
    }
    save_file(tensors, str(root / "models" / "model.safetensors"))
    np.save(root / "models" / "matrix.npy", rng.standard_normal((2048, 512), dtype=np.float32))
    if importlib.util.find_spec("torch") is not None:  # the bench extra installs it
        import torch

        state = {"w": torch.from_numpy(tensors["layer.0.w"]), "h": torch.from_numpy(tensors["head"])}
        torch.save(state, root / "models" / "state.pt")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Worker, Mount]]:
    try:
        import numpy  # noqa: F401
        import safetensors  # noqa: F401
    except ImportError as exc:
        missing(f"numpy/safetensors unavailable ({exc}); install the test extras")
    root = tmp_path_factory.mktemp("fuse")
    ufs = root / "ufs"
    _write_tree(ufs)
    worker = start_worker(root, ufs, "worker")
    mount = None
    try:
        mount = mount_background(
            root / "mnt",
            worker.config,
            "attr_timeout=0.3,entry_timeout=0.3,negative_timeout=0",
            "random_threshold=4",
            log=root / "mount.log",
        )
        yield ufs, worker, mount
    finally:
        if mount is not None:
            stop_mount(mount)
        worker.stop()
    log = (root / "mount.log").read_text()
    assert "Traceback" not in log and "(EIO)" not in log, log[-3000:]


@pytest.fixture
def ufs(env: tuple[Path, Worker, Mount]) -> Path:
    return env[0]


@pytest.fixture
def mnt(env: tuple[Path, Worker, Mount]) -> Path:
    return env[2].path


# -- pure parts: errno table and options --------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (depot_errors.NotFound("x"), errno.ENOENT),
        (depot_errors.PermissionDenied("x"), errno.EACCES),
        (depot_errors.ReadOnly("x"), errno.EROFS),
        (depot_errors.IsADirectory("x"), errno.EISDIR),
        (depot_errors.NotADirectory("x"), errno.ENOTDIR),
        (depot_errors.NoSpace("x"), errno.ENOSPC),
        (depot_errors.Timeout("x"), errno.ETIMEDOUT),
        (depot_errors.Unavailable("x"), errno.EIO),
        (depot_errors.Throttled("x"), errno.EIO),
        (depot_errors.Corrupted("x"), errno.EIO),
        (depot_errors.StaleVersion("x"), errno.ESTALE),
        (depot_errors.InvalidRange("x"), errno.EINVAL),
        (depot_errors.Unsupported("x"), errno.EOPNOTSUPP),
        (depot_errors.DepotError("x"), errno.EIO),
        (TimeoutError(), errno.ETIMEDOUT),
        (OSError(errno.ENAMETOOLONG, "long"), errno.ENAMETOOLONG),
        (ValueError("bug"), errno.EIO),
    ],
)
def test_errno_of(error: BaseException, code: int) -> None:
    assert errno_of(error) == code


def test_mount_options() -> None:
    settings, kernel = parse_options(
        ["attr_timeout=1.5,uid=1000", "no_kernel_cache,allow_other", "rw,fsname=models"]
    )
    assert settings == {"attr_timeout": "1.5", "uid": "1000", "kernel_cache": False,
                        "allow_other": True}
    assert kernel == {"rw", "fsname=models"}
    from depot.core.config import FuseConfig

    options = kernel_options(FuseConfig(allow_other=True), kernel)
    assert "ro" not in options and "allow_other" in options and "fsname=models" in options
    assert "ro" in kernel_options(FuseConfig(), set())
    assert "ro" not in kernel_options(FuseConfig(read_only=False), set())  # writes from config
    assert "ro" in kernel_options(FuseConfig(read_only=False), {"ro"})
    with pytest.raises(depot_errors.ConfigError, match="unknown mount option"):
        parse_options(["nosuchthing"])
    with pytest.raises(depot_errors.ConfigError, match="contradict"):
        parse_options(["ro,rw"])
    assert parse_options(["fsync=store"])[0] == {"fsync": "store"}
    from depot.core.config import load_config

    assert load_config(environ={}, overrides={"fuse": {"fsync": "store"}}).fuse.fsync == "store"
    with pytest.raises(depot_errors.ConfigError, match="fsync"):
        load_config(environ={}, overrides={"fuse": {"fsync": "sometimes"}})


# -- the namespace ------------------------------------------------------------------------------------


def _walk(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        out += [os.path.normpath(os.path.join(rel, n)) for n in dirnames + filenames]
    return sorted(out)


def test_ls_find_and_walk(ufs: Path, mnt: Path) -> None:
    assert _walk(mnt) == _walk(ufs)
    ls = subprocess.run(["ls", "-R", str(mnt / "data")], capture_output=True, text=True, check=True)
    ref = subprocess.run(["ls", "-R", str(ufs / "data")], capture_output=True, text=True, check=True)
    assert ls.stdout.replace(str(mnt), "") == ref.stdout.replace(str(ufs), "")
    found = subprocess.run(["find", ".", "-type", "f"], cwd=mnt, capture_output=True, text=True,
                           check=True)
    expected = subprocess.run(["find", ".", "-type", "f"], cwd=ufs, capture_output=True, text=True,
                              check=True)
    assert sorted(found.stdout.split("\n")) == sorted(expected.stdout.split("\n"))
    assert {".", ".."} <= set(subprocess.run(["ls", "-a", str(mnt)], capture_output=True,
                                             text=True, check=True).stdout.split())


def test_stat_fields(ufs: Path, mnt: Path) -> None:
    st = os.stat(mnt / "data" / "big.bin")
    ref = os.stat(ufs / "data" / "big.bin")
    assert st.st_size == len(BIG)
    assert abs(st.st_mtime - ref.st_mtime) < 1e-3
    assert oct(st.st_mode & 0o7777) == oct(0o444) and os.path.isfile(mnt / "data" / "big.bin")
    assert st.st_uid == os.geteuid() and st.st_gid == os.getegid()
    assert st.st_nlink == 1 and st.st_blksize == MiB and st.st_blocks == -(-len(BIG) // 512)
    assert st.st_ino != os.stat(mnt / "data" / "small.txt").st_ino
    dst = os.stat(mnt / "data" / "sub")
    assert oct(dst.st_mode & 0o7777) == oct(0o555) and os.path.isdir(mnt / "data" / "sub")
    assert os.stat(mnt / "data" / "empty").st_size == 0
    assert os.stat(mnt / "data" / "with space é.txt").st_size == 19
    with pytest.raises(FileNotFoundError):
        os.stat(mnt / "data" / "nope")
    with pytest.raises(NotADirectoryError):
        os.stat(mnt / "data" / "small.txt" / "x")
    with pytest.raises(NotADirectoryError):
        os.listdir(mnt / "data" / "small.txt")
    with pytest.raises(IsADirectoryError):
        (mnt / "data" / "sub").read_bytes()
    assert os.getxattr(mnt / "data" / "small.txt", "user.depot.version").startswith(b'"')
    vfs = os.statvfs(mnt)
    assert vfs.f_namemax == 255 and vfs.f_blocks > 0


def test_cp_tar_diff_round_trips(ufs: Path, mnt: Path, tmp_path: Path) -> None:
    subprocess.run(["cp", "-r", str(mnt / "data"), str(tmp_path / "copy")], check=True)
    subprocess.run(["diff", "-r", str(ufs / "data"), str(tmp_path / "copy")], check=True)
    subprocess.run(["diff", "-r", str(ufs / "data"), str(mnt / "data")], check=True)
    archive = tmp_path / "data.tar"
    subprocess.run(["tar", "-C", str(mnt), "-cf", str(archive), "data"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "untar", filter="data")
    subprocess.run(["diff", "-r", str(ufs / "data"), str(tmp_path / "untar" / "data")], check=True)


def test_python_open_seek_read(mnt: Path) -> None:
    path = mnt / "data" / "big.bin"
    with open(path, "rb") as f:
        assert f.read(10) == BIG[:10]
        f.seek(5 * MiB + 3)
        assert f.read(MiB) == BIG[5 * MiB + 3 : 6 * MiB + 3]
        f.seek(-100, os.SEEK_END)
        assert f.read() == BIG[-100:]
        assert f.read(10) == b""
        f.seek(len(BIG) + 1000)
        assert f.read(10) == b""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(3 * MiB)
        f.seek(MiB - 7)
        assert f.readinto(buf) == len(buf) and buf == BIG[MiB - 7 : 4 * MiB - 7]
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(50):
            off = random.randrange(len(BIG))
            assert os.pread(fd, 4096, off) == BIG[off : off + 4096]
    finally:
        os.close(fd)
    assert (mnt / "data" / "big.bin").read_bytes() == BIG
    assert (mnt / "data" / "empty").read_bytes() == b""


def test_mmap_and_numpy_memmap(ufs: Path, mnt: Path) -> None:
    import numpy as np

    with open(mnt / "data" / "big.bin", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert len(m) == len(BIG)
        for off in (0, 4095, MiB, 7 * MiB + 11, len(BIG) - 5):
            assert m[off : off + 5000] == BIG[off : off + 5000]
    reference = np.load(ufs / "models" / "matrix.npy")
    mapped = np.load(mnt / "models" / "matrix.npy", mmap_mode="r")
    rows = np.random.default_rng(3).integers(0, reference.shape[0], 200)
    assert np.array_equal(mapped[rows], reference[rows])
    raw = np.memmap(mnt / "data" / "big.bin", dtype=np.uint8, mode="r")
    assert raw.shape == (len(BIG),) and bytes(raw[-4321:]) == BIG[-4321:]
    del mapped, raw


def test_safetensors(ufs: Path, mnt: Path) -> None:
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import load_file

    expected = load_file(str(ufs / "models" / "model.safetensors"))
    with safe_open(str(mnt / "models" / "model.safetensors"), framework="np") as f:
        assert sorted(f.keys()) == sorted(expected)
        for name in f.keys():  # noqa: SIM118
            assert np.array_equal(f.get_tensor(name), expected[name])
        assert np.array_equal(f.get_slice("layer.0.w")[10:20], expected["layer.0.w"][10:20])
    loaded = load_file(str(mnt / "models" / "model.safetensors"))
    assert all(np.array_equal(loaded[k], expected[k]) for k in expected)


def test_torch_load_mmap(ufs: Path, mnt: Path) -> None:
    """``torch.load(mmap=True)`` maps the checkpoint's storages straight from the mount."""
    torch = pytest.importorskip("torch")
    expected = torch.load(ufs / "models" / "state.pt", weights_only=True)
    loaded = torch.load(mnt / "models" / "state.pt", mmap=True, weights_only=True)
    assert sorted(loaded) == sorted(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_random_page_faults_are_prefetched(env: tuple[Path, Worker, Mount]) -> None:
    """4 KiB faults all over a model file: after a few, the file comes in whole segments."""
    _, _, mount = env
    path = mount.path / "models" / "weights.bin"
    before = mount.stats()
    offsets = random.Random(5).sample(range(0, len(MODEL) - 4096, 4096), 600)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        m.madvise(mmap.MADV_RANDOM)  # one 4 KiB read per fault, no read-around
        for off in offsets:
            assert m[off : off + 8] == MODEL[off : off + 8]
    after = mount.stats()
    direct = after["direct_reads"] - before["direct_reads"]
    assert after["segments_prefetched"] > before["segments_prefetched"]
    # Without prefetch every fault is a worker round trip (600); with it, only the first few.
    assert direct < 60, (before, after)
    assert after["blocks_stored"] > before["blocks_stored"]


def test_sequential_reads_use_read_ahead(env: tuple[Path, Worker, Mount]) -> None:
    _, _, mount = env
    before = mount.stats()
    os.posix_fadvise(fd := os.open(mount.path / "data" / "big.bin", os.O_RDONLY), 0, 0,
                     os.POSIX_FADV_DONTNEED)
    try:
        got = bytearray()
        while chunk := os.read(fd, MiB):
            got += chunk
    finally:
        os.close(fd)
    assert got == BIG
    after = mount.stats()
    assert after["block_reads"] > before["block_reads"]
    assert after["direct_reads"] - before["direct_reads"] < 8, (before, after)
    assert after["largest_read"] == MiB, (before, after)  # read_ahead_kb=1024: 1 MiB requests


def test_page_cache_kept_across_opens(env: tuple[Path, Worker, Mount]) -> None:
    _, _, mount = env
    path = mount.path / "data" / "sub" / "part-005.bin"
    expected = path.read_bytes()
    time.sleep(0.4)  # past attr_timeout: the next open revalidates, finds the same version
    before = mount.stats()
    for _ in range(3):
        assert path.read_bytes() == expected
    after = mount.stats()
    # No read request reached the mount: the kernel served every byte from its page cache.
    assert after["direct_reads"] == before["direct_reads"]
    assert after["block_reads"] == before["block_reads"]


def test_concurrent_readers(ufs: Path, mnt: Path) -> None:
    files = sorted((ufs / "data" / "sub").glob("part-*.bin"))
    jobs: list[tuple[Path, bytes]] = [(mnt / "data" / "sub" / p.name, p.read_bytes()) for p in files]
    jobs += [(mnt / "data" / "big.bin", BIG)] * 4
    jobs += [(mnt / "models" / "weights.bin", MODEL)] * 2

    def read(job: tuple[Path, bytes]) -> bool:
        path, expected = job
        with open(path, "rb") as f:
            off = random.randrange(max(1, len(expected) - MiB))
            f.seek(off)
            return f.read(2 * MiB) == expected[off : off + 2 * MiB]

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        assert all(pool.map(read, jobs * 3))
    assert time.monotonic() - started < 20


def test_object_changed_behind_the_mount(ufs: Path, mnt: Path) -> None:
    source = ufs / "data" / "changing.txt"
    source.write_bytes(b"version one, first edition\n" * 1000)
    path = mnt / "data" / "changing.txt"
    wait_for(path.exists, 5, "the new file to appear")
    assert path.read_bytes() == source.read_bytes()
    assert path.read_bytes() == source.read_bytes()  # from the kernel page cache
    # Same size, new bytes and mtime: only the version (size+mtime or etag) tells them apart.
    source.write_bytes(b"VERSION TWO, other edition\n" * 1000)
    later = time.time() + 5
    os.utime(source, (later, later))
    time.sleep(0.5)  # > attr_timeout: the next open revalidates
    assert path.read_bytes() == source.read_bytes()
    # A new size.
    source.write_bytes(b"three\n")
    time.sleep(0.5)
    assert os.stat(path).st_size == 6
    assert path.read_bytes() == b"three\n"
    source.unlink()
    time.sleep(0.5)
    assert not path.exists()


def test_open_file_keeps_its_version(ufs: Path, mnt: Path) -> None:
    source = ufs / "data" / "pinned.bin"
    old = _pattern(6 * MiB, 11)
    source.write_bytes(old)
    wait_for((mnt / "data" / "pinned.bin").exists, 5, "the new file to appear")
    with open(mnt / "data" / "pinned.bin", "rb", buffering=0) as f:
        assert f.read(4096) == old[:4096]
        new = _pattern(6 * MiB, 12)
        source.write_bytes(new)
        later = time.time() + 5
        os.utime(source, (later, later))
        f.seek(5 * MiB)
        try:
            tail = f.read(MiB)
        except OSError as exc:
            assert exc.errno == errno.ESTALE
        else:
            assert tail == old[5 * MiB :]  # never bytes of the new version
    time.sleep(0.5)
    assert (mnt / "data" / "pinned.bin").read_bytes() == new
    source.unlink()


def test_writes_are_read_only(mnt: Path) -> None:
    target = mnt / "data" / "small.txt"
    attempts: list[Callable[[], Any]] = [
        lambda: os.open(mnt / "data" / "new.txt", os.O_WRONLY | os.O_CREAT),
        lambda: os.open(target, os.O_RDWR),
        lambda: os.open(target, os.O_WRONLY | os.O_APPEND),
        lambda: os.truncate(target, 0),
        lambda: os.mkdir(mnt / "data" / "newdir"),
        lambda: os.rmdir(mnt / "data" / "sub" / "deep"),
        lambda: os.unlink(target),
        lambda: os.rename(target, mnt / "data" / "moved.txt"),
        lambda: os.chmod(target, 0o644),
        lambda: os.utime(target, (1, 1)),
        lambda: os.symlink("small.txt", mnt / "data" / "link"),
        lambda: os.link(target, mnt / "data" / "hard"),
        lambda: os.setxattr(target, "user.x", b"1"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS, attempt
    assert target.read_bytes() == b"hello depot\n"


# -- mount life cycle -------------------------------------------------------------------------------


def test_rw_mount_refusals_and_stale_mount_is_refused(
    env: tuple[Path, Worker, Mount], tmp_path: Path
) -> None:
    """A second mount with -o rw (writes reach the handlers), then killed: a stale mount point."""
    ufs, worker, _ = env
    point = tmp_path / "rw"
    mount = mount_background(point, worker.config, "rw", log=tmp_path / "rw.log")
    try:
        target = point / "data" / "small.txt"
        assert target.read_bytes() == b"hello depot\n"
        # Writes reach the handlers now: what an object store cannot do is refused, no change.
        for attempt, code in (
            (lambda: os.link(target, point / "data" / "hard"), errno.EPERM),
            (lambda: os.symlink("small.txt", point / "data" / "sym"), errno.EPERM),
            (lambda: os.setxattr(target, "user.x", b"1"), errno.EOPNOTSUPP),
        ):
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == code, attempt
        # Opened for writing without O_TRUNC, read, never written: nothing is uploaded.
        before = os.stat(ufs / "data" / "small.txt")
        for flags in (os.O_RDWR, os.O_WRONLY | os.O_APPEND):
            fd = os.open(target, flags)
            try:
                if flags == os.O_RDWR:
                    assert os.pread(fd, 5, 0) == b"hello"
            finally:
                os.close(fd)
        assert target.read_bytes() == b"hello depot\n"
        after = os.stat(ufs / "data" / "small.txt")
        assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
        os.kill(mount.pid, signal.SIGKILL)
        wait_for(lambda: not alive(mount.pid), 10, "the filesystem process to die")
        assert state(str(point)) is State.STALE
        refused = cli("mount", str(point), "--config", str(worker.config))
        assert refused.returncode == 1
        assert "stale" in refused.stderr and f"depot unmount {point}" in refused.stderr
        assert refused.stderr.startswith("depot: error: ") and "Traceback" not in refused.stderr
        cleared = cli("unmount", str(point))
        assert cleared.returncode == 0, cleared.stderr
        assert state(str(point)) is State.FREE
        not_mounted = cli("unmount", str(point))
        assert not_mounted.returncode == 1 and "not mounted" in not_mounted.stderr
    finally:
        stop_mount(mount)


def test_unmount_with_open_files_and_sigterm(env: tuple[Path, Worker, Mount], tmp_path: Path) -> None:
    _, worker, _ = env
    point = tmp_path / "busy"
    mount = mount_background(point, worker.config, log=tmp_path / "busy.log")
    try:
        f = open(point / "data" / "big.bin", "rb")  # noqa: SIM115
        try:
            assert f.read(1000) == BIG[:1000]
            busy = cli("unmount", str(point))
            assert busy.returncode == 1
            assert "busy" in busy.stderr and "--lazy" in busy.stderr
            assert state(str(point)) is State.MOUNTED
            lazy = cli("unmount", "--lazy", str(point))
            assert lazy.returncode == 0, lazy.stderr
            assert state(str(point)) is State.FREE  # detached: the path is the plain directory
            f.seek(9 * MiB)
            assert f.read(MiB) == BIG[9 * MiB : 10 * MiB]  # the open file keeps working
            assert alive(mount.pid)
        finally:
            f.close()
        wait_for(lambda: not alive(mount.pid), 10, "the filesystem process to exit")
        # SIGTERM unmounts cleanly, even with a file open (served for the grace period).
        again = mount_background(point, worker.config, "shutdown_grace=1", log=tmp_path / "b2.log")
        held = open(point / "data" / "small.txt", "rb")  # noqa: SIM115
        try:
            os.kill(again.pid, signal.SIGTERM)
            wait_for(lambda: state(str(point)) is State.FREE, 10, "the mount to be detached")
            assert held.read() == b"hello depot\n"
        finally:
            held.close()
        wait_for(lambda: not alive(again.pid), 10, "the filesystem process to exit")
        assert "unmounted" in (tmp_path / "b2.log").read_text()
    finally:
        stop_mount(mount)


def test_supervise_remounts_after_a_crash(env: tuple[Path, Worker, Mount], tmp_path: Path) -> None:
    _, worker, _ = env
    point = tmp_path / "sup"
    point.mkdir()
    log = tmp_path / "sup.log"
    proc = cli("mount", str(point), "--supervise", "--config", str(worker.config), "--log-file",
               str(log))
    assert proc.returncode == 0, proc.stderr + log.read_text()
    supervisor = int(proc.stdout.split("(pid ")[1].split(",")[0])
    try:
        assert (point / "data" / "small.txt").read_bytes() == b"hello depot\n"

        def child() -> int | None:
            try:
                children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
            except OSError:
                return None
            return int(children[0]) if children else None

        first = child()
        assert first is not None
        os.kill(first, signal.SIGKILL)

        def remounted() -> bool:
            pid = child()
            if pid is None or pid == first or state(str(point)) is not State.MOUNTED:
                return False
            try:
                return (point / "data" / "small.txt").read_bytes() == b"hello depot\n"
            except OSError:
                return False

        wait_for(remounted, 20, "the supervisor to remount")
        done = cli("unmount", str(point))
        assert done.returncode == 0, done.stderr
        wait_for(lambda: not alive(supervisor), 10, "the supervisor to exit")
        assert "remounting" in log.read_text()
    finally:
        if alive(supervisor):
            os.kill(supervisor, signal.SIGTERM)
            wait_for(lambda: not alive(supervisor), 10, "the supervisor to stop")
        force_unmount(point)


def test_worker_killed_during_reads(tmp_path: Path) -> None:
    """A worker that dies mid-read: the mount reads on from the under store, no error, no bad byte."""
    ufs = tmp_path / "ufs"
    ufs.mkdir()
    payload = _pattern(40 * MiB, 9)
    (ufs / "stream.bin").write_bytes(payload)
    worker = start_worker(tmp_path, ufs, "doomed")
    mount = mount_background(tmp_path / "mnt", worker.config, "memory=8MiB", log=tmp_path / "m.log")
    try:
        got = bytearray()
        killed = threading.Event()
        with open(mount.path / "stream.bin", "rb", buffering=0) as f:
            while chunk := f.read(256 * 1024):
                got += chunk
                if len(got) >= 6 * MiB and not killed.is_set():
                    worker.proc.kill()
                    worker.proc.wait(10)
                    killed.set()
        assert killed.is_set()
        assert bytes(got) == payload
        # New opens and listings work too, from the under store.
        assert os.listdir(mount.path) == ["stream.bin"]
        assert (mount.path / "stream.bin").stat().st_size == len(payload)
    finally:
        stop_mount(mount)
        worker.stop()


def test_prefetch_on_open_pulls_the_whole_model(tmp_path: Path) -> None:
    """A mount marked ``prefetch_on_open: ["*.safetensors"]``: one page fault on a model file
    brings every page of it into the worker's cache; a plain file and a reopen start nothing."""
    ufs = tmp_path / "ufs"
    ufs.mkdir()
    model, plain = _pattern(16 * MiB, 11), _pattern(16 * MiB, 12)
    (ufs / "model.safetensors").write_bytes(model)
    (ufs / "plain.bin").write_bytes(plain)
    mounts = [{"path": "/", "ufs": ufs.as_uri(), "prefetch_on_open": ["*.safetensors"]}]
    worker = start_worker(tmp_path, ufs, "pw", mounts,
                          extra={"worker": {"prefetch_pages": 0},
                                 "client": {"read_ahead": "1MiB"}})
    mount = mount_background(tmp_path / "mnt", worker.config, log=tmp_path / "p.log")

    def cached() -> int:
        with urllib.request.urlopen(worker.endpoint + "/api/v1/cache/stats", timeout=5) as r:
            return int(json.load(r)["pages"])

    try:
        with open(mount.path / "model.safetensors", "rb") as f, \
                mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            m.madvise(mmap.MADV_RANDOM)
            assert m[5 * MiB : 5 * MiB + 8] == model[5 * MiB : 5 * MiB + 8]
        wait_for(lambda: cached() == 16, 15, "every page of the model in the cache")
        with open(mount.path / "model.safetensors", "rb") as f:  # a reopen: nothing new
            assert f.read(4) == model[:4]
        with open(mount.path / "plain.bin", "rb") as f:
            assert f.read(1) == plain[:1]
        time.sleep(0.5)
        assert cached() < 16 + 8  # the plain file: only what was read (and read ahead)
        stats = mount.stats()
        assert stats["prefetch_on_open_triggered"] == 1, stats
        assert stats["prefetch_on_open_deduplicated"] >= 1, stats
        assert stats["prefetch_on_open_completed"] == 1, stats
        assert stats["prefetch_on_open_failed"] == 0, stats
    finally:
        stop_mount(mount)
        worker.stop()
    assert "Traceback" not in (tmp_path / "p.log").read_text()


# -- writes (-o rw) ---------------------------------------------------------------------------------


@dataclass
class WriteEnv:
    root: Path
    worker: Worker
    mount: Mount

    def ufs(self, name: str) -> Path:
        return self.root / f"ufs-{name}"


@pytest.fixture(scope="module")
def wenv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WriteEnv]:
    """A worker with a `through` mount (/w), a `cache-through` one (/ct), a `write-back` one
    (/wb) and a read-only one (/ro), mounted with -o rw."""
    root = tmp_path_factory.mktemp("fusew")
    mounts = []
    for name, extra in (("w", {}), ("ct", {"write_mode": "cache-through"}),
                        ("wb", {"write_mode": "write-back"}), ("ro", {"read_only": True})):
        (root / f"ufs-{name}").mkdir()
        mounts.append({"path": f"/{name}", "ufs": (root / f"ufs-{name}").as_uri(),
                       "metadata": "always", **extra})
    (root / "ufs-ro" / "kept.txt").write_bytes(b"kept\n")
    (root / "ufs-w" / "existing.bin").write_bytes(b"0123456789")
    worker = start_worker(root, root / "ufs-w", "wworker", mounts)
    mount = None
    try:
        mount = mount_background(
            root / "mnt",
            worker.config,
            "rw,attr_timeout=0.3,entry_timeout=0.3,negative_timeout=0",
            f"staging_dir={root / 'staging'}",
            log=root / "wmount.log",
        )
        yield WriteEnv(root, worker, mount)
    finally:
        if mount is not None:
            stop_mount(mount)
        worker.stop()
    log = (root / "wmount.log").read_text()
    assert "Traceback" not in log and "(EIO)" not in log, log[-3000:]


def test_cp_python_and_overwrite(wenv: WriteEnv, tmp_path: Path) -> None:
    mnt, ufs = wenv.mount.path / "w", wenv.ufs("w")
    source = tmp_path / "src.bin"
    payload = _pattern(3 * MiB + 17, 31)
    source.write_bytes(payload)
    subprocess.run(["cp", str(source), str(mnt / "copied.bin")], check=True)
    assert (mnt / "copied.bin").read_bytes() == payload
    assert (ufs / "copied.bin").read_bytes() == payload
    assert (mnt / "copied.bin").stat().st_size == len(payload)
    # Python sequential writes; the file is listed (and growing) while it is written
    with open(mnt / "py.bin", "wb") as f:
        for i in range(10):
            f.write(_pattern(100_000, 40 + i))
            f.flush()
        assert "py.bin" in os.listdir(mnt)
        assert (mnt / "py.bin").stat().st_size == 1_000_000
        assert not (ufs / "py.bin").exists()  # uploaded on close, not before
    assert (ufs / "py.bin").read_bytes() == b"".join(_pattern(100_000, 40 + i) for i in range(10))
    # O_TRUNC overwrite (shell redirection); readers on the mount see the new bytes at once
    assert (mnt / "copied.bin").read_bytes()[:10] == payload[:10]
    subprocess.run(["sh", "-c", f"echo replaced > '{mnt / 'copied.bin'}'"], check=True)
    assert (mnt / "copied.bin").read_bytes() == b"replaced\n"
    assert (ufs / "copied.bin").read_bytes() == b"replaced\n"
    # touch: an empty file; truncate to 0 of an existing file
    subprocess.run(["touch", str(mnt / "empty")], check=True)
    assert (ufs / "empty").read_bytes() == b""
    os.truncate(mnt / "py.bin", 0)
    assert (ufs / "py.bin").read_bytes() == b"" and (mnt / "py.bin").stat().st_size == 0


def test_tar_extract_and_diff(wenv: WriteEnv, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for rel, size in (("a.txt", 10), ("sub/b.bin", 300_000), ("sub/deep/c.json", 0),
                      ("sub/deep/d", 2 * MiB + 3)):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(_pattern(size, size))
    (tree / "emptydir").mkdir()
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(tree, arcname="tree")
    mnt = wenv.mount.path / "w"
    subprocess.run(["tar", "-xf", str(archive), "-C", str(mnt)], check=True, capture_output=True)
    result = subprocess.run(["diff", "-r", str(tree), str(mnt / "tree")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    ufs_diff = subprocess.run(["diff", "-r", str(tree / "sub"), str(wenv.ufs("w") / "tree" / "sub")],
                              capture_output=True, text=True)
    assert ufs_diff.returncode == 0, ufs_diff.stdout


def test_mkdir_rmdir_unlink_mv(wenv: WriteEnv) -> None:
    mnt, ufs = wenv.mount.path / "w", wenv.ufs("w")
    os.mkdir(mnt / "d")
    assert (mnt / "d").is_dir() and "d" in os.listdir(mnt)  # empty: shown by this mount only
    with pytest.raises(FileExistsError):
        os.mkdir(mnt / "d")
    (mnt / "d" / "f.txt").write_bytes(b"f")
    with pytest.raises(OSError) as info:
        os.rmdir(mnt / "d")
    assert info.value.errno == errno.ENOTEMPTY
    os.rename(mnt / "d" / "f.txt", mnt / "d" / "g.txt")
    assert os.listdir(mnt / "d") == ["g.txt"]
    assert (ufs / "d" / "g.txt").read_bytes() == b"f" and not (ufs / "d" / "f.txt").exists()
    assert (mnt / "d" / "g.txt").read_bytes() == b"f"
    with pytest.raises(OSError) as info:
        os.rename(mnt / "d", mnt / "e")  # a directory with entries
    assert info.value.errno == errno.EOPNOTSUPP
    os.unlink(mnt / "d" / "g.txt")
    assert not (ufs / "d" / "g.txt").exists()
    with pytest.raises(FileNotFoundError):
        (mnt / "d" / "g.txt").stat()
    os.rmdir(mnt / "d")
    assert not (mnt / "d").exists()


def test_unsupported_writes(wenv: WriteEnv) -> None:
    mnt, ufs = wenv.mount.path / "w", wenv.ufs("w")
    existing = mnt / "existing.bin"
    for attempt, code in (
        (lambda: os.link(existing, mnt / "hard"), errno.EPERM),
        (lambda: os.symlink("existing.bin", mnt / "sym"), errno.EPERM),
        (lambda: os.mkfifo(mnt / "fifo"), errno.EPERM),
        (lambda: os.setxattr(existing, "user.x", b"1"), errno.EOPNOTSUPP),
    ):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == code, attempt
    os.chmod(existing, 0o600)  # accepted, not stored
    os.utime(existing, (1, 1))
    assert (ufs / "existing.bin").read_bytes() == b"0123456789"


def test_read_only_mount_refuses(wenv: WriteEnv) -> None:
    ro = wenv.mount.path / "ro"
    assert (ro / "kept.txt").read_bytes() == b"kept\n"
    for attempt in (
        lambda: open(ro / "new.txt", "wb"),  # noqa: SIM115
        lambda: os.open(ro / "kept.txt", os.O_WRONLY | os.O_TRUNC),
        lambda: os.unlink(ro / "kept.txt"),
        lambda: os.rename(ro / "kept.txt", ro / "moved.txt"),
        lambda: os.mkdir(ro / "d"),
    ):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS, attempt
    assert (wenv.ufs("ro") / "kept.txt").read_bytes() == b"kept\n"


def test_other_client_and_cache_through(wenv: WriteEnv) -> None:
    import fsspec

    payload = _pattern(5 * MiB + 99, 77)
    with open(wenv.mount.path / "ct" / "model.bin", "wb") as f:
        f.write(payload)
    fs = fsspec.filesystem("depot", endpoint=wenv.worker.endpoint)
    assert fs.cat_file("/ct/model.bin") == payload  # another client, right after close

    def stats() -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"{wenv.worker.endpoint}/api/v1/cache/stats") as r:
            data: dict[str, Any] = json.loads(r.read())
        return data

    before = stats()
    assert (wenv.mount.path / "ct" / "model.bin").read_bytes() == payload
    after = stats()
    assert after["misses"] == before["misses"] and after["ufs_reads"] == before["ufs_reads"]


# -- appends, writes in place, truncation (-o rw) -----------------------------------------------------


def _fresh_read(wenv: WriteEnv, path: str) -> bytes:
    """``path`` as another client reads it (a new fsspec instance, not the mount)."""
    import fsspec

    fs = fsspec.filesystem("depot", endpoint=wenv.worker.endpoint, skip_instance_cache=True)
    data: bytes = fs.cat_file(path)
    return data


def _stored(wenv: WriteEnv, name: str, rel: str) -> bytes:
    """The bytes in the under store of mount ``/name`` (a write-back mount is synced first: then
    an open on the mount also pins the landed version, not the provisional one, whose readers
    get ESTALE when the upload lands, see docs/writes.md)."""
    if name == "wb":
        import urllib.parse
        import urllib.request

        query = urllib.parse.urlencode({"path": f"/{name}/{rel}", "wait": "1", "timeout": "30"})
        request = urllib.request.Request(f"{wenv.worker.endpoint}/api/v1/sync?{query}",
                                         method="POST")
        with urllib.request.urlopen(request, timeout=60) as r:
            assert json.loads(r.read())["synced"] is True
    return (wenv.ufs(name) / rel).read_bytes()


@pytest.mark.parametrize("name", ["w", "ct", "wb"])
def test_appends_to_an_existing_file(wenv: WriteEnv, name: str) -> None:
    mnt, ufs = wenv.mount.path / name, wenv.ufs(name)
    target = mnt / "events.log"
    (ufs / "events.log").write_bytes(b"line 0\n")
    expected = b"line 0\n"
    with open(target, "ab") as f:  # Python append
        f.write(b"line 1\n")
    expected += b"line 1\n"
    for i in range(2, 5):  # shell append: a new open, copy-in and upload each time
        subprocess.run(["sh", "-c", f"echo 'line {i}' >> '{target}'"], check=True)
        expected += f"line {i}\n".encode()
    stored = _stored(wenv, name, "events.log")
    assert stored == expected
    assert target.read_bytes() == expected
    with open(target, "ab", buffering=0) as f:  # several writes; readers see them at once
        for i in range(5, 8):
            f.write(f"line {i}\n".encode())
            expected += f"line {i}\n".encode()
            assert target.read_bytes() == expected  # another open reads the spool
            assert target.stat().st_size == len(expected)
        assert (ufs / "events.log").read_bytes() == stored  # uploaded on close, not before
    assert _fresh_read(wenv, f"/{name}/events.log") == expected  # read-your-writes, unsynced
    assert _stored(wenv, name, "events.log") == expected
    assert target.read_bytes() == expected
    # A file created for appending (event files), appended again by another open
    with open(mnt / "new.log", "ab") as f:
        f.write(b"first\n")
    with open(mnt / "new.log", "ab") as f:
        f.write(b"second\n")
    assert _fresh_read(wenv, f"/{name}/new.log") == b"first\nsecond\n"
    assert _stored(wenv, name, "new.log") == b"first\nsecond\n"
    assert (mnt / "new.log").read_bytes() == b"first\nsecond\n"


def test_overwrite_in_the_middle(wenv: WriteEnv) -> None:
    """r+b, seek, write: the stored bytes are copied in (more than one copy chunk), changed in
    place, readable before the close, uploaded whole on close."""
    mnt, ufs = wenv.mount.path / "w", wenv.ufs("w")
    payload = _pattern(10 * MiB + 123, 55)
    (ufs / "inplace.bin").write_bytes(payload)
    expected = bytearray(payload)
    with open(mnt / "inplace.bin", "r+b", buffering=0) as f:
        assert f.read(4) == payload[:4]
        f.seek(9 * MiB + 7)
        f.write(b"MIDDLE")
        expected[9 * MiB + 7 : 9 * MiB + 13] = b"MIDDLE"
        f.seek(100)
        f.write(b"front")
        expected[100:105] = b"front"
        f.seek(9 * MiB)
        assert f.read(32) == bytes(expected[9 * MiB : 9 * MiB + 32])  # read your writes
        with open(mnt / "inplace.bin", "rb") as reader:  # another open, same mount
            assert reader.read() == bytes(expected)
        assert os.fstat(f.fileno()).st_size == len(payload)
        assert (ufs / "inplace.bin").read_bytes() == payload  # not before the close
    assert (ufs / "inplace.bin").read_bytes() == bytes(expected)
    assert (mnt / "inplace.bin").read_bytes() == bytes(expected)
    assert _fresh_read(wenv, "/w/inplace.bin") == bytes(expected)
    # os.open without O_TRUNC, pwrite into the middle
    fd = os.open(mnt / "inplace.bin", os.O_WRONLY)
    try:
        os.pwrite(fd, b"pw", 3)
    finally:
        os.close(fd)
    expected[3:5] = b"pw"
    assert (ufs / "inplace.bin").read_bytes() == bytes(expected)


def test_sparse_writes_read_zeros(wenv: WriteEnv) -> None:
    mnt, ufs = wenv.mount.path / "w", wenv.ufs("w")
    (ufs / "sparse.bin").write_bytes(b"head")
    fd = os.open(mnt / "sparse.bin", os.O_RDWR)
    try:
        os.pwrite(fd, b"tail", MiB)  # beyond the end
        assert os.fstat(fd).st_size == MiB + 4
        assert os.pread(fd, 8, MiB - 4) == b"\0\0\0\0tail"
    finally:
        os.close(fd)
    expected = b"head" + bytes(MiB - 4) + b"tail"
    assert (ufs / "sparse.bin").read_bytes() == expected
    assert (mnt / "sparse.bin").read_bytes() == expected
    with open(mnt / "fresh-sparse.bin", "wb") as f:  # a new file, first written past its start
        f.seek(5000)
        f.write(b"x")
    assert (ufs / "fresh-sparse.bin").read_bytes() == bytes(5000) + b"x"


def test_truncate_shrinks_and_grows(wenv: WriteEnv) -> None:
    mnt, ufs = wenv.mount.path / "w", wenv.ufs("w")
    target = mnt / "trunc.bin"
    (ufs / "trunc.bin").write_bytes(b"0123456789")
    with open(target, "r+b") as f:
        f.truncate(4)  # ftruncate: shrink
        assert os.fstat(f.fileno()).st_size == 4
        f.seek(0, os.SEEK_END)
        f.write(b"AB")
        f.truncate(9)  # ftruncate: grow, with zeros
        assert os.fstat(f.fileno()).st_size == 9
    assert (ufs / "trunc.bin").read_bytes() == b"0123AB\0\0\0"
    assert target.read_bytes() == b"0123AB\0\0\0"
    os.truncate(target, 12)  # a file no one has open: staged, changed, uploaded by the call
    assert (ufs / "trunc.bin").read_bytes() == b"0123AB" + bytes(6)
    assert target.stat().st_size == 12
    os.truncate(target, 3)
    assert (ufs / "trunc.bin").read_bytes() == b"012" and target.read_bytes() == b"012"
    assert _fresh_read(wenv, "/w/trunc.bin") == b"012"


def test_two_appenders_in_one_process(wenv: WriteEnv) -> None:
    mnt, ufs = wenv.mount.path / "w", wenv.ufs("w")
    target = mnt / "two.log"
    (ufs / "two.log").write_bytes(b"base\n")
    a = os.open(target, os.O_WRONLY | os.O_APPEND)
    b = os.open(target, os.O_WRONLY | os.O_APPEND)
    try:
        for i in range(5):
            os.write(a, f"a{i}\n".encode())
            os.write(b, f"b{i}\n".encode())
        assert os.fstat(a).st_size == len(b"base\n") + 10 * 3
    finally:
        os.close(a)
        os.close(b)
    expected = b"base\n" + b"".join(f"a{i}\nb{i}\n".encode() for i in range(5))
    assert (ufs / "two.log").read_bytes() == expected
    # Two threads appending fixed-size records at once: every record whole, none lost.
    record = 64

    def append(tag: str) -> None:
        with open(target, "ab", buffering=0) as f:
            for i in range(150):
                f.write(f"{tag}{i:05d}".ljust(record - 1).encode() + b"\n")

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(append, ["x", "y"]))
    data = (ufs / "two.log").read_bytes()
    assert data.startswith(expected) and len(data) == len(expected) + 300 * record
    records = [data[i : i + record] for i in range(len(expected), len(data), record)]
    for tag in ("x", "y"):
        mine = [r for r in records if r.startswith(tag.encode())]
        assert mine == [f"{tag}{i:05d}".ljust(record - 1).encode() + b"\n" for i in range(150)]


def test_shared_writable_mmap(wenv: WriteEnv) -> None:
    mnt, ufs = wenv.mount.path / "w", wenv.ufs("w")
    payload = _pattern(3 * 4096 + 10, 66)
    (ufs / "mapped.bin").write_bytes(payload)
    with open(mnt / "mapped.bin", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        mm[5000:5005] = b"hello"
        mm.flush()  # msync: the dirty page is written, then fsync uploads
    expected = payload[:5000] + b"hello" + payload[5005:]
    assert (ufs / "mapped.bin").read_bytes() == expected
    assert (mnt / "mapped.bin").read_bytes() == expected


def test_copy_in_answers_eio_when_the_store_is_down(tmp_path: Path) -> None:
    """The under store is down when a file opened without O_TRUNC is first changed: the call
    answers EIO, and nothing (no partial file) is uploaded; once the store is back, it works.
    The first copy chunk is in the cache and the rest is not, so the copy fails half-way."""
    try:
        import boto3  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        missing(f"moto server unavailable ({exc}); install the test extras")
    port = free_port()
    s3_process = ServerProcess(
        "moto",
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        port,
        tmp_path / "moto.log",
    )
    server = MotoServer(endpoint=f"http://127.0.0.1:{port}")
    bucket, key = "depot-copy-in", "doc.bin"
    payload = _pattern(20 * MiB + 5, 91)  # three copy chunks (staging.COPY_CHUNK)

    def stored() -> bytes:
        body: bytes = server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        return body

    def fill() -> None:  # moto keeps its objects in memory: a restart starts empty
        s3 = server.client()
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key=key, Body=payload)

    s3_process.start()
    worker: Worker | None = None
    mount: Mount | None = None
    try:
        fill()
        worker = start_worker(
            tmp_path,
            tmp_path,
            "s3worker",
            [{"path": "/", "ufs": f"s3://{bucket}", "metadata": "max-age=60s",
              "options": server.options}],
            extra={"ufs": {"retries": 1, "backoff_base": 0.01, "timeout": 5},
                   "worker": {"prefetch_pages": 0}},
        )
        mount = mount_background(
            tmp_path / "mnt",
            worker.config,
            "rw,attr_timeout=0.3,entry_timeout=0.3,negative_timeout=0",
            f"staging_dir={tmp_path / 'staging'}",
            log=tmp_path / "m.log",
        )
        import fsspec

        fs = fsspec.filesystem("depot", endpoint=worker.endpoint, skip_instance_cache=True)
        assert fs.cat_file(f"/{key}", start=0, end=8 * MiB) == payload[: 8 * MiB]  # cached
        target = mount.path / key
        appender = os.open(target, os.O_WRONLY | os.O_APPEND)
        editor = os.open(target, os.O_RDWR)
        try:
            s3_process.stop()
            for call in (
                lambda: os.write(appender, b"tail"),
                lambda: os.pwrite(editor, b"X", 10),
                lambda: os.ftruncate(editor, 5),
            ):
                with pytest.raises(OSError) as info:
                    call()
                assert info.value.errno == errno.EIO, call
            assert os.fstat(editor).st_size == len(payload)
            s3_process.start()
            fill()
            os.close(appender)  # nothing was written: nothing is uploaded
            appender = -1
            assert stored() == payload
            os.pwrite(editor, b"X", 10)  # the store is back: the copy is made now
            assert os.pread(editor, 12, 0) == payload[:10] + b"X" + payload[11:12]
        finally:
            for fd in (appender, editor):
                if fd >= 0:
                    os.close(fd)
        assert stored() == payload[:10] + b"X" + payload[11:]
        log = (tmp_path / "m.log").read_text()
        assert "(EIO)" in log and "Traceback" not in log
    finally:
        if mount is not None:
            stop_mount(mount)
        if worker is not None:
            worker.stop()
        s3_process.stop()


def _worker_stats(wenv: WriteEnv) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{wenv.worker.endpoint}/api/v1/cache/stats", timeout=30) as r:
        doc: dict[str, Any] = json.loads(r.read())
        return doc


def test_write_back_files_are_spooled_in_the_workers_staging_file(wenv: WriteEnv) -> None:
    """On a write-back mount whose worker is on this node, a new file is spooled in a staging
    file the worker lends and its close commits it (a local write, docs/writes.md): front to
    back, in any order, written again after an fsync; a file unlinked while open leaves
    nothing behind."""
    mnt = wenv.mount.path / "wb"
    before = _worker_stats(wenv)["writes"]["local_writes"]
    payload = _pattern(5 * MiB + 3, 71)
    with open(mnt / "ckpt.bin", "wb") as f:  # front to back: hashed as it is written
        for pos in range(0, len(payload), MiB):
            f.write(payload[pos : pos + MiB])
    fd = os.open(mnt / "shuffled.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:  # out of order: hashed again at the commit
        os.pwrite(fd, b"B" * 1000, 1000)
        os.pwrite(fd, b"A" * 1000, 0)
    finally:
        os.close(fd)
    with open(mnt / "twice.bin", "wb", buffering=0) as f:
        f.write(b"one ")
        os.fsync(f.fileno())  # committed here: the worker's file from now on
        f.write(b"two")  # so this change goes to a copy of it
        assert (mnt / "twice.bin").read_bytes() == b"one two"
    assert _stored(wenv, "wb", "ckpt.bin") == payload
    assert _stored(wenv, "wb", "shuffled.bin") == b"A" * 1000 + b"B" * 1000
    assert _stored(wenv, "wb", "twice.bin") == b"one two"
    assert (mnt / "ckpt.bin").read_bytes() == payload
    stats = _worker_stats(wenv)
    assert stats["writes"]["local_writes"] - before >= 4
    # dd's pattern: the file is opened, the descriptor duplicated and the first one closed (a
    # flush: the empty file is committed), then written. The writes go on in a new staging file
    # of the worker, not in a spool of the mount's own.
    staging = wenv.root / "wworker-cache" / "writeback" / "staging"
    fd = os.open(mnt / "dd.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    out = os.dup(fd)
    os.close(fd)
    try:
        for pos in range(0, len(payload), MiB):
            os.write(out, payload[pos : pos + MiB])

        def written() -> int:
            sizes = [0]
            for name in os.listdir(staging):
                with contextlib.suppress(FileNotFoundError):  # an upload just ended
                    sizes.append(os.stat(staging / name).st_size)
            return max(sizes)

        # All but what the direct writer still gathers (flushed at the commit).
        wait_for(lambda: written() >= len(payload) - directio.BUFFER, 10, "the slot to fill")
    finally:
        os.close(out)
    assert _stored(wenv, "wb", "dd.bin") == payload
    # Unlinked while open: nothing is committed and the slot's file is dropped.
    f = open(mnt / "gone.bin", "wb")  # noqa: SIM115
    f.write(b"x" * 100)
    f.flush()
    os.unlink(mnt / "gone.bin")
    f.close()
    assert not (wenv.ufs("wb") / "gone.bin").exists()
    wait_for(lambda: os.listdir(staging) == [], 10, "the staging dir to empty")
    assert _worker_stats(wenv)["writeback"]["failures"] == []


def test_fsync_store_waits_for_the_upload(wenv: WriteEnv) -> None:
    """-o fsync=store: fsync of a file on a write-back mount returns once the upload is in the
    under store (the default returns once the worker has it durable, as close does)."""
    point = wenv.root / "mnt-fsync-store"
    mount = mount_background(point, wenv.worker.config, "rw,fsync=store",
                             f"staging_dir={wenv.root / 'staging2'}", log=wenv.root / "m2.log")
    try:
        payload = _pattern(2 * MiB + 5, 81)
        with open(point / "wb" / "durable.bin", "wb", buffering=0) as f:
            f.write(payload)
            os.fsync(f.fileno())
            # No sync asked for: the store already holds it when fsync returns.
            assert (wenv.ufs("wb") / "durable.bin").read_bytes() == payload
            f.write(b"more")
        assert _stored(wenv, "wb", "durable.bin") == payload + b"more"
    finally:
        stop_mount(mount)
