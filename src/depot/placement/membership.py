"""Cluster membership: which workers are in the cluster now, and a small shared KV store.

Three implementations behind one async interface, :class:`Membership`:

* :class:`EmbeddedMembership`: in-process, no dependencies; the default of ``depot up``. The
  workers registered in the process (or in every instance sharing one :class:`EmbeddedRegistry`)
  are the view.
* :class:`StaticMembership`: a fixed list of worker URLs from the config. It cannot learn about
  other processes, so it never pretends to: the view is the list.
* ``EtcdMembership`` (``depot.placement.etcd``): leases and a watch on etcd, so a worker that dies
  leaves the view within its lease TTL and every process sees the same set of workers.

The view is served from memory: ``workers()`` never waits on a backend, and keeps returning the
last known view while the backend is unreachable (``healthy`` turns False), because a cache that
stops routing reads when its coordinator blinks would turn an etcd hiccup into an outage.

Changes are pushed with :meth:`Membership.subscribe`: a plain callback that receives the whole new
view (a sorted list), called once at once with the current view and then on every change. A
callback was chosen over an async iterator because the main consumer (the ring) only rebuilds a
value from the latest view; it needs no task of its own and cannot fall behind a queue.

:class:`ClusterStore` is the shared KV that job state lives in (``jobs/<job_id>``); the embedded
and the etcd membership implement it, so single-node jobs use the same API as a cluster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from depot.core.errors import (
    ConfigError,
    InvalidArgument,
    NotFound,
    RequestTooLarge,
    Unavailable,
)

__all__ = [
    "DRAINING",
    "LIVE",
    "MAX_VALUE_BYTES",
    "STARTING",
    "ClusterStore",
    "EmbeddedMembership",
    "EmbeddedRegistry",
    "Membership",
    "StaticMembership",
    "ViewCallback",
    "WorkerInfo",
    "check_endpoint",
    "check_kv_key",
    "normalize_endpoint",
    "static_worker_id",
]

log = logging.getLogger(__name__)

LIVE = "live"
"""Serving and placed on the ring."""
DRAINING = "draining"
"""Still serving reads, but should get no new placements (graceful leave in progress)."""
STARTING = "starting"
"""Registered but not serving yet (recovering its page store)."""

MAX_VALUE_BYTES = 1024 * 1024
"""Largest KV value: etcd refuses requests over 1.5 MiB by default, so every backend stops at 1 MiB."""

WORKERS_PREFIX = "workers/"
"""Keys under this prefix of a cluster belong to membership; the KV API may read them only."""

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


# --- model -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What the cluster knows about one worker; stored as JSON in every backend.

    ``worker_id`` is the worker's ring identity as text (``str(WorkerIdentity)``: 32 hex digits,
    or ``vN:<hex>``), persisted in its cache dir so a restart keeps its ring position. It must be a
    safe key segment: letters, digits and ``._:-``, at most 128 characters.
    """

    worker_id: str
    endpoint: str
    state: str = LIVE
    capacity_bytes: int = 0
    used_bytes: int = 0
    started_at: float = field(default_factory=time.time)
    version: str = ""
    # The URL of the worker's S3 gateway ("": none, or a worker from before it was advertised);
    # gateways that redirect reads to a key's owner send clients there (docs/s3.md).
    s3_endpoint: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.worker_id, str) or not _ID_RE.fullmatch(self.worker_id):
            raise InvalidArgument(f"invalid worker id {self.worker_id!r}")
        check_endpoint(self.endpoint)
        if not isinstance(self.state, str) or not self.state:
            raise InvalidArgument(f"invalid worker state {self.state!r}")
        for name in ("capacity_bytes", "used_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgument(f"{name} must be a non-negative integer, got {value!r}")
        if isinstance(self.started_at, bool) or not isinstance(self.started_at, (int, float)):
            raise InvalidArgument(f"started_at must be a number, got {self.started_at!r}")
        if not isinstance(self.version, str):
            raise InvalidArgument(f"version must be a string, got {self.version!r}")
        if self.s3_endpoint != "":
            check_endpoint(self.s3_endpoint)

    @property
    def is_live(self) -> bool:
        return self.state == LIVE

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.s3_endpoint:
            del data["s3_endpoint"]  # entries without a gateway stay as they always were
        return data

    def to_json(self) -> bytes:
        """Compact, key-sorted JSON: equal infos give equal bytes (etcd compares values)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkerInfo:
        """Unknown keys are ignored so that a newer worker's entry still reads in an older client."""
        if not isinstance(data, Mapping):
            raise InvalidArgument("a worker entry must be a JSON object")
        for required in ("worker_id", "endpoint"):
            if required not in data:
                raise InvalidArgument(f"a worker entry lacks {required!r}")
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        if "started_at" in known and isinstance(known["started_at"], int):
            known["started_at"] = float(known["started_at"])
        return cls(**known)

    @classmethod
    def from_json(cls, data: bytes | str) -> WorkerInfo:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument(f"a worker entry is not valid JSON ({exc})") from None
        return cls.from_dict(obj)

    def with_usage(self, used_bytes: int, capacity_bytes: int | None = None) -> WorkerInfo:
        """A copy with new usage figures, for ``update()``."""
        capacity = self.capacity_bytes if capacity_bytes is None else capacity_bytes
        return replace(self, used_bytes=used_bytes, capacity_bytes=capacity)


def check_endpoint(endpoint: str) -> str:
    """An endpoint is an absolute http(s) URL of a worker's HTTP API."""
    if not isinstance(endpoint, str):
        raise InvalidArgument(f"invalid worker endpoint {endpoint!r}")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidArgument(f"a worker endpoint is an http(s) URL, got {endpoint!r}")
    return endpoint


def normalize_endpoint(endpoint: str) -> str:
    """Scheme and host lowercased, no trailing slash: the form static ids are derived from."""
    check_endpoint(endpoint)
    parts = urlsplit(endpoint.strip())
    path = parts.path.rstrip("/")
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{path}"


def static_worker_id(endpoint: str) -> str:
    """The worker id a static list gives an endpoint: 32 hex digits (a valid ring identity).

    Every process computes the same id from the same config, which is what keeps the ring of a
    static cluster consistent across clients and workers.
    """
    digest = hashlib.md5(
        b"depot-static:" + normalize_endpoint(endpoint).encode(), usedforsecurity=False
    )
    return digest.hexdigest()


def check_kv_key(key: str) -> str:
    """KV keys are relative to the cluster (``jobs/<id>``); ``workers/`` belongs to membership.

    The KV API neither reads nor writes under ``workers/``, so that every backend holds the
    same KV namespace (the embedded one keeps workers apart from its KV dict).
    """
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f"invalid key {key!r}")
    if key.startswith("/") or "\x00" in key:
        raise InvalidArgument(f"a key is relative and has no NUL: {key!r}")
    if key.startswith(WORKERS_PREFIX):
        raise InvalidArgument(f"keys under {WORKERS_PREFIX!r} belong to membership: {key!r}")
    return key


def check_kv_value(value: bytes) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"a value is bytes, got {type(value).__name__}")
    data = bytes(value)
    if len(data) > MAX_VALUE_BYTES:
        raise RequestTooLarge(f"a value is at most {MAX_VALUE_BYTES} bytes, got {len(data)}")
    return data


def check_cluster_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"invalid cluster name {name!r} (letters, digits and ._- , at most 64 characters)"
        )
    return name


# --- interfaces ------------------------------------------------------------------------------

ViewCallback = Callable[[list[WorkerInfo]], None]
"""Receives the whole view (sorted by worker id) after every change."""


class Membership(ABC):
    """The set of workers of a cluster, kept in memory and pushed to subscribers.

    Lifecycle: ``await start()`` (or ``async with``), then ``close()``. Implementations keep the
    view in ``self._view`` and call ``_publish`` with each new view; the base class does the
    change detection, the generation counter and the callbacks.
    """

    def __init__(self) -> None:
        self._view: dict[str, WorkerInfo] = {}
        self._generation = 0
        self._subscribers: dict[int, ViewCallback] = {}
        self._next_subscriber = 0

    # lifecycle
    @abstractmethod
    async def start(self) -> None:
        """Connect and load the first view. Never fails because the backend is down."""

    @abstractmethod
    async def close(self) -> None:
        """Stop background work and leave gracefully (this instance's workers leave the view).

        Idempotent.
        """

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # writes
    @abstractmethod
    async def register(self, info: WorkerInfo) -> None:
        """A worker joins (or replaces its own earlier entry with the same ``worker_id``).

        When the backend answers, the entry is visible in this instance's ``workers()`` on
        return. When it does not, the registration is kept and written once it answers again.
        """

    @abstractmethod
    async def update(self, info: WorkerInfo) -> None:
        """Refresh a worker registered through this instance (usage, state).

        Raises ``NotFound`` for a worker this instance did not register.
        """

    @abstractmethod
    async def deregister(self, worker_id: str) -> None:
        """A worker leaves the view. Unknown ids are a no-op (leaving is idempotent)."""

    # view
    async def workers(self) -> list[WorkerInfo]:
        """The current view, sorted by worker id; the last known one if the backend is down."""
        return self._snapshot()

    @property
    def generation(self) -> int:
        """Grows by one at every change of the view (per instance, starting at 0)."""
        return self._generation

    @property
    def healthy(self) -> bool:
        """Whether the backend answered the last time it was asked."""
        return True

    def subscribe(self, callback: ViewCallback, *, replay: bool = True) -> Callable[[], None]:
        """Call ``callback(view)`` on every change; returns the function that unsubscribes.

        With ``replay`` (the default) the callback is first called at once with the current view,
        so a subscriber never misses a change between reading the view and subscribing.
        Callbacks run on the event loop and must not block; an exception in one is logged and
        does not stop the others.
        """
        token = self._next_subscriber
        self._next_subscriber += 1
        self._subscribers[token] = callback
        if replay:
            self._call(callback, self._snapshot())

        def unsubscribe() -> None:
            self._subscribers.pop(token, None)

        return unsubscribe

    # helpers for implementations
    def _snapshot(self) -> list[WorkerInfo]:
        return [self._view[k] for k in sorted(self._view)]

    def _publish(self, view: Mapping[str, WorkerInfo]) -> bool:
        """Install a new view; bump the generation and notify only if it differs."""
        new = dict(view)
        if new == self._view:
            return False
        self._view = new
        self._generation += 1
        snapshot = self._snapshot()
        for callback in list(self._subscribers.values()):
            self._call(callback, list(snapshot))
        return True

    @staticmethod
    def _call(callback: ViewCallback, snapshot: list[WorkerInfo]) -> None:
        try:
            callback(snapshot)
        except Exception:
            log.exception("membership subscriber %r failed", callback)


class ClusterStore(ABC):
    """A small shared KV store next to membership, for job state (``jobs/<job_id>``).

    Keys are relative to the cluster (etcd: ``/depot/<cluster>/<key>``); values are bytes of at
    most ``MAX_VALUE_BYTES``. ``ephemeral`` entries are bound to this instance's session: they
    vanish when it closes or (etcd) when its lease expires, and are not written again after a
    lost session, so they can serve as ownership claims. Unlike ``workers()``, these calls go to
    the backend and raise ``Unavailable`` when it cannot be reached.
    """

    @abstractmethod
    async def kv_get(self, key: str) -> bytes | None:
        """The value, or None when the key does not exist."""

    @abstractmethod
    async def kv_put(self, key: str, value: bytes, *, ephemeral: bool = False) -> None:
        """Create or overwrite."""

    @abstractmethod
    async def kv_create(self, key: str, value: bytes, *, ephemeral: bool = False) -> bool:
        """Create only if absent (atomically); True when this call created it."""

    @abstractmethod
    async def kv_delete(self, key: str) -> bool:
        """True when the key existed."""

    @abstractmethod
    async def kv_list(self, prefix: str = "") -> dict[str, bytes]:
        """Every key starting with ``prefix`` (relative keys, sorted)."""


# --- embedded --------------------------------------------------------------------------------


class EmbeddedRegistry:
    """The state that embedded instances share: workers and KV, in memory.

    One process normally has one (each ``EmbeddedMembership()`` makes its own); several
    instances given the same registry see each other, which is how an in-process test cluster
    of several workers behaves like an etcd cluster.
    """

    def __init__(self) -> None:
        self.workers: dict[str, tuple[WorkerInfo, EmbeddedMembership]] = {}
        self.kv: dict[str, tuple[bytes, EmbeddedMembership | None]] = {}
        self.members: list[EmbeddedMembership] = []

    def view(self) -> dict[str, WorkerInfo]:
        return {wid: info for wid, (info, _) in self.workers.items()}

    def changed(self) -> None:
        view = self.view()
        for member in list(self.members):
            member._publish(view)


class EmbeddedMembership(Membership, ClusterStore):
    """In-process membership and KV: no backend, always healthy.

    Entries registered through an instance are owned by it: ``close()`` removes them, as an etcd
    lease would. Another instance registering the same ``worker_id`` takes the entry over.
    """

    def __init__(self, registry: EmbeddedRegistry | None = None) -> None:
        super().__init__()
        self.registry = registry if registry is not None else EmbeddedRegistry()
        self._started = False
        self._closed = False

    async def start(self) -> None:
        if self._closed:
            raise Unavailable("membership is closed")
        if self._started:
            return
        self._started = True
        self.registry.members.append(self)
        self._publish(self.registry.view())

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._started:
            return
        reg = self.registry
        reg.members.remove(self)
        for key in [k for k, (_, owner) in reg.kv.items() if owner is self]:
            del reg.kv[key]
        mine = [wid for wid, (_, owner) in reg.workers.items() if owner is self]
        for wid in mine:
            del reg.workers[wid]
        if mine:
            reg.changed()

    def _check_open(self) -> None:
        if self._closed or not self._started:
            raise Unavailable("membership is not started or already closed")

    async def register(self, info: WorkerInfo) -> None:
        self._check_open()
        self.registry.workers[info.worker_id] = (info, self)
        self.registry.changed()

    async def update(self, info: WorkerInfo) -> None:
        self._check_open()
        entry = self.registry.workers.get(info.worker_id)
        if entry is None or entry[1] is not self:
            raise NotFound("worker is not registered by this instance", info.worker_id)
        self.registry.workers[info.worker_id] = (info, self)
        self.registry.changed()

    async def deregister(self, worker_id: str) -> None:
        self._check_open()
        if self.registry.workers.pop(worker_id, None) is not None:
            self.registry.changed()

    async def kv_get(self, key: str) -> bytes | None:
        self._check_open()
        entry = self.registry.kv.get(check_kv_key(key))
        return None if entry is None else entry[0]

    async def kv_put(self, key: str, value: bytes, *, ephemeral: bool = False) -> None:
        self._check_open()
        self.registry.kv[check_kv_key(key)] = (
            check_kv_value(value),
            self if ephemeral else None,
        )

    async def kv_create(self, key: str, value: bytes, *, ephemeral: bool = False) -> bool:
        self._check_open()
        check_kv_key(key)
        data = check_kv_value(value)
        if key in self.registry.kv:
            return False
        self.registry.kv[key] = (data, self if ephemeral else None)
        return True

    async def kv_delete(self, key: str) -> bool:
        self._check_open()
        return self.registry.kv.pop(check_kv_key(key), None) is not None

    async def kv_list(self, prefix: str = "") -> dict[str, bytes]:
        self._check_open()
        if prefix:
            check_kv_key(prefix)
        kv = self.registry.kv
        return {k: kv[k][0] for k in sorted(kv) if k.startswith(prefix)}


# --- static ----------------------------------------------------------------------------------


class StaticMembership(Membership):
    """A fixed list of worker URLs from the config; the view is the list, always.

    Each endpoint appears with ``static_worker_id(endpoint)``, state ``live`` and unknown (0)
    capacity. ``register`` of a listed endpoint replaces its entry *in this process only*
    (other processes cannot see it): to keep the ring the same everywhere, a worker in a static
    cluster should register under ``static_worker_id`` of its own URL. ``deregister`` puts the
    configured entry back: a static member does not leave, the config says it is there.
    Endpoints outside the list are refused (``InvalidArgument``): a static cluster cannot grow.
    """

    def __init__(self, endpoints: Sequence[str]) -> None:
        super().__init__()
        if isinstance(endpoints, str):
            raise ConfigError("static membership takes a list of endpoints, not one string")
        self._configured: dict[str, WorkerInfo] = {}
        for endpoint in endpoints:
            try:
                url = normalize_endpoint(endpoint)
            except InvalidArgument as exc:
                raise ConfigError(f"static worker list: {exc.message}") from None
            if url in self._configured:
                raise ConfigError(f"static worker list names {url!r} twice")
            self._configured[url] = WorkerInfo(
                worker_id=static_worker_id(url), endpoint=url, started_at=0.0
            )
        self._entries: dict[str, WorkerInfo] = dict(self._configured)  # by normalized endpoint
        self._closed = False

    @property
    def endpoints(self) -> list[str]:
        return list(self._configured)

    def _refresh(self) -> None:
        self._publish({info.worker_id: info for info in self._entries.values()})

    async def start(self) -> None:
        self._refresh()

    async def close(self) -> None:
        self._closed = True

    def _endpoint_of(self, info: WorkerInfo) -> str:
        url = normalize_endpoint(info.endpoint)
        if url not in self._configured:
            raise InvalidArgument(
                f"endpoint {info.endpoint!r} is not in the static worker list", info.worker_id
            )
        return url

    async def register(self, info: WorkerInfo) -> None:
        url = self._endpoint_of(info)
        for other, entry in self._entries.items():
            if other != url and entry.worker_id == info.worker_id:
                raise InvalidArgument(f"worker id is already used by {other!r}", info.worker_id)
        self._entries[url] = info
        self._refresh()

    async def update(self, info: WorkerInfo) -> None:
        url = self._endpoint_of(info)
        if self._entries[url].worker_id != info.worker_id:
            raise NotFound("worker is not registered at this endpoint", info.worker_id)
        self._entries[url] = info
        self._refresh()

    async def deregister(self, worker_id: str) -> None:
        for url, entry in self._entries.items():
            if entry.worker_id == worker_id:
                self._entries[url] = self._configured[url]
                self._refresh()
                return
