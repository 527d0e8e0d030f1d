"""The performance suite: the issue's figures, this machine's limits and the peers, in one run.

Run it as ``python -m bench all --size 1GiB`` (``bench/__main__.py``); each group can also run
alone (``machine``, ``cold``, ``hot``, ``metadata``, ``multi``, ``peers``). Everything is
measured in the same run on the same files, and every figure's ratio is taken against a machine
limit or a reader measured in that run, never against a stored number.

Setup: ``bench/ufs_server.py`` is the under store (S3-compatible, ``--first-byte-ms`` before each
response, ``--rate-per-conn`` per connection: 20 ms and 50 MB/s by default); it serves
``model.safetensors`` (``--size`` bytes of tensors), ``model-2x.safetensors`` (twice that) and a
directory of ``--ls-entries`` small files. depot workers (``depot worker``, one process each,
4 MiB pages, the whole store mounted at ``/`` with the ``immutable`` metadata policy) read it;
the client is the ``depot://`` fsspec filesystem. Data goes to a temp dir removed at the end.

Groups and what they measure:

- ``machine``: direct disk read (page cache dropped), page-cache read (pread into one 8 MiB
  buffer) and loopback TCP (one Python stream), best of ``--runs``;
- ``cold``: one plain GET stream and boto3 ``download_file`` (its defaults) of the model, then
  a read of it through a fresh worker (``open().read(8 MiB)`` loop, client over HTTP);
- ``hot``: the same file again from that worker: sequential over loopback HTTP, sequential
  with short-circuit local reads (each the median of 5 rounds, a round being the read and its
  machine limit, loopback or the page-cache read, measured back to back: ``paired_rounds``),
  and 4 KiB random reads (``cat_file``). The worker sends hot
  pages from its memory tier (``cache.memory_size``, "auto" by default): beside the figure,
  the same read from a worker without one (every page read from its file and checked), and the
  ceilings of both ways: a bare threaded server sending from memory, and one doing ``pread`` +
  xxh3 + ``sendall``, each to a blocking 2-connection client (``hot_ceiling.py``);
- ``metadata``: ``info`` of a cached file (p50 over ``--info-calls``), and ``ls`` of the
  listing directory (the figure: the median of the 5 cached listings after the first);
- ``multi``: ``--readers`` processes read the 2x model at once through one fresh worker (default
  client settings); bytes the store sent (its ``/__stats``) and the wall time against one
  reader's cold wall time through another fresh worker, in ``--multi-rounds`` paired rounds
  (the median round's ratio; the most bytes of any round); then the same rounds with nothing of
  depot in them, its machine row (``bare_pipeline.py``: a fetch into files, bare readers);
- ``peers``: s3fs, fsspec ``simplecache`` and ``blockcache`` over s3fs (first and second read),
  obstore (one stream, 16 concurrent ranges), Run:ai Model Streamer (CPU): see ``peers.py``.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers
from cluster_bench import direct_ranges, ufs_bytes
from hot_ceiling import bare_server, blocking_client
from load_bench import cpu_seconds, ufs_server, workers
from read_bench import (
    best_of,
    depot_fs,
    disk_read_cold,
    gbps,
    loopback_tcp,
    page_cache_read,
    pct,
    random_latencies,
    read_loop,
    readinto_loop,
)

from depot.core.config import DepotConfig

BENCH = Path(__file__).resolve().parent
PY = sys.executable
MiB = 1024 * 1024
GiB = 1024 * MiB
GROUPS = ("machine", "cold", "hot", "metadata", "multi", "peers")
ALL_PEERS = ("s3fs", "simplecache", "blockcache", "obstore", "runai")
MODEL = "model.safetensors"
MODEL_2X = "model-2x.safetensors"
LISTING = "listing"
LS_CACHED_CALLS = 5
#: Rounds of a figure measured against its machine limit pair by pair (``paired_rounds``).
PAIRED_ROUNDS = 5


@dataclass
class Settings:
    size: int = GiB
    runs: int = 3
    random_reads: int = 2000
    info_calls: int = 2000
    ls_entries: int = 10_000
    readers: int = 8
    multi_rounds: int = 3
    first_byte_ms: float = 20.0
    rate_per_conn: str = "50MB"
    page_size: str = "4MiB"
    peers: tuple[str, ...] = ALL_PEERS
    tmp: str | None = None


def human(n: float) -> str:
    for unit, mult in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= mult:
            return f"{n / mult:g} {unit}" if n % mult == 0 else f"{n / mult:.2f} {unit}"
    return f"{n:g} B"


# results -------------------------------------------------------------------------------------------

@dataclass
class Spec:
    """A figure of the issue: ``measured OP threshold`` (absolute) or
    ``measured / reference OP threshold`` (relative, when ``reference`` names one)."""

    group: str
    name: str
    op: str
    threshold: float
    unit: str
    reference: str | None = None


def figure_specs(s: Settings) -> dict[str, Spec]:
    size, size2 = human(s.size), human(2 * s.size)
    return {
        "hot_seq_http": Spec("hot", f"hot sequential read {size}, fsspec client <-> worker over "
                             f"loopback (read(8 MiB) loop; median of {PAIRED_ROUNDS} paired rounds)",
                             ">=", 0.80, "GB/s", "loopback TCP, 1 stream, same round"),
        "hot_seq_short_circuit": Spec("hot", f"hot sequential read {size}, short-circuit local "
                                      "reads (readinto(8 MiB buffer) loop, the reference's "
                                      f"shape; median of {PAIRED_ROUNDS} paired rounds)", ">=",
                                      0.50, "GB/s",
                                      "page-cache read of the same bytes, same round"),
        "hot_rand4k_p50": Spec("hot", "hot 4 KiB random read, client <-> worker: p50", "<=", 0.3,
                               "ms"),
        "hot_rand4k_p99": Spec("hot", "hot 4 KiB random read, client <-> worker: p99", "<=", 1.0,
                               "ms"),
        "cold_vs_plain_get": Spec("cold", f"cold read {size} from the emulated store through "
                                  "depot (read(8 MiB) loop) vs one GET stream", ">=", 5.0, "GB/s",
                                  "one plain GET stream"),
        "cold_vs_boto3": Spec("cold", f"cold read {size} from the emulated store through depot "
                              "(the same read) vs boto3", ">=", 1.0, "GB/s",
                              "boto3 download_file (default threads)"),
        "multi_ufs_bytes": Spec("multi", f"{s.readers} processes cold-reading one {size2} model: "
                                f"bytes from the store (the most of {s.multi_rounds} rounds)",
                                "<=", 1.05, "GiB", "model size"),
        "multi_wall": Spec("multi", f"{s.readers} processes cold-reading one {size2} model: wall "
                           f"(median of {s.multi_rounds} paired rounds)",
                           "<=", 1.3, "s", "one reader's cold wall, same round"),
        "info_p50": Spec("metadata", "cached info, fsspec client: p50", "<=", 0.3, "ms"),
        "ls_cached": Spec("metadata", f"ls of a {s.ls_entries:,}-entry directory (cached listing, "
                          f"median of {LS_CACHED_CALLS})", "<=", 50.0, "ms"),
    }


@dataclass
class Row:
    key: str
    kind: str  # figure | machine | reference | peer
    group: str
    name: str
    target: str = "-"
    value: float | None = None
    unit: str = ""
    ratio: float | None = None
    ratio_text: str = ""
    met: bool | None = None
    status: str = "ok"
    op: str | None = None
    threshold: float | None = None
    reference: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def measured_text(self) -> str:
        if self.status != "ok" or self.value is None:
            return self.status
        v = self.value
        text = {"GB/s": f"{v:.2f} GB/s", "ms": f"{v:.3f} ms", "s": f"{v:.2f} s",
                "GiB": f"{v:.3f} GiB"}.get(self.unit, f"{v:g} {self.unit}")  # fmt: skip
        return text

    def met_text(self) -> str:
        if self.kind != "figure":
            return "-"
        return {True: "yes", False: "**no**", None: "not measured"}[self.met]


def _fmt(value: float, unit: str) -> str:
    return Row("", "", "", "", value=value, unit=unit).measured_text()


def _compare(a: float, op: str, b: float) -> bool:
    return a >= b if op == ">=" else a <= b


class Results:
    def __init__(self, settings: Settings) -> None:
        self.specs = figure_specs(settings)
        self.rows: list[Row] = []
        self.errors: list[dict[str, str]] = []

    def add(self, row: Row) -> Row:
        self.rows = [r for r in self.rows if r.key != row.key] + [row]
        value = row.measured_text()
        extra = f" ({row.ratio_text})" if row.ratio_text else ""
        print(f"  {row.name}: {value}{extra}", file=sys.stderr, flush=True)
        return row

    def figure(
        self, key: str, value: float, reference: float | None = None, **details: Any
    ) -> Row:
        """One of the issue's figures; ``met`` comes from the numbers, nothing else."""
        spec = self.specs[key]
        row = Row(key, "figure", spec.group, spec.name, value=value, unit=spec.unit, op=spec.op,
                  threshold=spec.threshold, details=details)  # fmt: skip
        if spec.reference is None:
            row.target = f"{spec.op} {spec.threshold:g} {spec.unit}"
            row.ratio = value / spec.threshold
            row.ratio_text = f"{row.ratio:.2f} of target"
            row.met = _compare(value, spec.op, spec.threshold)
        else:
            if reference is None or reference <= 0:
                raise ValueError(f"{key}: no reference measured")
            row.reference = {"name": spec.reference, "value": reference, "unit": spec.unit}
            row.target = (f"{spec.op} {spec.threshold:.2f} x {spec.reference} "
                          f"({_fmt(reference, spec.unit)})")  # fmt: skip
            row.ratio = value / reference
            row.ratio_text = f"{row.ratio:.2f}"
            row.met = _compare(row.ratio, spec.op, spec.threshold)
        return self.add(row)

    def missing_figure(self, key: str, why: str) -> Row:
        spec = self.specs[key]
        target = f"{spec.op} {spec.threshold:g}" + (
            f" x {spec.reference}" if spec.reference else f" {spec.unit}")  # fmt: skip
        return self.add(Row(key, "figure", spec.group, spec.name, target=target, op=spec.op,
                            threshold=spec.threshold, status=why))  # fmt: skip

    def info(
        self, key: str, kind: str, group: str, name: str, value: float | None, unit: str,
        *, status: str = "ok", target: str = "-", compare: tuple[str, float | None] | None = None,
        **details: Any,
    ) -> Row:
        """A machine limit, a reference reader or a peer. ``compare`` is (label, depot's value):
        the ratio is depot's value over this one, when both were measured."""
        row = Row(key, kind, group, name, target=target, value=value, unit=unit, status=status,
                  details=details)  # fmt: skip
        if compare is not None:
            label, depot = compare
            row.target = f"peer (ratio: {label} / this)"
            if depot is not None and value:
                row.ratio = depot / value
                row.ratio_text = f"depot {row.ratio:.2f} x"
            else:
                row.ratio_text = "-"
        return self.add(row)

    def value(self, key: str) -> float | None:
        for row in self.rows:
            if row.key == key and row.status == "ok":
                return row.value
        return None


# data ----------------------------------------------------------------------------------------------

def write_safetensors(path: Path, data_bytes: int, tensor_bytes: int = 64 * MiB) -> int:
    """A valid safetensors file: 1-D F16 tensors of ``tensor_bytes`` (the last one shorter)
    filled with random bytes; ``data_bytes`` of tensor data after the header. Returns its size."""
    data_bytes -= data_bytes % 2
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    index = 0
    while offset < data_bytes:
        n = min(tensor_bytes, data_bytes - offset)
        header[f"layer.{index:04d}.weight"] = {
            "dtype": "F16", "shape": [n // 2], "data_offsets": [offset, offset + n]}
        offset += n
        index += 1
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # tensor data starts 8-byte aligned
    chunk = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        left = data_bytes
        while left > 0:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n
    return path.stat().st_size


# the run's context ---------------------------------------------------------------------------------

class Context:
    """What the groups share in one run: the data, the store, the machine's limits, the worker
    whose cache holds the model (filled by the cold read), and the results."""

    def __init__(self, settings: Settings, stack: contextlib.ExitStack, tmp: Path) -> None:
        self.s = settings
        self.stack = stack
        self.tmp = tmp
        self.bucket = tmp / "data" / peers.BUCKET
        self.bucket.mkdir(parents=True)
        self.results = Results(settings)
        self.limits: dict[str, float] = {}
        self._ufs: tuple[str, int] | None = None
        self._hot: tuple[str, int] | None = None

    # data
    def file(self, name: str) -> Path:
        path = self.bucket / name
        if not path.exists():
            size = self.s.size * (2 if name == MODEL_2X else 1)
            print(f"writing {name} ({human(size)})", file=sys.stderr, flush=True)
            write_safetensors(path, size)
            os.sync()  # no writeback of the data during the measurements
        return path

    def listing(self) -> str:
        folder = self.bucket / LISTING
        if not folder.exists():
            print(f"writing {self.s.ls_entries:,} files in /{LISTING}", file=sys.stderr, flush=True)
            folder.mkdir()
            for i in range(self.s.ls_entries):
                (folder / f"part-{i:06d}.bin").write_bytes(i.to_bytes(8, "little") * 32)
            os.sync()
        return f"/{LISTING}"

    # processes
    @property
    def ufs(self) -> str:
        if self._ufs is None:
            self._ufs = self.stack.enter_context(
                ufs_server(self.tmp / "data", self.s.first_byte_ms, self.s.rate_per_conn))
        return self._ufs[0]

    @property
    def ufs_pid(self) -> int:
        self.ufs  # noqa: B018  (starts it)
        assert self._ufs is not None
        return self._ufs[1]

    def worker(
        self, name: str, stack: contextlib.ExitStack | None = None,
        cache: dict[str, Any] | None = None,
    ) -> tuple[str, int]:
        """A fresh worker (empty cache; ``cache``: more of its cache settings) on the store;
        lives until ``stack`` (default: the run) closes."""
        eps, pids = (stack or self.stack).enter_context(
            workers(self.tmp, name, 1, self.ufs, self.s.page_size, cache=cache))
        return eps[0], pids[0]

    def set_hot(self, endpoint: str, pid: int) -> None:
        self._hot = (endpoint, pid)

    def hot_worker(self) -> tuple[str, int]:
        """A worker whose cache holds the model (the cold group's, or one filled here)."""
        if self._hot is None:
            self.file(MODEL)  # a group run on its own has not written it yet
            ep, pid = self.worker("hot")
            fs = depot_fs(ep)
            read_loop(fs, f"/{MODEL}")
            fs.close()
            self._hot = (ep, pid)
        return self._hot

    # machine limits
    def loopback_bytes(self) -> int:
        """Bytes of one loopback stream measurement."""
        return min(2 * GiB, max(256 * MiB, 2 * self.s.size))

    def limit(self, key: str) -> float:
        if key in self.limits:
            return self.limits[key]
        model = self.file(MODEL)
        runs = self.s.runs
        if key == "loopback":
            total = self.loopback_bytes()
            value = best_of(runs, lambda: loopback_tcp(total))
            name = f"machine: loopback TCP, 1 stream (Python sendall -> recv_into, {human(total)})"
        elif key == "page_cache":
            page_cache_read(model)
            value = best_of(runs, lambda: page_cache_read(model))
            name = f"machine: page-cache read (pread, 8 MiB buffer, {human(model.stat().st_size)})"
        elif key == "disk":
            value = disk_read_cold(model)  # drops the file's pages, then reads it back once
            name = f"machine: direct disk read (page cache dropped, {human(model.stat().st_size)})"
        else:
            raise KeyError(key)
        self.limits[key] = value
        self.results.info(f"machine_{key}", "machine", "machine", name, value, "GB/s",
                          best_of=runs if key != "disk" else 1)  # fmt: skip
        return value


# groups --------------------------------------------------------------------------------------------

def group_machine(ctx: Context) -> None:
    for key in ("disk", "page_cache", "loopback"):
        ctx.limit(key)


def group_cold(ctx: Context) -> None:
    r = ctx.results
    model = ctx.file(MODEL)
    size = model.stat().st_size
    s3 = ctx.ufs

    before = cpu_seconds(ctx.ufs_pid)
    n, dt = peers.plain_get(s3, MODEL)
    assert n == size, (n, size)
    plain = gbps(n, dt)
    r.info("ref_plain_get", "reference", "cold", f"reference: one plain GET stream of {human(size)}"
           " (http.client)", plain, "GB/s", seconds=dt, ufs_cpu_s=cpu_seconds(ctx.ufs_pid) - before)

    boto = None
    why = peers.missing("boto3")
    if why:
        r.info("ref_boto3", "reference", "cold", "reference: boto3 download_file", None, "GB/s",
               status=why)  # fmt: skip
    else:
        n, dt = peers.boto3_download_file(s3, MODEL, ctx.tmp / "boto3-download.bin")
        assert n == size, (n, size)
        boto = gbps(n, dt)
        r.info("ref_boto3", "reference", "cold", f"reference: boto3 download_file of {human(size)}"
               " (default TransferConfig)", boto, "GB/s", seconds=dt)

    ep, pid = ctx.worker("cold")
    fs = depot_fs(ep)
    cpu0 = (cpu_seconds(pid), cpu_seconds(ctx.ufs_pid))
    sent0 = ufs_bytes(s3)
    n, dt = read_loop(fs, f"/{MODEL}")
    assert n == size, (n, size)
    cold = gbps(n, dt)
    sent = ufs_bytes(s3) - sent0
    stats = fs.cache_stats()
    fs.close()
    details = {"seconds": dt, "worker_cpu_s": cpu_seconds(pid) - cpu0[0],
               "ufs_cpu_s": cpu_seconds(ctx.ufs_pid) - cpu0[1], "ufs_bytes_sent": sent,
               "ufs_page_reads": stats.get("ufs_reads")}
    ctx.set_hot(ep, pid)  # its cache now holds the model
    r.figure("cold_vs_plain_get", cold, plain, **details)
    if boto is None:
        r.missing_figure("cold_vs_boto3", f"not measured: boto3 {why}")
    else:
        r.figure("cold_vs_boto3", cold, boto, **details)


def group_hot(ctx: Context) -> None:
    r = ctx.results
    path = f"/{MODEL}"
    size = ctx.file(MODEL).stat().st_size
    ep, pid = ctx.hot_worker()
    loopback = ctx.limit("loopback")

    fs = depot_fs(ep)
    read_loop(fs, path)  # connections up; every page is cached already
    cpu0 = cpu_seconds(pid)
    hot, hot_reference, rounds = paired_rounds(
        lambda: loopback_tcp(ctx.loopback_bytes()), lambda: gbps(*read_loop(fs, path)))
    held = fs.cache_stats()
    r.figure("hot_seq_http", hot, hot_reference, **rounds,
             worker_cpu_s_all_rounds=cpu_seconds(pid) - cpu0,
             memory_tier_bytes=held.get("memory_bytes"),
             memory_tier_capacity_bytes=held.get("memory_capacity_bytes"),
             memory_tier_hits=held.get("memory_hits"))  # fmt: skip
    other_shape(r, "hot_seq_http_readinto", "the hot HTTP read above as a readinto(8 MiB "
                "buffer) loop (a copy out of each read-ahead block)", "loopback",
                *paired_rounds(lambda: loopback_tcp(ctx.loopback_bytes()),
                               lambda: gbps(*readinto_loop(fs, path))))  # fmt: skip
    # What any server gets here, sending from memory (as the memory tier does): the ceiling
    # of the figure above.
    bare_ceiling(ctx, "memory", "machine_memory_server", "sending one buffer from memory",
                 ("depot hot sequential HTTP", hot), "hot sequential HTTP")  # fmt: skip
    hot_files_only(ctx, path, loopback)

    def one(off: int) -> bytes:
        data: bytes = fs.cat_file(path, off, off + 4096)
        return data

    random_latencies(one, size, 100)  # warm-up
    lat = random_latencies(one, size, ctx.s.random_reads)
    p50, p99 = pct(lat, 0.5) * 1e3, pct(lat, 0.99) * 1e3
    r.figure("hot_rand4k_p50", p50, reads=len(lat), p99_ms=p99, max_ms=max(lat) * 1e3)
    r.figure("hot_rand4k_p99", p99, reads=len(lat), p50_ms=p50, max_ms=max(lat) * 1e3)
    stats = fs.cache_stats()
    fs.close()

    sfs = depot_fs(ep, short_circuit=True)
    read_loop(sfs, path)  # finds the local worker
    ctx.limit("page_cache")  # the machine row; it also brings the model into the page cache
    model = ctx.file(MODEL)
    sc, sc_reference, rounds = paired_rounds(
        lambda: page_cache_read(model), lambda: gbps(*readinto_loop(sfs, path)))
    # A read() loop's results are new objects, two alive at a time: a copy into memory out of
    # the cache ("Ninth look" in docs/benchmarks.md). The peers' rows compare with this one.
    other_shape(r, "hot_seq_short_circuit_read", "the short-circuit read above as a read(8 MiB) "
                "loop (each result a new bytes object)", "page-cache read",
                *paired_rounds(lambda: page_cache_read(model),
                               lambda: gbps(*read_loop(sfs, path))))  # fmt: skip
    sfs.close()  # reports its local hits to the worker
    after = fs.cache_stats()
    r.figure("hot_seq_short_circuit", sc, sc_reference, **rounds,
             hit_ratio_after_http_runs=stats.get("hit_ratio"),
             short_circuit_bytes=after.get("short_circuit_bytes"))  # fmt: skip


def other_shape(
    r: Results, key: str, what: str, limit: str, value: float, reference: float,
    rounds: dict[str, Any],
) -> None:
    """A reference row: a hot figure's read in its other shape (``read`` for ``readinto`` or
    the other way round), taken in paired rounds with its limit as the figure is."""
    row = r.info(key, "reference", "hot", f"reference: {what}; median of {PAIRED_ROUNDS} "
                 "paired rounds", value, "GB/s", **rounds)  # fmt: skip
    row.ratio = value / reference
    row.ratio_text = f"{row.ratio:.2f} x {limit}, same round"


def paired_rounds(
    reference: Callable[[], float], measure: Callable[[], float], rounds: int = PAIRED_ROUNDS,
    best: Callable[[Iterable[float]], float] = max,
) -> tuple[float, float, dict[str, Any]]:
    """``measure`` against ``reference`` in rounds, each pair taken back to back (the order
    alternating); returns the measured value and the reference of the round whose ratio is the
    median, and every round (``best``: max for rates, min for times).

    Why: this VM's rates swing by a third or more within a minute (loopback TCP measured 4.6 and
    8.4 GB/s in consecutive runs), and a machine limit measured minutes before a reader, in
    another phase, would move the ratio as much as the reader does.
    """
    pairs = []
    for i in range(rounds):
        if i % 2 == 0:
            ref = reference()
            got = measure()
        else:
            got = measure()
            ref = reference()
        pairs.append((got, ref))
    got, ref = sorted(pairs, key=lambda pair: pair[0] / pair[1])[len(pairs) // 2]
    return got, ref, {
        "rounds": [{"measured": g, "reference": r, "ratio": g / r} for g, r in pairs],
        "best_measured": best(g for g, _ in pairs),
        "best_reference": best(r for _, r in pairs),
    }


def bare_ceiling(
    ctx: Context, mode: str, key: str, what: str, compare: tuple[str, float], of: str
) -> None:
    """A row for the bare threaded server (``hot_ceiling.py``) in ``mode``, serving the model
    to a blocking client over 2 connections: the ceiling of the depot read ``compare`` names."""
    model = ctx.file(MODEL)
    loopback = ctx.limit("loopback")
    with bare_server(model, mode) as bare:
        ceiling = best_of(ctx.s.runs, lambda: blocking_client(
            bare, f"/{MODEL}", model.stat().st_size, lanes=2))  # fmt: skip
    row = ctx.results.info(
        key, "machine", "machine", f"machine: bare server {what}, a thread per connection; "
        "blocking client, 2 connections of 8 MiB ranges", ceiling, "GB/s", compare=compare,
        best_of=ctx.s.runs, x_loopback=ceiling / loopback)  # fmt: skip
    row.target = f"ceiling of {of} ({ceiling / loopback:.2f} x loopback)"


def hot_files_only(ctx: Context, path: str, loopback: float) -> None:
    """The hot sequential read from a worker without a memory tier (``cache.memory_size: 0``),
    where every page is read from its file and checked, and that way's bare ceiling."""
    r = ctx.results
    runs = ctx.s.runs
    with contextlib.ExitStack() as stack:
        ep, pid = ctx.worker("hot-files", stack, cache={"memory_size": 0})
        fs = depot_fs(ep)
        read_loop(fs, path)  # fills its cache from the store
        read_loop(fs, path)
        cpu0 = cpu_seconds(pid)
        files = best_of(runs, lambda: gbps(*read_loop(fs, path)))
        stats = fs.cache_stats()
        fs.close()
        row = r.info("hot_seq_http_files", "reference", "hot",
                     "reference: depot without a memory tier (cache.memory_size 0), the same hot "
                     "read, every page read from its file and checked", files, "GB/s",
                     best_of=runs, x_loopback=files / loopback,
                     worker_cpu_s_all_runs=cpu_seconds(pid) - cpu0,
                     memory_tier_hits=stats.get("memory_hits"))  # fmt: skip
        row.ratio = files / loopback
        row.ratio_text = f"{row.ratio:.2f} x loopback"
    bare_ceiling(ctx, "pread+xxh3", "machine_verified_server",
                 "of a cached file, pread + xxh3 of every 64 KiB + sendall",
                 ("depot without a memory tier", files), "the read from page files")  # fmt: skip


def group_metadata(ctx: Context) -> None:
    r = ctx.results
    listing = ctx.listing()
    ep, _ = ctx.hot_worker()
    fs = depot_fs(ep)
    path = f"/{MODEL}"
    for _ in range(50):
        fs.info(path)
    lat = []
    for _ in range(ctx.s.info_calls):
        t0 = time.perf_counter()
        fs.info(path)
        lat.append(time.perf_counter() - t0)
    r.figure("info_p50", pct(lat, 0.5) * 1e3, calls=len(lat), p99_ms=pct(lat, 0.99) * 1e3)

    def ls() -> tuple[int, float]:
        t0 = time.perf_counter()
        n = len(fs.ls(listing, detail=True))
        return n, (time.perf_counter() - t0) * 1e3

    first_n, first_ms = ls()
    cached = [ls() for _ in range(LS_CACHED_CALLS)]
    fs.close()
    counts = {first_n, *(n for n, _ in cached)}
    if counts != {ctx.s.ls_entries}:
        raise AssertionError(f"ls returned {sorted(counts)} entries, not {ctx.s.ls_entries}")
    times = [ms for _, ms in cached]
    # The median of the cached listings: one listing alone can take a garbage collection of
    # the whole process (10,000 new dicts start one), which is the process's, not the listing's.
    r.figure("ls_cached", statistics.median(times), entries=first_n, first_listing_ms=first_ms,
             cached_listings_ms=times)  # fmt: skip


@dataclass
class Readers:
    wall: float
    seconds: list[float]
    #: seconds from the round's start (its worker's, or its processes') to the start signal
    setup: float = 0.0


def run_at_once(
    commands: list[list[str]], not_before: float = 0.0
) -> tuple[float, list[dict[str, Any]]]:
    """Processes that print ``ready``, wait for a line, work, then print one JSON line: all
    started, then all signalled at once (not before ``not_before``, a ``perf_counter`` time).
    Returns the wall time from the signal to the last one's line, and their lines in order."""
    procs = [subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for args in commands]  # fmt: skip
    try:
        for proc, args in zip(procs, commands, strict=True):
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{' '.join(args[1:3])} did not start")
        time.sleep(max(0.0, not_before - time.perf_counter()))
        t0 = time.perf_counter()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc, args in zip(procs, commands, strict=True):
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{' '.join(args[1:3])} failed (exit {proc.wait(30)})")
            results.append(json.loads(line))
        return time.perf_counter() - t0, results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(30)


def _checked(results: list[dict[str, Any]], size: int) -> list[float]:
    for res in results:
        if res["bytes"] != size:
            raise AssertionError(f"a reader got {res['bytes']} bytes of {size}")
    return [res["seconds"] for res in results]


def run_readers(endpoint: str, path: str, count: int, short_circuit: bool, size: int) -> Readers:
    """``count`` reader processes (``suite_reader.py``) started at once; the wall time runs
    from the start signal to the last reader's last byte."""
    args = [PY, str(BENCH / "suite_reader.py"), endpoint, path, "1" if short_circuit else "0"]
    wall, results = run_at_once([args] * count)
    return Readers(wall, _checked(results, size))


def run_bare(ufs: str, tmp: Path, key: str, count: int, size: int, setup: float) -> Readers:
    """The bare pipeline (``bare_pipeline.py``): one fetch of ``key`` into new files and
    ``count`` readers of them, signalled ``setup`` seconds after the round starts."""
    start = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="bare-", dir=tmp))
    script = str(BENCH / "bare_pipeline.py")
    try:
        wall, results = run_at_once(
            [[PY, script, "fetch", ufs, key, str(size), str(folder)]]
            + [[PY, script, "read", str(folder), str(size)]] * count,
            not_before=start + setup,
        )
        return Readers(wall, _checked(results[1:], size), setup=time.perf_counter() - start - wall)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def group_multi(ctx: Context) -> None:
    """One reader and then ``readers`` at once, each on a fresh worker, in paired rounds (the
    order alternating, as for the hot figures): the wall figure is the round with the median
    ratio, and the store-bytes figure the largest count of any round."""
    r = ctx.results
    model = ctx.file(MODEL_2X)
    size = model.stat().st_size
    s3 = ctx.ufs
    short_circuit = DepotConfig().client.short_circuit  # the client's default
    path = f"/{MODEL_2X}"
    ones: list[tuple[Readers, int]] = []
    manys: list[tuple[Readers, int, float]] = []

    def one_reader() -> float:
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            ep, _ = ctx.worker(f"multi-1-{len(ones)}", stack)
            b0 = ufs_bytes(s3)
            one = run_readers(ep, path, 1, short_circuit, size)
            one.setup = time.perf_counter() - start - one.wall
            ones.append((one, ufs_bytes(s3) - b0))
        return one.wall

    def many_readers() -> float:
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            ep, pid = ctx.worker(f"multi-n-{len(manys)}", stack)
            b0 = ufs_bytes(s3)
            cpu0 = cpu_seconds(pid)
            many = run_readers(ep, path, ctx.s.readers, short_circuit, size)
            many.setup = time.perf_counter() - start - many.wall
            manys.append((many, ufs_bytes(s3) - b0, cpu_seconds(pid) - cpu0))
        return many.wall

    wall, one_wall, rounds = paired_rounds(one_reader, many_readers, ctx.s.multi_rounds, min)
    many, _, worker_cpu = next(m for m in manys if m[0].wall == wall)
    one, _ = next(o for o in ones if o[0].wall == one_wall)
    most = max(b for _, b, _ in manys)
    common = {"readers": ctx.s.readers, "short_circuit": short_circuit, "model_bytes": size}
    r.figure("multi_ufs_bytes", most / GiB, size / GiB, ufs_bytes=most,
             ufs_bytes_each_round=[b for _, b, _ in manys],
             one_reader_ufs_bytes=[b for _, b in ones], **common)  # fmt: skip
    r.figure("multi_wall", wall, one_wall, **rounds, reader_seconds=many.seconds,
             one_reader_seconds=one.seconds, worker_cpu_s=worker_cpu,
             delivered_gbps=gbps(size * ctx.s.readers, wall),
             setup_s={"one": [o.setup for o, _ in ones], "many": [m.setup for m, _, _ in manys]},
             **common)  # fmt: skip
    bare_multi(ctx, size, statistics.median(o.setup for o, _ in ones),
               statistics.median(m.setup for m, _, _ in manys))


def bare_multi(ctx: Context, size: int, one_setup: float, many_setup: float) -> None:
    """The machine row of the 8-reader figure: the same rounds with nothing of depot in them
    (``bare_pipeline.py``). Each round is signalled as long after its start as depot's rounds
    of the same reader count were (worker and readers starting): the VM charges for memory
    by how recently it was freed, so an earlier start would find it cheaper."""
    ufs, tmp, readers = ctx.ufs, ctx.tmp, ctx.s.readers
    done: dict[int, list[Readers]] = {1: [], readers: []}

    def bare(count: int, setup: float) -> float:
        done[count].append(run_bare(ufs, tmp, MODEL_2X, count, size, setup))
        return done[count][-1].wall

    wall, one_wall, rounds = paired_rounds(lambda: bare(1, one_setup),
                                           lambda: bare(readers, many_setup),
                                           ctx.s.multi_rounds, min)  # fmt: skip
    row = ctx.results.info(
        "machine_bare_multi", "machine", "multi", f"machine: one fetch into new files (obstore, "
        f"4 MiB ranges, 32 in flight) and {readers} bare readers of them (pread + xxh3 of every "
        f"64 KiB), against one bare reader (median of {ctx.s.multi_rounds} paired rounds)",
        wall, "s", one_reader_s=one_wall, **rounds,
        setup_s={"one": [b.setup for b in done[1]], "many": [b.setup for b in done[readers]],
                 "asked": [one_setup, many_setup]})  # fmt: skip
    row.target = f"bound of the {readers}-reader wall figure"
    row.ratio = wall / one_wall
    row.ratio_text = f"{row.ratio:.2f} x one bare reader, same round"


#: peer -> its rows: (key, name, which depot figure it is compared with)
PEER_ROWS: dict[str, list[tuple[str, str, str]]] = {
    "s3fs": [("peer_s3fs", "s3fs direct, read(8 MiB) loop", "cold")],
    "simplecache": [("peer_simplecache_cold", "fsspec simplecache over s3fs, first read", "cold"),
                    ("peer_simplecache_hot", "fsspec simplecache over s3fs, second read", "hot")],
    "blockcache": [("peer_blockcache_cold", "fsspec blockcache over s3fs, first read", "cold"),
                   ("peer_blockcache_hot", "fsspec blockcache over s3fs, second read", "hot")],
    "obstore": [("peer_obstore_get", "obstore direct, get (1 stream)", "cold"),
                ("peer_obstore_ranges", "obstore direct, 16 concurrent 8 MiB ranges", "cold")],
    "runai": [("peer_runai", "runai-model-streamer, safetensors to CPU tensors (defaults)",
               "cold")],
}


def tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file (the file less its header)."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


def group_peers(ctx: Context) -> None:
    r = ctx.results
    model = ctx.file(MODEL)
    size = model.stat().st_size
    expected = {"peer_runai": tensor_bytes(model)}  # the streamer reads the tensors only
    s3 = ctx.ufs
    depot = {
        "cold": ("depot cold read", r.value("cold_vs_plain_get")),
        # The peers' hot rows are read(8 MiB) loops: compared with depot's loop of that shape.
        "hot": ("depot short-circuit hot read(8 MiB) loop", r.value("hot_seq_short_circuit_read")),
    }

    def run(peer: str) -> dict[str, tuple[float, dict[str, Any]]]:
        """GB/s (and details) of each of the peer's rows."""
        if peer == "s3fs":
            n, dt = peers.s3fs_read(s3, MODEL)
            return {"peer_s3fs": (gbps(n, dt), {"bytes": n})}
        if peer in ("simplecache", "blockcache"):
            (n1, t1), (n2, t2) = peers.fsspec_cache_reads(peer, s3, MODEL, ctx.tmp / peer)
            return {f"peer_{peer}_cold": (gbps(n1, t1), {"bytes": n1}),
                    f"peer_{peer}_hot": (gbps(n2, t2), {"bytes": n2})}
        if peer == "obstore":
            n, dt = peers.obstore_get(s3, MODEL)
            ranges = direct_ranges(s3, MODEL, size)
            return {"peer_obstore_get": (gbps(n, dt), {"bytes": n}),
                    "peer_obstore_ranges": (ranges, {})}
        if peer == "runai":
            res = peers.runai_stream(s3, MODEL)
            return {"peer_runai": (gbps(res["bytes"], res["seconds"]), res)}
        raise KeyError(peer)

    for peer in ctx.s.peers:
        status = peers.missing(peer)
        measured: dict[str, tuple[float, dict[str, Any]]] = {}
        if status is None:
            print(f"  ({peer})", file=sys.stderr, flush=True)
            try:
                measured = run(peer)
                for key, (_, details) in measured.items():
                    want = expected.get(key, size)
                    if details.get("bytes", want) != want:
                        raise AssertionError(f"{key}: read {details['bytes']} bytes of {want}")
            except Exception as exc:
                traceback.print_exc()
                measured = {}
                status = f"error: {exc!r}"[:200]
                r.errors.append({"group": "peers", "peer": peer, "error": repr(exc)})
        for key, name, against in PEER_ROWS[peer]:
            label, value = depot[against]
            if key in measured:
                gb, details = measured[key]
                r.info(key, "peer", "peers", f"peer: {name}, {human(size)}", gb, "GB/s",
                       compare=(label, value), **details)  # fmt: skip
            else:
                r.info(key, "peer", "peers", f"peer: {name}, {human(size)}", None, "GB/s",
                       status=status or "not measured", compare=(label, value))  # fmt: skip


GROUP_FUNCS: dict[str, Callable[[Context], None]] = {
    "machine": group_machine,
    "cold": group_cold,
    "hot": group_hot,
    "metadata": group_metadata,
    "multi": group_multi,
    "peers": group_peers,
}


# environment and report ----------------------------------------------------------------------------

VERSIONED = ("depot", "fsspec", "s3fs", "aiobotocore", "boto3", "botocore", "obstore",
             "runai-model-streamer", "runai-model-streamer-s3", "torch", "safetensors")  # fmt: skip


def environment() -> dict[str, Any]:
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError, ValueError):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_bytes": mem,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "versions": versions,
    }


def table(rows: list[Row], specs: dict[str, Spec]) -> str:
    """Figures in the issue's order, then machine limits, references and peers as measured."""
    kinds = {"figure": 0, "machine": 1, "reference": 2, "peer": 3}
    figures = list(specs)

    def order(row: Row) -> tuple[int, int]:
        return kinds[row.kind], figures.index(row.key) if row.kind == "figure" else 0

    lines = ["| figure | target | measured | ratio | met |", "|---|---|---|---|---|"]
    for row in sorted(rows, key=order):  # stable: the others keep the run's order
        lines.append(f"| {row.name} | {row.target} | {row.measured_text()} | "
                     f"{row.ratio_text or '-'} | {row.met_text()} |")  # fmt: skip
    return "\n".join(lines)


@contextlib.contextmanager
def _tempdir(parent: str | None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="depot-suite-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(groups: list[str], settings: Settings, json_path: Path) -> int:
    """Run ``groups`` in one run, print the table, write the JSON document; returns the exit
    code (1 if a group failed)."""
    started = datetime.datetime.now(datetime.UTC)
    load_start = os.getloadavg()
    env = environment()
    print(f"depot suite: {', '.join(groups)}; size {human(settings.size)}; "
          f"{env['cpus_usable']} CPUs; load {load_start[0]:.2f}", file=sys.stderr, flush=True)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(_tempdir(settings.tmp))
        ctx = Context(settings, stack, tmp)
        for group in groups:
            print(f"[{group}]", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                GROUP_FUNCS[group](ctx)
            except Exception as exc:
                traceback.print_exc()
                ctx.results.errors.append({"group": group, "error": repr(exc),
                                           "traceback": traceback.format_exc()})  # fmt: skip
                for key, spec in ctx.results.specs.items():
                    if spec.group == group and ctx.results.value(key) is None:
                        ctx.results.missing_figure(key, f"not measured: {group} failed: {exc!r}"[:160])
            print(f"[{group}] {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        results = ctx.results
    load_end = os.getloadavg()
    env["load_average_start"] = list(load_start)
    env["load_average_end"] = list(load_end)

    figures = [r for r in results.rows if r.kind == "figure"]
    met = sum(1 for r in figures if r.met is True)
    not_met = sum(1 for r in figures if r.met is False)
    unmeasured = sum(1 for r in figures if r.met is None)
    doc = {
        "suite": "depot performance suite",
        "command": [Path(PY).name, "-m", "bench", *sys.argv[1:]],
        "groups": groups,
        "started_at": started.isoformat(),
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(),
        "settings": {**asdict(settings), "size_human": human(settings.size),
                     "ufs": {"server": "bench/ufs_server.py",
                             "first_byte_ms": settings.first_byte_ms,
                             "rate_per_conn": settings.rate_per_conn}},
        "environment": env,
        "machine_limits": {r.key.removeprefix("machine_"): {
            "name": r.name, "value": r.value, "unit": r.unit, "target": r.target,
            "ratio": r.ratio, "details": r.details} for r in results.rows if r.kind == "machine"},
        "figures": [asdict(r) for r in figures],
        "references": [asdict(r) for r in results.rows if r.kind == "reference"],
        "peers": [asdict(r) for r in results.rows if r.kind == "peer"],
        "summary": {"figures": len(figures), "met": met, "not_met": not_met,
                    "not_measured": unmeasured},
        "errors": results.errors,
    }  # fmt: skip
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2) + "\n")

    print(f"\n## depot performance suite: {', '.join(groups)} (size {human(settings.size)})\n")
    print(f"store: bench/ufs_server.py, {settings.first_byte_ms:g} ms first byte, "
          f"{settings.rate_per_conn}/s per connection; {env['cpus_usable']} usable CPUs "
          f"({env['cpu_model'] or platform.machine()}); load average {load_start[0]:.2f} at start, "
          f"{load_end[0]:.2f} at end\n")
    print(table(results.rows, results.specs))
    print(f"\nfigures met: {met} of {len(figures)}"
          + (f" ({not_met} not met)" if not_met else "")
          + (f" ({unmeasured} not measured)" if unmeasured else ""))
    print("ratio: measured / the reference in the target (a machine limit or a reader measured in "
          "this run); for a target without one, measured / target. Peers: depot's figure / the "
          "peer's.")
    print(f"JSON: {json_path}")
    return 1 if results.errors else 0
