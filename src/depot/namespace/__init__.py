"""The namespace: canonical depot paths and the mount table that maps them to under stores."""

from depot.namespace.mounts import Mount, MountTable, Resolved, normalize_ufs_uri
from depot.namespace.paths import (
    basename,
    is_within,
    join_path,
    normalize_path,
    parent_of,
    split_path,
)
from depot.namespace.policy import MetadataPolicy, PolicyKind

__all__ = [
    "MetadataPolicy",
    "Mount",
    "MountTable",
    "PolicyKind",
    "Resolved",
    "basename",
    "is_within",
    "join_path",
    "normalize_path",
    "normalize_ufs_uri",
    "parent_of",
    "split_path",
]
