"""Client side of depot: the worker transport, ``CacheClient`` and the ``depot://`` filesystem."""

from depot.client.client import CacheClient, resolve_endpoint, version_of
from depot.client.fs import DepotFile, DepotFileSystem
from depot.core.transport import WorkerTimeout, WorkerUnreachable

__all__ = [
    "CacheClient",
    "DepotFile",
    "DepotFileSystem",
    "WorkerTimeout",
    "WorkerUnreachable",
    "resolve_endpoint",
    "version_of",
]
