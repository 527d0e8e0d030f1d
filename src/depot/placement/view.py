"""The cluster as a reader sees it: live workers on a ring, placement settings and the mounts.

Workers serve this view as a JSON document (``GET /api/v1/cluster``) so that a client can
bootstrap from any worker's URL, without etcd access, and route every read to the worker that owns
its bytes. Clients, workers and jobs all route through :meth:`ClusterView.route`, so placement
agrees everywhere the same view is held.

A file is placed by its under-store URI (what Alluxio hashes) and, past its first segment, by
``(file, segment)``; see :func:`depot.placement.ring.placement_key`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any

from depot.core.config import MountConfig, is_secret_option
from depot.core.errors import DepotError, InvalidArgument
from depot.namespace.mounts import MountTable
from depot.placement.membership import WorkerInfo
from depot.placement.ring import HashRing, PlacementPolicy, WorkerIdentity


def public_options(options: Mapping[str, str]) -> dict[str, str]:
    """Mount options without credentials, safe to serve to any client."""
    return {k: v for k, v in options.items() if not is_secret_option(k)}


@dataclass(frozen=True, slots=True)
class ClusterView:
    """An immutable snapshot: build a new one when membership changes."""

    workers: tuple[WorkerInfo, ...]
    policy: PlacementPolicy
    mounts: tuple[MountConfig, ...] = ()
    page_size: int = 4 * 1024 * 1024
    cluster: str = "default"
    membership: str = "embedded"
    generation: int = 0
    healthy: bool = True
    self_id: str | None = None
    # A view whose ring may be reused when the placed workers are the same (usage updates change
    # the view every few seconds; a ring of 100 workers costs ~0.1 s to build).
    reuse: InitVar[ClusterView | None] = None
    ring: HashRing[WorkerInfo] = field(init=False, repr=False, compare=False)
    table: MountTable = field(init=False, repr=False, compare=False)
    placed: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self, reuse: ClusterView | None) -> None:
        live: dict[WorkerIdentity, WorkerInfo] = {}
        for info in self.workers:
            if not info.is_live:
                continue
            try:
                live[WorkerIdentity.parse(info.worker_id)] = info
            except (ValueError, DepotError):
                continue  # not a ring identity: cannot be placed, still listed
        placed = tuple(sorted((str(i), w.endpoint) for i, w in live.items()))
        object.__setattr__(self, "placed", placed)
        if reuse is not None and reuse.placed == placed and reuse.policy == self.policy:
            object.__setattr__(self, "ring", reuse.ring)
        else:
            object.__setattr__(self, "ring", self.policy.ring(live))
        if reuse is not None and reuse.mounts == self.mounts:
            object.__setattr__(self, "table", reuse.table)
        else:
            object.__setattr__(self, "table", MountTable.from_config(self.mounts))

    # routing -------------------------------------------------------------------------------------
    def file_key(self, path: str) -> str | None:
        """The placement key of a namespace path: its under-store URI (None outside any mount)."""
        try:
            resolved = self.table.resolve(path)
        except DepotError:
            return None
        return resolved.mount.object_uri(resolved.key)

    def route(self, file_key: str, offset: int = 0, *, spread: int = 0) -> list[WorkerInfo]:
        """Workers for the bytes at ``offset`` of a file, in the order to try them.

        The first ``replication`` workers of the key share its reads: ``spread`` (a number that
        differs between readers) picks which of them comes first. The next worker of the ring
        follows, for failover.
        """
        policy = self.policy
        wanted = policy.replication + 1
        workers = self.ring.lookup(policy.key_for(file_key, offset), wanted)
        replicas = min(policy.replication, len(workers))
        if replicas > 1 and spread:
            turn = spread % replicas
            workers = workers[turn:replicas] + workers[:turn] + workers[replicas:]
        return workers

    def segment_end(self, offset: int) -> int | None:
        """Where the placement segment holding ``offset`` ends (None: whole-file placement)."""
        size = self.policy.segment_size
        if size <= 0:
            return None
        return (offset // size + 1) * size

    def worker(self, worker_id: str) -> WorkerInfo | None:
        for info in self.workers:
            if info.worker_id == worker_id:
                return info
        return None

    # documents --------------------------------------------------------------------------------
    def to_document(self) -> dict[str, Any]:
        policy = self.policy
        return {
            "cluster": self.cluster,
            "membership": self.membership,
            "generation": self.generation,
            "healthy": self.healthy,
            "self": self.self_id,
            "page_size": self.page_size,
            "placement": {
                "hash": "murmur3_32 (Alluxio DEFAULT ring)",
                "virtual_nodes": policy.virtual_nodes,
                "segment_size": policy.segment_size,
                "replication": policy.replication,
            },
            "workers": [w.to_dict() for w in self.workers],
            "mounts": [_mount_document(m) for m in self.mounts],
        }

    @classmethod
    def from_document(cls, data: Any, reuse: ClusterView | None = None) -> ClusterView:
        """Parse a worker's ``/api/v1/cluster`` document; malformed input is InvalidArgument."""
        try:
            placement = data["placement"]
            policy = PlacementPolicy(
                segment_size=int(placement["segment_size"]),
                replication=int(placement["replication"]),
                virtual_nodes=int(placement["virtual_nodes"]),
            )
            workers = tuple(WorkerInfo.from_dict(w) for w in data["workers"])
            mounts = tuple(MountConfig.model_validate(m) for m in data.get("mounts", []))
            return cls(
                workers=workers,
                policy=policy,
                mounts=mounts,
                page_size=int(data["page_size"]),
                cluster=str(data.get("cluster", "default")),
                membership=str(data.get("membership", "")),
                generation=int(data.get("generation", 0)),
                healthy=bool(data.get("healthy", True)),
                self_id=data.get("self") if isinstance(data.get("self"), str) else None,
                reuse=reuse,
            )
        except DepotError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"malformed cluster document: {exc}") from None


def _mount_document(mount: MountConfig) -> dict[str, Any]:
    """A mount as clients see it (no credentials)."""
    doc: dict[str, Any] = {
        "path": mount.path,
        "ufs": mount.ufs,
        "read_only": mount.read_only,
        "metadata": mount.metadata,
        "options": public_options(mount.options),
    }
    if mount.write_mode != "through":
        # Clients stage write-back writes to a worker on their node themselves (local writes).
        doc["write_mode"] = mount.write_mode
    if mount.prefetch_on_open:
        # Only when set: clients from before the setting refuse unknown mount fields.
        doc["prefetch_on_open"] = list(mount.prefetch_on_open)
    return doc


def spread_seed(text: str) -> int:
    """A stable per-reader number for :meth:`ClusterView.route`'s ``spread``."""
    return zlib.crc32(text.encode()) | 1


def merge_mounts(
    served: Sequence[MountConfig], local: Iterable[MountConfig]
) -> tuple[MountConfig, ...]:
    """The cluster's mounts, with this process's own options (credentials) where paths match.

    Workers never serve credentials; a client that may read the under store directly keeps its
    own in its config, and they are put back on the mounts the cluster names.
    """
    own = {m.path.rstrip("/") or "/": m for m in local}
    out: list[MountConfig] = []
    for mount in served:
        mine = own.get(mount.path.rstrip("/") or "/")
        if mine is not None and mine.ufs == mount.ufs:
            out.append(mount.model_copy(update={"options": {**mount.options, **mine.options}}))
        else:
            out.append(mount)
    return tuple(out)
