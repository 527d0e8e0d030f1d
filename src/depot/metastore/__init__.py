"""The worker's metadata cache (RocksDB): object status, listings and version tracking."""

from depot.metastore.records import CachedListing, CachedStatus
from depot.metastore.store import MetadataStore, MetadataStoreStats

__all__ = ["CachedListing", "CachedStatus", "MetadataStore", "MetadataStoreStats"]
