"""Typed settings: one YAML file, ``DEPOT_*`` environment variables, then flags.

Later sources override earlier ones. Nested keys come from the environment with a double
underscore (``DEPOT_CACHE__PAGE_SIZE=8MiB``); ``DEPOT_ENDPOINT`` is a short form of
``DEPOT_CLIENT__ENDPOINT``. Unknown keys are errors, so a typo never silently does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from depot.core.errors import ConfigError
from depot.core.types import parse_duration, parse_size

DEFAULT_PORT = 7070
DEFAULT_PAGE_SIZE = 4 * 1024 * 1024
ENV_PREFIX = "DEPOT_"
ENV_ALIASES = {"DEPOT_ENDPOINT": ("client", "endpoint")}
CONFIG_ENV = "DEPOT_CONFIG"
#: The most an "auto" memory tier takes (``cache.memory_size``).
AUTO_MEMORY_MAX = 2 * 1024**3


# Mount option names that carry credentials: masked by `depot config show`, never served to
# clients (a client reading the under store itself uses its own).
_SECRET_MARKERS = ("secret", "key", "token", "password", "sas", "credential")
_NOT_SECRET = ("access_key_id", "account_name")


def is_secret_option(name: str) -> bool:
    """Whether a mount option holds a credential."""
    lowered = name.lower()
    return lowered not in _NOT_SECRET and any(m in lowered for m in _SECRET_MARKERS)


def usable_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit if lower."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 0
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and (total <= 0 or int(text) < total):
            total = int(text)
        break
    return max(0, total)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _size(value: Any) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


def _duration(value: Any) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ValueError(str(exc)) from None


class CacheDir(_Model):
    """One local directory of the page store and the bytes it may hold."""

    path: Path
    size: int = Field(default=10 * 1024**3, gt=0)

    _parse_size = field_validator("size", mode="before")(_size)


class CacheConfig(_Model):
    dirs: list[CacheDir] = Field(default_factory=lambda: [CacheDir(path=Path(".depot/cache"))])
    page_size: int = Field(default=DEFAULT_PAGE_SIZE, ge=4096, le=256 * 1024 * 1024)
    eviction: Literal["lru", "lfu"] = "lru"
    metadata_dir: Path | None = None
    # Statuses (and listing rows) the metadata cache keeps decoded in memory, beyond RocksDB:
    # a hot `ls` of a 10k-entry directory or a loader's stat of every file answers from here.
    metadata_memory_entries: int = Field(default=256 * 1024, ge=0)
    # A preload (`depot load`) writes pages with O_DIRECT where the filesystem has it: to the
    # disk only, not into the OS page cache. For datasets larger than memory (a preload does
    # not evict what readers use) and VMs where filling fresh page-cache memory costs more CPU
    # than receiving the bytes; the first read of such pages comes from the disk.
    preload_direct_io: bool = False
    # Verified pages kept in the worker's memory, so that a hot read is sent from there without
    # reading and checking the page file again. "auto": an eighth of the memory this process
    # may use (the cgroup's limit where it has one), at most 2 GiB; 0 turns it off.
    memory_size: int | Literal["auto"] = "auto"

    _parse_size = field_validator("page_size", mode="before")(_size)

    @field_validator("memory_size", mode="before")
    @classmethod
    def _parse_memory_size(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return _size(value)

    @field_validator("memory_size")
    @classmethod
    def _memory_size_positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("memory_size must be 0 (off), a size or 'auto'")
        return value

    @field_validator("page_size")
    @classmethod
    def _page_size_aligned(cls, value: int) -> int:
        if value % 4096:
            raise ValueError("page_size must be a multiple of 4 KiB")
        return value

    @field_validator("dirs")
    @classmethod
    def _dirs_present(cls, value: list[CacheDir]) -> list[CacheDir]:
        if not value:
            raise ValueError("at least one cache dir is required")
        return value

    @property
    def capacity(self) -> int:
        return sum(d.size for d in self.dirs)

    @property
    def memory_capacity(self) -> int:
        """Bytes of the memory tier (``memory_size`` with "auto" worked out)."""
        if self.memory_size == "auto":
            return min(AUTO_MEMORY_MAX, usable_memory() // 8)
        return self.memory_size

    @property
    def metadata_path(self) -> Path:
        # Inside the first dir, so that workers with their own cache dirs never share it.
        return self.metadata_dir or self.dirs[0].path / "meta"


def _pattern_list(value: Any) -> Any:
    """Patterns from YAML (a list), or a comma-separated string from a flag or the environment."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def check_glob(pattern: str) -> str:
    """A ``prefetch_on_open`` pattern, checked: ``fnmatch`` syntax, non-empty, a ``[...]`` set
    closed, and an absolute namespace path where it names directories (contains ``/``)."""
    if not pattern.strip():
        raise ValueError("empty pattern")
    if any(ord(c) < 32 or ord(c) == 127 for c in pattern):
        raise ValueError(f"pattern {pattern!r} contains a control character")
    if "/" in pattern and not pattern.startswith("/"):
        raise ValueError(
            f"pattern {pattern!r}: a pattern with '/' is matched against the whole namespace "
            "path and must start with '/' (or give a file name pattern such as '*.safetensors')"
        )
    if pattern.endswith("/"):
        raise ValueError(f"pattern {pattern!r} ends with '/': patterns name files")
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] == "[":
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                raise ValueError(f"pattern {pattern!r} has a '[' that is never closed")
            i = j
        i += 1
    return pattern


def glob_matches(patterns: Sequence[str], path: str) -> bool:
    """Whether a namespace ``path`` matches one of ``patterns`` (``prefetch_on_open``): a pattern
    without ``/`` is matched against the file's name, one with ``/`` against the whole path
    (``*`` there also crosses ``/``). Case-sensitive, as POSIX names are."""
    name = path.rpartition("/")[2]
    return any(fnmatchcase(path if "/" in p else name, p) for p in patterns)


class MountConfig(_Model):
    """A namespace entry: depot ``path`` shows the objects under ``ufs``."""

    path: str
    ufs: str
    read_only: bool = False
    metadata: str = "max-age=60s"
    # How writes through depot reach the under store (docs/writes.md): "through" (the UFS only),
    # "cache-through" (the UFS, and the written bytes into the page store) or "write-back"
    # (acknowledged once fsync'd and journaled on the worker, uploaded in the background;
    # engine settings in the ``writeback:`` section).
    write_mode: Literal["through", "cache-through", "write-back"] = "through"
    options: dict[str, str] = Field(default_factory=dict)
    # Files that clients pull whole into the cache as soon as they open them for reading (model
    # weights a server mmaps: docs/configuration.md#prefetch-on-open). Glob patterns matched
    # against the file's name (``*.safetensors``), or, with a '/', against its whole namespace
    # path (``/models/llama-*/*.bin``). Served to clients with the cluster view. Empty: off.
    prefetch_on_open: list[str] = Field(default_factory=list, max_length=256)

    _parse_patterns = field_validator("prefetch_on_open", mode="before")(_pattern_list)

    @field_validator("prefetch_on_open")
    @classmethod
    def _globs(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(check_glob(p) for p in value))

    def prefetches(self, path: str) -> bool:
        """Whether an open of ``path`` (a namespace path under this mount) prefetches the file."""
        return bool(self.prefetch_on_open) and glob_matches(self.prefetch_on_open, path)

    @field_validator("options", mode="before")
    @classmethod
    def _stringify(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()}
        return value


class WorkerConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    s3_port: int | None = Field(default=None, ge=0, le=65535)
    max_request_bytes: int = Field(default=64 * 1024**3, gt=0)
    # Largest request body of a write (PUT /api/v1/write); larger ones get 413 before any byte.
    max_write_bytes: int = Field(default=64 * 1024**3, gt=0)
    # Writes over this size are uploaded in parts as they arrive (memory stays bounded);
    # smaller ones are held in memory and put in one request.
    write_multipart_threshold: int = Field(default=16 * 1024**2, ge=0)
    ufs_concurrency: int = Field(default=64, ge=1, le=1024)
    prefetch_pages: int = Field(default=32, ge=0, le=1024)
    # Connections whose large cached reads are sent from a thread of their own (hot lanes,
    # docs/operations.md); 0: every response is sent from the event loop.
    hot_lanes: int = Field(default=4, ge=0, le=256)
    # Pages fetched from the under store are new 4 MiB blocks: let the allocator (glibc) keep up
    # to 64 MiB of freed memory per heap, so the next fetch reuses it instead of page-faulting
    # in fresh memory (as ``client.keep_freed_blocks`` does for a client), and put every thread
    # on the main heap (glibc unmaps a thread's own heap when it empties). Off: left as it is.
    keep_freed_blocks: bool = True

    _parse_size = field_validator(
        "max_request_bytes", "max_write_bytes", "write_multipart_threshold", mode="before"
    )(_size)


class WriteBackSettings(_Model):
    """The write-back engine of a worker (mounts with ``write_mode: write-back``)."""

    # Staging files and the journal; None: ``<first cache dir>/writeback``. Must survive a
    # restart of the worker (not a tmpfs) for acknowledged writes to survive it.
    dir: Path | None = None
    # Bytes held in staging files at most; None: bounded by the disk only. A write that does
    # not fit fails with NoSpace (HTTP 507), or waits up to ``full_wait`` with on_full "wait".
    quota: int | None = Field(default=None, gt=0)
    on_full: Literal["error", "wait"] = "error"
    full_wait: float = Field(default=60.0, ge=0)
    # Uploads running at once, their part size and the size from which they go up in parts.
    concurrency: int = Field(default=4, ge=1, le=256)
    part_size: int = Field(default=8 * 1024**2, ge=64 * 1024)  # S3 wants >= 5 MiB
    multipart_threshold: int = Field(default=16 * 1024**2, ge=0)
    # Bytes per second over all uploads; None: unlimited.
    bandwidth: int | None = Field(default=None, gt=0)
    # Attempts at a retryable upload error before the write is left failed; None: forever.
    max_attempts: int | None = Field(default=None, ge=1)
    # Longest wait of one POST /api/v1/sync?wait=1 (the client asks again until its deadline).
    sync_timeout: float = Field(default=20.0, gt=0)
    # How long a staging file lent to a writer on this node (a local write) may stay open
    # before the worker drops it, uncommitted.
    local_write_ttl: float = Field(default=3600.0, gt=0)
    # Uploads wait while writes are coming in, so that a checkpoint of many files is not slowed
    # by the upload of its first ones; at most this long after a write. 0: upload at once.
    defer_uploads: float = Field(default=5.0, ge=0)

    _parse_size = field_validator(
        "quota", "part_size", "multipart_threshold", "bandwidth", mode="before"
    )(lambda v: None if v is None else _size(v))
    _parse_duration = field_validator(
        "full_wait", "sync_timeout", "local_write_ttl", "defer_uploads", mode="before"
    )(_duration)

    def staging_dir(self, cache: CacheConfig) -> Path:
        return self.dir or cache.dirs[0].path / "writeback"


class ClientConfig(_Model):
    endpoint: str | None = None
    ufs_fallback: bool = True
    read_ahead: int = Field(default=16 * 1024 * 1024, ge=0)
    parallelism: int = Field(default=8, ge=1, le=256)
    timeout: float = Field(default=30.0, gt=0)
    connect_timeout: float = Field(default=2.0, gt=0)
    # Read pages of a worker on the same node straight from its cache dirs (verified, counted
    # as hits by the worker); used only where the node and the dirs are found to be shared.
    short_circuit: bool = True
    # With short_circuit: a read of a page or more whose pages the local worker does not have
    # yet asks the worker to fetch them into its store, then reads them from the page files like
    # any other, instead of receiving them over HTTP. Many local readers of one cold file then
    # cost the worker one fetch and no sends. Off: such reads go over HTTP.
    short_circuit_fills: bool = True
    # Write-back writes whose owner worker is on this node: write the worker's staging file here
    # and commit it, instead of streaming the bytes to it (needs short_circuit's node check).
    local_writes: bool = True
    # A request that has not finished after this long makes the client check, on a connection
    # of its own, that the worker still answers (/healthz within connect_timeout); a hung or
    # cut-off worker is then left at once for the next one. 0 turns the check off.
    probe_after: float = Field(default=1.0, ge=0)
    # Reads of up to 1 MiB that a plain thread makes through the sync API (fsspec's
    # ``cat_file``, small reads of an open file), and its ``info`` calls, go out on a blocking
    # connection from that thread, not through the event loop: no thread hand-off each way.
    # Failures are handed to the event loop path, which fails over.
    caller_thread_reads: bool = True
    # Large reads get a new result object each (a read-ahead block, a short-circuit read of
    # 1 MiB or more): let the process's allocator (glibc) keep up to 64 MiB of freed memory per
    # heap, so the next result reuses it instead of page-faulting in fresh memory. Set once per
    # process, on the first such read; off leaves the allocator as it is.
    keep_freed_blocks: bool = True

    _parse_size = field_validator("read_ahead", mode="before")(_size)
    _parse_duration = field_validator(
        "timeout", "connect_timeout", "probe_after", mode="before"
    )(_duration)


class UfsConfig(_Model):
    """How under stores are called: retries and their backoff."""

    retries: int = Field(default=5, ge=0, le=50)
    backoff_base: float = Field(default=0.05, ge=0)
    backoff_max: float = Field(default=5.0, ge=0)
    timeout: float = Field(default=60.0, gt=0)

    _parse_duration = field_validator("backoff_base", "backoff_max", "timeout", mode="before")(
        _duration
    )


def _url_list(value: Any) -> Any:
    """A list of URLs from YAML, or a comma-separated string from a flag or the environment."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class ClusterConfig(_Model):
    """How workers find each other and how data is placed over them."""

    name: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    membership: Literal["embedded", "static", "etcd"] = "embedded"
    etcd: list[str] = Field(default_factory=list)
    workers: list[str] = Field(default_factory=list)
    # The URL other workers and clients use to reach this worker (default: from host and port).
    advertise: str | None = None
    virtual_nodes: int = Field(default=2000, ge=1, le=100_000)
    segment_size: int = Field(default=256 * 1024 * 1024, ge=0)
    replication: int = Field(default=1, ge=1, le=16)
    lease_ttl: float = Field(default=10.0, ge=1.0, le=3600.0)
    # How often a client without etcd access asks a worker for the ring view.
    refresh_interval: float = Field(default=5.0, gt=0)

    _parse_lists = field_validator("etcd", "workers", mode="before")(_url_list)
    _parse_size = field_validator("segment_size", mode="before")(_size)
    _parse_duration = field_validator("lease_ttl", "refresh_interval", mode="before")(_duration)

    @model_validator(mode="after")
    def _membership_sources(self) -> ClusterConfig:
        if self.membership == "etcd" and not self.etcd:
            raise ValueError("membership 'etcd' needs the etcd endpoints (cluster.etcd / --etcd)")
        if self.membership == "static" and not self.workers:
            raise ValueError("membership 'static' needs the worker URLs (cluster.workers / --workers)")
        return self


_BUCKET_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class S3Config(_Model):
    """The S3 gateway (docs/s3.md): credentials, anonymous access, bucket mapping, limits.

    ``DEPOT_S3_ACCESS_KEY`` / ``DEPOT_S3_SECRET_KEY`` override the keys given here.
    """

    access_key: str | None = Field(default=None, min_length=1, max_length=128)
    secret_key: str | None = Field(default=None, min_length=1, max_length=256, repr=False)
    # Serve requests that carry no signature at all (signed ones are still verified).
    anonymous: bool = False
    region: str = Field(default="us-east-1", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    # "top-level": every top-level directory of the namespace is a bucket;
    # "mapped": only the buckets of ``buckets`` (name -> namespace path).
    bucket_mode: Literal["top-level", "mapped"] = "top-level"
    buckets: dict[str, str] = Field(default_factory=dict)
    max_keys: int = Field(default=1000, ge=1, le=100_000)
    clock_skew: float = Field(default=900.0, gt=0)
    # Requests served at once; more get 503 SlowDown.
    max_inflight: int = Field(default=1024, ge=1, le=1_000_000)
    # Where multipart upload parts are staged until Complete/Abort (docs/s3.md); None: an
    # ``s3-staging`` directory under the first cache dir.
    staging_dir: Path | None = None
    # Answer a GetObject whose bytes another live worker owns with a 307 to that worker's
    # S3 gateway (docs/s3.md#redirects); off: read through the client, as always.
    redirect_reads: bool = False

    _parse_duration = field_validator("clock_skew", mode="before")(_duration)

    @field_validator("buckets")
    @classmethod
    def _bucket_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, path in value.items():
            if not (0 < len(name) <= 255 and set(name) <= _BUCKET_CHARS and name[0].isalnum()):
                raise ValueError(f"invalid bucket name {name!r}")
            if not isinstance(path, str) or not path.startswith("/"):
                raise ValueError(f"bucket {name!r}: the namespace path must start with '/'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> S3Config:
        if (self.access_key is None) != (self.secret_key is None):
            raise ValueError("give both s3.access_key and s3.secret_key, or neither")
        if self.bucket_mode == "mapped" and not self.buckets:
            raise ValueError("bucket_mode 'mapped' needs s3.buckets (name: /namespace/path)")
        return self


class FuseConfig(_Model):
    """The POSIX mount (``depot mount``): attributes, kernel caching and read tuning."""

    # Seconds the kernel trusts attributes / names / "no such file" answers before asking again.
    attr_timeout: float = Field(default=5.0, ge=0)
    entry_timeout: float = Field(default=5.0, ge=0)
    negative_timeout: float = Field(default=1.0, ge=0)
    # Owner and permission bits shown for every entry (default: the user who mounts).
    uid: int | None = Field(default=None, ge=0)
    gid: int | None = Field(default=None, ge=0)
    file_mode: int = Field(default=0o444, ge=0, le=0o7777)
    dir_mode: int = Field(default=0o555, ge=0, le=0o7777)
    allow_other: bool = False
    # Kernel read-ahead of the mount (bdi read_ahead_kb): 1 MiB requests instead of 128 KiB.
    read_ahead_kb: int = Field(default=1024, ge=0, le=65536)
    # Keep the kernel page cache across opens while the file's version is unchanged.
    kernel_cache: bool = True
    # Requests served at once (an asyncio task each).
    concurrency: int = Field(default=64, ge=1, le=1024)
    # Bytes of file data the mount process holds (read-ahead and prefetched blocks).
    memory: int = Field(default=256 * 1024 * 1024, ge=0)
    # Random small reads on a file: after `random_threshold` of them, prefetch whole segments.
    prefetch: bool = True
    prefetch_segment: int = Field(default=32 * 1024 * 1024, ge=1024 * 1024)
    random_threshold: int = Field(default=4, ge=1)
    # Seconds to keep serving open files after SIGTERM/SIGINT (the mount is detached at once).
    shutdown_grace: float = Field(default=5.0, ge=0)
    # Writes (docs/fuse.md#writes): off unless `-o rw` or `read_only: false`; files being written
    # are staged in `staging_dir` (default: the system temp dir) and uploaded on close.
    read_only: bool = True
    staging_dir: str | None = None
    # What fsync of a written file waits for: "local", the file acknowledged by the worker
    # (on a write-back mount: durable on its disk, as at close); "store", also in the under
    # store (a write-back upload is waited for).
    fsync: Literal["local", "store"] = "local"

    _parse_size = field_validator("memory", "prefetch_segment", mode="before")(_size)
    _parse_duration = field_validator(
        "attr_timeout", "entry_timeout", "negative_timeout", "shutdown_grace", mode="before"
    )(_duration)

    @field_validator("file_mode", "dir_mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return int(value, 8)
            except ValueError:
                raise ValueError(f"not an octal mode: {value!r}") from None
        return value


class DepotConfig(_Model):
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    mounts: list[MountConfig] = Field(default_factory=list)
    client: ClientConfig = Field(default_factory=ClientConfig)
    ufs: UfsConfig = Field(default_factory=UfsConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    fuse: FuseConfig = Field(default_factory=FuseConfig)
    s3: S3Config = Field(default_factory=S3Config)
    writeback: WriteBackSettings = Field(default_factory=WriteBackSettings)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _unique_mounts(self) -> DepotConfig:
        seen: set[str] = set()
        for mount in self.mounts:
            key = mount.path.rstrip("/") or "/"
            if key in seen:
                raise ValueError(f"mount path {mount.path!r} is defined twice")
            seen.add(key)
        segment = self.cluster.segment_size
        if segment and segment % self.cache.page_size:
            raise ValueError(
                f"cluster.segment_size ({segment}) must be 0 or a multiple of "
                f"cache.page_size ({self.cache.page_size})"
            )
        return self

    def to_public_dict(self) -> dict[str, Any]:
        """The effective config with secrets masked, for ``depot config show``."""
        data = self.model_dump(mode="json")
        for mount in data.get("mounts", []):
            for key in list(mount.get("options", {})):
                if is_secret_option(key):
                    mount["options"][key] = "***"
        if data.get("s3", {}).get("secret_key") is not None:
            data["s3"]["secret_key"] = "***"
        return data


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Turn ``DEPOT_SECTION__KEY=value`` variables into a nested dict."""
    result: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        if name in ENV_ALIASES:
            parts: tuple[str, ...] = ENV_ALIASES[name]
        elif "__" in name:
            parts = tuple(p.lower() for p in name[len(ENV_PREFIX):].split("__"))
        else:
            continue  # other DEPOT_* names belong to other features (S3 keys, tests)
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return result


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError("config file not found", str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file ({exc.strerror})", str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file is not valid YAML{where}", str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config file must hold a mapping at the top level", str(path))
    return data


def _format_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "invalid config: " + "; ".join(parts)


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> DepotConfig:
    """Build the effective config from file, environment and flag overrides (in that order)."""
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    file_path = Path(path) if path else (Path(env[CONFIG_ENV]) if env.get(CONFIG_ENV) else None)
    if file_path is None and Path("depot.yaml").is_file():
        file_path = Path("depot.yaml")
    if file_path is not None:
        data = read_config_file(file_path)
    data = _merge(data, env_overrides(env))
    if overrides:
        data = _merge(data, overrides)
    try:
        return DepotConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc)) from None
