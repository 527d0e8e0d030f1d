"""Under stores (UFS): the object stores and file systems behind the cache.

``open_under_store(uri, options, ufs_config)`` is the entry point; the backends, the retry and
fault-injection wrappers and the error mapping live in the submodules. Names are imported on
first use, so ``depot.ufs.base`` can be imported without loading obstore or fsspec.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from depot.ufs.base import Buffer, ListPage, ObjectInfo, UnderStore
    from depot.ufs.faults import FaultInjectingUnderStore
    from depot.ufs.memory import MemoryUnderStore
    from depot.ufs.registry import UfsUri, open_backend, open_under_store, parse_ufs_uri
    from depot.ufs.retry import RetryingUnderStore

_EXPORTS = {
    "Buffer": "depot.ufs.base",
    "ListPage": "depot.ufs.base",
    "ObjectInfo": "depot.ufs.base",
    "UnderStore": "depot.ufs.base",
    "FaultInjectingUnderStore": "depot.ufs.faults",
    "MemoryUnderStore": "depot.ufs.memory",
    "UfsUri": "depot.ufs.registry",
    "open_backend": "depot.ufs.registry",
    "open_under_store": "depot.ufs.registry",
    "parse_ufs_uri": "depot.ufs.registry",
    "RetryingUnderStore": "depot.ufs.retry",
}

__all__ = [
    "Buffer",
    "FaultInjectingUnderStore",
    "ListPage",
    "MemoryUnderStore",
    "ObjectInfo",
    "RetryingUnderStore",
    "UfsUri",
    "UnderStore",
    "open_backend",
    "open_under_store",
    "parse_ufs_uri",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'depot.ufs' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
