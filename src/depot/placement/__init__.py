"""Placement: which workers hold a file's bytes (Alluxio-compatible consistent-hash ring)."""

from depot.placement.ring import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_SEGMENT_SIZE,
    DEFAULT_VIRTUAL_NODES,
    HashRing,
    PlacementPolicy,
    WorkerIdentity,
    murmur3_32,
    placement_key,
)

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_SEGMENT_SIZE",
    "DEFAULT_VIRTUAL_NODES",
    "HashRing",
    "PlacementPolicy",
    "WorkerIdentity",
    "murmur3_32",
    "placement_key",
]
