"""FUSE benchmark: fio and model loading through ``depot mount``, with this machine's limits.

Prints one markdown table with every figure measured in the same run, so each is also a ratio
against what the machine itself can do:

- limits: loopback TCP (one Python stream), page-cache read (pread), the same fio jobs on the
  local file (page cache), and a null Python FUSE filesystem (``bench/fuse_null.py``: pyfuse3
  serving a file from memory, the ceiling of any Python FUSE filesystem here);
- through the mount, hot data (in the worker's page store; the mount's kernel page cache
  dropped by each job): fio sequential 1 MiB reads (``bench/fio/seq-read-1m.fio``), fio random
  4 KiB reads with 4 jobs (``rand-read-4k.fio``), the latency of one 4 KiB read to the worker
  (``rand-read-4k-qd1.fio``, on a second mount with prefetch off), re-reads from the kernel page
  cache (``reread-1m.fio``), time to first byte of files not yet in the kernel cache, and
  ``safetensors.numpy.load_file`` of a model file (mmap);
- through the mount, cold data (the worker's page store empty, on a mount of its own): the same
  fio sequential job and the same load, the first read of each file, ``--cold-runs`` pairs in
  alternating order with the page store emptied (``depot free / -r``) before each pair;
- first byte twice: Python ``open`` + a 4 KiB read, and fio's 1-byte read of each file opened
  anew (``first-byte-1b.fio``), on two sets of files the kernel has not cached;
- the peer, in the same run (``--peer rclone``, on by default when ``/usr/bin/rclone`` exists,
  ``--no-rclone`` to skip): ``rclone mount --vfs-cache-mode full`` of the same under-store
  directory (``:local:DIR``, flags in ``bench/rclone_mount.py``), measured with the same fio
  jobs, first-byte loop and loads, cold (empty VFS cache, new mount) and hot (the same rclone
  after one full read: its VFS cache holds the files; first byte on a second mount over that
  cache, so the kernel has looked up nothing). Its rows follow depot's, with the ratio
  depot / rclone.

The worker and the mounts run as their own processes (``depot worker``, ``depot mount``); the
under store is a local directory. Data goes to a temp dir that is deleted at the end.
Needs fio, pyfuse3, numpy and safetensors, and root (or fusermount3).
Run: ``.venv/bin/python bench/fuse_bench.py [--size-mib 1024] [--model-mib 1024] [--runtime 10]
[--no-rclone]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIO = Path(__file__).resolve().parent / "fio"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rclone_mount import RCLONE, RcloneMount, cached_bytes, flags_note, version  # noqa: E402
from read_bench import gbps, loopback_tcp, page_cache_read  # noqa: E402

from depot.fuse.mounts import State, state  # noqa: E402

PY = sys.executable
MiB = 1024 * 1024
PEER = "peer: rclone mount --vfs-cache-mode full, "
MODEL = Path("models") / "model.safetensors"


@dataclass
class Row:
    """One line of the table; ``key`` names the figure, so the peer's row can follow depot's."""

    name: str
    value: str
    note: str = ""
    key: str = ""
    number: float | None = None  # the figure, for the ratio depot / peer
    time: bool = False  # a time or latency: lower is better

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("DEPOT_")}


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(path: Path) -> int:
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    return total


# data -----------------------------------------------------------------------------------------------


def write_random(path: Path, size: int) -> None:
    chunk = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n


def write_model(path: Path, size: int) -> None:
    """A safetensors file of float32 tensors of 64 MiB (and one smaller), ``size`` bytes of data."""
    import numpy as np
    from safetensors.numpy import save_file

    tensors: dict[str, Any] = {}
    left = size
    index = 0
    while left > 0:
        n = min(left, 64 * MiB) // 4 * 4
        if n <= 0:
            break
        raw = np.frombuffer(os.urandom(n), dtype=np.float32)
        tensors[f"layers.{index}.weight"] = raw.reshape(-1, 1024) if n % 4096 == 0 else raw
        left -= n
        index += 1
    save_file(tensors, str(path))


# processes --------------------------------------------------------------------------------------------


def start_worker(
    tmp: Path, ufs: Path, cache_size: int, prefetch_on_open: list[str]
) -> tuple[subprocess.Popen[bytes], Path]:
    port = free_port()
    config = tmp / "depot.yaml"
    config.write_text(json.dumps({
        "worker": {"host": "127.0.0.1", "port": port},
        "cache": {"dirs": [{"path": str(tmp / "cache"), "size": cache_size}], "page_size": "4MiB"},
        # --prefetch-on-open: model files pulled whole into the cache when opened.
        "mounts": [{"path": "/", "ufs": ufs.as_uri(), "metadata": "max-age=600s",
                    "prefetch_on_open": prefetch_on_open}],
        "client": {"endpoint": f"http://127.0.0.1:{port}"},
    }))
    log = open(tmp / "worker.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([PY, "-m", "depot.cli.main", "worker", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=tmp)
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, config
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("worker did not start:\n" + (tmp / "worker.log").read_text()[-2000:])


def mount(point: Path, config: Path, log: Path, *options: str) -> int:
    point.mkdir(parents=True, exist_ok=True)
    args = [PY, "-m", "depot.cli.mount", "mount", str(point), "--config", str(config),
            "--log-file", str(log)]
    for option in options:
        args += ["-o", option]
    proc = subprocess.run(args, capture_output=True, text=True, env=env(), timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"depot mount failed: {proc.stderr}")
    return int(proc.stdout.split("(pid ")[1].split(",")[0])


def unmount(point: Path) -> None:
    if state(str(point)) is not State.FREE:
        subprocess.run([PY, "-m", "depot.cli.mount", "unmount", "--lazy", str(point)],
                       capture_output=True, env=env(), timeout=60)


def mount_stats(point: Path) -> dict[str, int]:
    stats: dict[str, int] = json.loads(os.getxattr(point, "user.depot.stats"))
    return stats


# fio ----------------------------------------------------------------------------------------------------


def fio(job: str, file: Path | None, runtime: int = 10, *, keep_cache: bool = False,
        env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one job file on ``file``; ``keep_cache``: without its ``invalidate=1`` (page cache);
    ``env``: the job's variables (default: ``DEPOT_FIO_FILE`` and ``DEPOT_FIO_RUNTIME``)."""
    job_file = FIO / job
    if keep_cache:
        copy = Path(tempfile.mkdtemp(prefix="depot-fio-")) / job
        copy.write_text(job_file.read_text().replace("invalidate=1", "invalidate=0"))
        job_file = copy
    try:
        proc = subprocess.run(
            ["fio", "--output-format=json", str(job_file)],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, **(env or {"DEPOT_FIO_FILE": str(file),
                                          "DEPOT_FIO_RUNTIME": str(runtime)})},
        )
    finally:
        if keep_cache:
            shutil.rmtree(job_file.parent, ignore_errors=True)  # the edited copy's temp dir
    if proc.returncode != 0:
        raise RuntimeError(f"fio {job} failed: {proc.stderr or proc.stdout}")
    read: dict[str, Any] = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]["read"]
    return read


def fio_gbps(job: str, file: Path) -> float:
    return float(fio(job, file)["bw_bytes"]) / 1e9


def fio_iops(job: str, file: Path, runtime: int, *, keep_cache: bool = False) -> float:
    return float(fio(job, file, runtime, keep_cache=keep_cache)["iops"])


def fio_latency_ms(job: str, file: Path, runtime: int) -> tuple[float, float]:
    clat = fio(job, file, runtime)["clat_ns"]["percentile"]
    return clat["50.000000"] / 1e6, clat["99.000000"] / 1e6


def fio_first_byte_ms(files: list[Path]) -> tuple[float, float]:
    """fio's clat of one 1-byte read at offset 0 of each of ``files`` (one directory), each opened anew."""
    read = fio("first-byte-1b.fio", None, env={
        "DEPOT_FIO_DIR": str(files[0].parent),
        "DEPOT_FIO_FILES": ":".join(path.name for path in files),
    })
    if read["total_ios"] != len(files):
        raise RuntimeError(f"fio made {read['total_ios']} reads of {len(files)} files")
    clat = read["clat_ns"]["percentile"]
    return clat["50.000000"] / 1e6, clat["99.000000"] / 1e6


def free_all(config: Path) -> None:
    """Drop every cached page of the worker (``depot free / -r``), so the next reads are cold."""
    subprocess.run([PY, "-m", "depot.cli.main", "free", "/", "-r", "--config", str(config)],
                   check=True, capture_output=True, env=env(), timeout=120)


def cold_order(run: int) -> tuple[str, str]:
    """Which cold figure goes first in pair ``run``: they alternate, so neither is always second.

    On this VM the second of two back-to-back cold reads runs on memory the hypervisor has taken
    back in between (free page reporting) and pays for faulting it in again: measured in a fixed
    order, the second figure loses up to half of its rate.
    """
    return ("seq", "load") if run % 2 == 0 else ("load", "seq")


def cold_note(seqs: list[float], loads: list[float]) -> str:
    pairs = [
        f"{'seq first' if cold_order(i)[0] == 'seq' else 'load first'}: "
        f"{load:.2f} / {seq:.2f} = {load / seq:.2f}"
        for i, (seq, load) in enumerate(zip(seqs, loads, strict=True))
    ]
    return "; ".join(pairs)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def runs(n: int, fn: Callable[[], float]) -> list[float]:
    return [fn() for _ in range(n)]


def first_byte_ms(files: list[Path]) -> tuple[float, float]:
    """open() + the first 4 KiB of files whose bytes the kernel does not hold (names listed)."""
    os.listdir(files[0].parent)
    times = []
    for path in files:
        t0 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        data = os.pread(fd, 4096, 0)
        times.append(time.perf_counter() - t0)
        os.close(fd)
        assert len(data) == 4096
    times.sort()
    return statistics.median(times) * 1e3, times[int(len(times) * 0.99)] * 1e3


def load_safetensors(path: Path) -> float:
    from safetensors.numpy import load_file

    drop_cache(path)
    size = path.stat().st_size
    t0 = time.perf_counter()
    tensors = load_file(str(path))
    elapsed = time.perf_counter() - t0
    del tensors
    return gbps(size, elapsed)


# peer: rclone mount ------------------------------------------------------------------------------------


def rclone_rows(tmp: Path, ufs: Path, args: argparse.Namespace,
                mounts: list[RcloneMount]) -> dict[str, Row]:
    """The same figures on ``rclone mount --vfs-cache-mode full`` of ``ufs``, keyed like depot's rows.

    Cold: an empty VFS cache dir and a new mount (the kernel holds nothing of it), the first read
    of each file, like depot's cold mount over an empty page store. Hot: the same rclone process
    afterwards, its VFS cache holding every file (fio and the loads read whole files), the kernel
    page cache dropped by each job or load as for depot. First byte: a second rclone process
    over the same cache dir, so the kernel has looked up none of the files (like depot's mount,
    whose worker holds them); one more sequential run there, since a new process reads slower.
    """
    point, cache = tmp / "rclone", tmp / "rclone-cache"
    extra = tuple(args.rclone_flag)
    shutil.rmtree(cache, ignore_errors=True)
    rows: dict[str, Row] = {}
    big = point / "big.bin"

    def rclone(log: str) -> RcloneMount:
        m = RcloneMount(ufs, point, cache, tmp / log, binary=args.rclone, extra=extra)
        mounts.append(m)
        return m

    # Cold: each figure on an empty VFS cache dir and a new rclone process, in the same
    # alternating pairs as depot's.
    cold: dict[str, list[float]] = {"seq": [], "load": []}
    for run in range(args.cold_runs):
        for what in cold_order(run):
            shutil.rmtree(cache, ignore_errors=True)
            with rclone(f"rclone-cold-{run}-{what}.log"):
                if what == "seq":
                    cold["seq"].append(fio_gbps("seq-read-1m.fio", big))
                else:
                    cold["load"].append(load_safetensors(point / MODEL))
    cold_seq, cold_load = statistics.mean(cold["seq"]), statistics.mean(cold["load"])
    rows["cold_seq"] = Row(PEER + "fio seq read 1 MiB, 1 job (cold: empty VFS cache)",
                           f"{cold_seq:.2f} GB/s",
                           f"mean of {len(cold['seq'])}: runs "
                           f"{', '.join(f'{x:.2f}' for x in cold['seq'])}; first read of the file",
                           number=cold_seq)
    rows["cold_load"] = Row(PEER + f"safetensors load_file, {args.model_mib} MiB, mmap (cold)",
                            f"{cold_load:.2f} GB/s",
                            f"{cold_load / cold_seq:.2f}x its cold sequential read (means); pairs "
                            f"load / seq: {cold_note(cold['seq'], cold['load'])}",
                            number=cold_load)

    shutil.rmtree(cache, ignore_errors=True)
    with rclone("rclone.log") as m:
        # One full read of every file fills the VFS cache: all that follows is hot.
        read_all(big)
        read_all(point / MODEL)
        for folder in ("small", "small-fio"):
            for path in sorted((point / folder).iterdir()):
                path.read_bytes()
        held = cached_bytes(cache)

        size = big.stat().st_size
        cpu_before = cpu_seconds(m.pid)
        seq = runs(args.runs, lambda: fio_gbps("seq-read-1m.fio", big))
        cpu = (cpu_seconds(m.pid) - cpu_before) / (args.runs * size / 2**30)
        rand = fio_iops("rand-read-4k.fio", big, args.runtime)
        rows["rand"] = Row(PEER + "fio rand read 4 KiB, 4 jobs (hot)", f"{rand / 1000:.1f}k IOPS",
                           "", number=rand)
        p50, p99 = fio_latency_ms("rand-read-4k-qd1.fio", big, max(2, args.runtime // 2))
        rows["qd1"] = Row(PEER + "fio rand read 4 KiB, 1 job: latency of one read",
                          f"p50 {p50:.3f} ms", f"p99 {p99:.3f} ms", number=p50, time=True)
        read_all(big)
        reread = runs(args.runs, lambda: fio_gbps("reread-1m.fio", big))
        rows["reread"] = Row(PEER + "re-read (fio seq 1 MiB, no invalidate)",
                             f"{max(reread):.2f} GB/s",
                             "the kernel page cache is not kept across opens: reads go to rclone",
                             number=max(reread))
        loads = runs(args.runs, lambda: load_safetensors(point / MODEL))
        rows["load"] = Row(PEER + f"safetensors load_file, {args.model_mib} MiB, mmap (hot)",
                           f"{max(loads):.2f} GB/s", f"runs {', '.join(f'{x:.2f}' for x in loads)}",
                           number=max(loads))
        read_ahead = m.read_ahead_kb

    with rclone("rclone-remount.log"):
        files = sorted((point / "small").iterdir())
        fb50, fb99 = first_byte_ms(files)
        rows["first_byte"] = Row(PEER + "first byte: open + read 4 KiB of a file in the VFS cache "
                                 "(new mount)", f"p50 {fb50:.3f} ms",
                                 f"p99 {fb99:.3f} ms, {len(files)} files", number=fb50, time=True)
        files = sorted((point / "small-fio").iterdir())
        fio50, fio99 = fio_first_byte_ms(files)
        rows["first_byte_fio"] = Row(PEER + "first byte: fio 1-byte read of a file in the VFS "
                                     "cache, new file each open (new mount)", f"p50 {fio50:.3f} ms",
                                     f"p99 {fio99:.3f} ms, {len(files)} files", number=fio50,
                                     time=True)
        fresh = fio_gbps("seq-read-1m.fio", big)
    rows["seq"] = Row(PEER + "fio seq read 1 MiB, 1 job (hot: in the VFS cache)",
                      f"{max(seq):.2f} GB/s",
                      f"runs {', '.join(f'{x:.2f}' for x in seq)}; CPU per GiB: rclone {cpu:.2f} s; "
                      f"a new rclone process over the same cache: {fresh:.2f} GB/s",
                      number=max(seq))
    rows["setup"] = Row(PEER + "setup", version(args.rclone),
                        f"`rclone mount :local:UFS_DIR POINT --config /dev/null --cache-dir TMP "
                        f"{flags_note(extra)}`; kernel read_ahead_kb {read_ahead} (as depot's "
                        f"mount); VFS cache after one read of every file: {held / MiB:.0f} MiB")
    return rows


# main ---------------------------------------------------------------------------------------------------


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks: unmounts, stops the processes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="fio file size")
    parser.add_argument("--model-mib", type=int, default=1024, help="safetensors file size")
    parser.add_argument("--small-files", type=int, default=300, help="files for first byte")
    parser.add_argument("--runtime", type=int, default=10, help="seconds of each random fio job")
    parser.add_argument("--runs", type=int, default=3, help="runs of each throughput figure")
    parser.add_argument("--cold-runs", type=int, default=2,
                        help="pairs of cold reads (fio seq + model load), in alternating order")
    parser.add_argument("--prefetch-on-open", action="store_true",
                        help="mark *.safetensors with the mount's prefetch_on_open (default: off)")
    parser.add_argument("--peer", choices=("rclone",), default=None,
                        help="measure this peer too (default: rclone when --rclone exists)")
    parser.add_argument("--no-rclone", action="store_true", help="skip the rclone peer")
    parser.add_argument("--rclone", default=RCLONE, help="the rclone binary (default %(default)s)")
    parser.add_argument("--rclone-flag", action="append", default=[], metavar="FLAG",
                        help="one more argument for rclone mount (repeat; e.g. "
                        "--rclone-flag=--buffer-size=64Mi)")
    args = parser.parse_args()
    for tool in ("fio",):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install {tool} (scripts/install-test-deps.sh)")
    have_rclone = os.access(args.rclone, os.X_OK)
    if args.peer == "rclone" and args.no_rclone:
        sys.exit("--peer rclone and --no-rclone contradict each other")
    if args.peer == "rclone" and not have_rclone:
        sys.exit(f"{args.rclone} not found: apt-get install rclone")
    peer = not args.no_rclone and have_rclone
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    size, model_size = args.size_mib * MiB, args.model_mib * MiB
    tmp = Path(tempfile.mkdtemp(prefix="depot-fuse-bench-"))
    rows: list[Row] = []
    peer_rows: dict[str, Row] = {}
    procs: list[subprocess.Popen[bytes]] = []
    points: list[Path] = []
    rclones: list[RcloneMount] = []
    try:
        ufs = tmp / "ufs"
        (ufs / "small").mkdir(parents=True)
        (ufs / "models").mkdir()
        write_random(ufs / "big.bin", size)
        write_model(ufs / MODEL, model_size)
        small = os.urandom(64 * 1024)
        (ufs / "small-fio").mkdir()
        for i in range(args.small_files):
            (ufs / "small" / f"f{i:05d}.bin").write_bytes(small)
            (ufs / "small-fio" / f"f{i:05d}.bin").write_bytes(small)
        worker, config = start_worker(tmp, ufs, size + model_size * 2 + 256 * MiB,
                                      ["*.safetensors"] if args.prefetch_on_open else [])
        procs.append(worker)
        mnt, lat = tmp / "mnt", tmp / "mnt-noprefetch"
        points += [mnt, lat]
        # Cold: the first read of each file through the worker, each on a mount of its own, in
        # pairs of alternating order (cold_order) with the page store emptied before each pair.
        # The last pair leaves both files in the page store, so everything after is hot.
        cold: dict[str, list[float]] = {"seq": [], "load": []}
        for run in range(args.cold_runs):
            if run:
                free_all(config)
            for what in cold_order(run):
                point = tmp / f"mnt-cold-{run}-{what}"
                points.append(point)
                mount(point, config, tmp / f"mount-cold-{run}-{what}.log")
                if what == "seq":
                    cold["seq"].append(fio_gbps("seq-read-1m.fio", point / "big.bin"))
                else:
                    cold["load"].append(load_safetensors(point / MODEL))
                unmount(point)
        cold_seq = statistics.mean(cold["seq"])
        cold_load = statistics.mean(cold["load"])
        mount_pid = mount(mnt, config, tmp / "mount.log")
        mount(lat, config, tmp / "mount2.log", "no_prefetch")
        for folder in ("small", "small-fio"):
            for path in sorted((lat / folder).iterdir()):
                path.read_bytes()

        # machine limits
        rows.append(Row("machine: loopback TCP, 1 stream (Python sendall->recv_into)",
                        f"{loopback_tcp():.2f} GB/s"))
        rows.append(Row("machine: page-cache read (pread, 8 MiB buffer)",
                        f"{page_cache_read(ufs / 'big.bin'):.2f} GB/s"))
        local_seq = max(runs(args.runs, lambda: fio_gbps("reread-1m.fio", ufs / "big.bin")))
        local_rand = fio_iops(
            "rand-read-4k.fio", ufs / "big.bin", max(2, args.runtime // 2), keep_cache=True
        )
        rows.append(Row("machine: fio seq 1 MiB on the local file (page cache)",
                        f"{local_seq:.2f} GB/s"))
        rows.append(Row("machine: fio rand 4 KiB x4 on the local file (page cache)",
                        f"{local_rand / 1000:.0f}k IOPS"))
        null_point = tmp / "null"
        null_point.mkdir()
        points.append(null_point)
        null = subprocess.Popen([PY, str(Path(__file__).parent / "fuse_null.py"), str(null_point),
                                 str(args.size_mib)], stdout=subprocess.PIPE)
        procs.append(null)
        assert null.stdout is not None
        null.stdout.readline()
        null_seq = max(runs(args.runs, lambda: fio_gbps("seq-read-1m.fio", null_point / "null.bin")))
        null_rand = fio_iops("rand-read-4k.fio", null_point / "null.bin", max(2, args.runtime // 2))
        null.terminate()
        null.wait(30)
        rows.append(Row("machine: null Python FUSE (pyfuse3, memory) fio seq 1 MiB",
                        f"{null_seq:.2f} GB/s", "the ceiling of a Python FUSE filesystem here"))
        rows.append(Row("machine: null Python FUSE fio rand 4 KiB x4",
                        f"{null_rand / 1000:.1f}k IOPS", "every read is a FUSE request"))

        # through the mount
        rows.append(Row("fio seq read 1 MiB, 1 job (cold: worker page store empty, local-dir "
                        "UFS -> worker -> FUSE)", f"{cold_seq:.2f} GB/s",
                        f"mean of {len(cold['seq'])}: runs "
                        f"{', '.join(f'{x:.2f}' for x in cold['seq'])}; first read of the file, "
                        "on a mount of its own", "cold_seq", cold_seq))
        rows.append(Row(f"safetensors load_file, {args.model_mib} MiB, mmap (cold)",
                        f"{cold_load:.2f} GB/s",
                        f"{cold_load / cold_seq:.2f}x the cold sequential read (means); pairs "
                        f"load / seq: {cold_note(cold['seq'], cold['load'])}", "cold_load",
                        cold_load))
        cpu_before = cpu_seconds(mount_pid), cpu_seconds(worker.pid)
        seq = runs(args.runs, lambda: fio_gbps("seq-read-1m.fio", mnt / "big.bin"))
        gib_read = args.runs * size / 2**30
        mount_cpu = (cpu_seconds(mount_pid) - cpu_before[0]) / gib_read
        worker_cpu = (cpu_seconds(worker.pid) - cpu_before[1]) / gib_read
        rows.append(Row("fio seq read 1 MiB, 1 job (hot)", f"{max(seq):.2f} GB/s",
                        f"runs {', '.join(f'{x:.2f}' for x in seq)}; "
                        f"{max(seq) / null_seq:.0%} of null FUSE, {max(seq) / local_seq:.0%} of "
                        f"page cache; CPU per GiB: mount {mount_cpu:.2f} s, worker "
                        f"{worker_cpu:.2f} s", "seq", max(seq)))
        before = mount_stats(mnt)
        rand = fio_iops("rand-read-4k.fio", mnt / "big.bin", args.runtime)
        after = mount_stats(mnt)
        rows.append(Row("fio rand read 4 KiB, 4 jobs (hot)", f"{rand / 1000:.1f}k IOPS",
                        f"{rand / null_rand:.1f}x null FUSE; "
                        f"{after['segments_prefetched'] - before['segments_prefetched']} segments "
                        f"prefetched, {after['blocks_stored'] - before['blocks_stored']} blocks "
                        f"stored in the page cache, "
                        f"{after['direct_reads'] - before['direct_reads']} direct reads",
                        "rand", rand))
        p50, p99 = fio_latency_ms("rand-read-4k-qd1.fio", lat / "big.bin", max(2, args.runtime // 2))
        rows.append(Row("fio rand read 4 KiB, 1 job, prefetch off: latency to the worker",
                        f"p50 {p50:.3f} ms", f"p99 {p99:.3f} ms", "qd1", p50, time=True))
        files = sorted((mnt / "small").iterdir())
        fb50, fb99 = first_byte_ms(files)
        rows.append(Row("first byte: open + read 4 KiB of a hot file (kernel cache cold)",
                        f"p50 {fb50:.3f} ms", f"p99 {fb99:.3f} ms, {len(files)} files",
                        "first_byte", fb50, time=True))
        files = sorted((mnt / "small-fio").iterdir())
        fio50, fio99 = fio_first_byte_ms(files)
        rows.append(Row("first byte: fio 1-byte read of a hot file, new file each open (kernel "
                        "cache cold)", f"p50 {fio50:.3f} ms",
                        f"p99 {fio99:.3f} ms, {len(files)} files; the read after open "
                        "(`bench/fio/first-byte-1b.fio`)", "first_byte_fio", fio50, time=True))
        read_all(mnt / "big.bin")
        reread = runs(args.runs, lambda: fio_gbps("reread-1m.fio", mnt / "big.bin"))
        rows.append(Row("re-read from the kernel page cache (fio seq 1 MiB, kept across opens)",
                        f"{max(reread):.2f} GB/s", f"{max(reread) / local_seq:.0%} of the local file",
                        "reread", max(reread)))
        model = ufs / MODEL
        read_all(model)
        page_cache_model = max(runs(args.runs, lambda: load_safetensors_local(model)))
        loads = runs(args.runs, lambda: load_safetensors(mnt / MODEL))
        rows.append(Row(f"safetensors load_file, {args.model_mib} MiB, mmap (hot)",
                        f"{max(loads):.2f} GB/s",
                        f"runs {', '.join(f'{x:.2f}' for x in loads)} (later runs find up to "
                        f"fuse.memory of it in the mount's blocks); local page cache "
                        f"{page_cache_model:.2f} GB/s", "load", max(loads)))

        if peer:
            peer_rows = rclone_rows(tmp, ufs, args, rclones)
    finally:
        for rclone in rclones:
            rclone.stop()
        for point in points:
            unmount(point)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.size_mib} MiB fio file, {args.model_mib} MiB safetensors, run of "
          f"{time.strftime('%Y-%m-%d %H:%M')}, best of {args.runs} where runs are listed\n")
    print_table(rows, peer_rows, peer)


def print_table(rows: list[Row], peer_rows: dict[str, Row], peer: bool) -> None:
    if not peer:
        print("| measurement | result | notes |")
        print("|---|---|---|")
        for row in rows:
            print(f"| {row.name} | {row.value} | {row.note} |")
        return
    print("| measurement | result | depot / rclone | notes |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row.name} | {row.value} |  | {row.note} |")
        other = peer_rows.get(row.key) if row.key else None
        if other is None:
            continue
        ratio = ""
        if row.number is not None and other.number:
            ratio = f"{row.number / other.number:.2f}x" + (" (time)" if row.time else "")
        print(f"| {other.name} | {other.value} | {ratio} | {other.note} |")
    if "setup" in peer_rows:
        setup = peer_rows["setup"]
        print(f"| {setup.name} | {setup.value} |  | {setup.note} |")
    print("\ndepot / rclone: above 1 means depot is faster, except for times (marked \"(time)\": "
          "latency, first byte), where below 1 means depot is faster.")


def load_safetensors_local(path: Path) -> float:
    """load_file from the local page cache (the file was just read, so it is there)."""
    from safetensors.numpy import load_file

    size = path.stat().st_size
    t0 = time.perf_counter()
    tensors = load_file(str(path))
    elapsed = time.perf_counter() - t0
    del tensors
    return gbps(size, elapsed)


if __name__ == "__main__":
    main()
