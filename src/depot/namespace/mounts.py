"""The mount table: one logical tree over many under stores.

``/models -> s3://bucket/models``, ``/data -> gs://b/data``, ``/ -> file:///srv/data``. Mounts may
nest; the longest mount path that is a prefix of a depot path *on segment boundaries* wins, so
``/models2`` never falls into ``/models``. Resolution is a few dict lookups (one per segment of the
path at most), because it runs on every read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from depot.core.config import MountConfig
from depot.core.errors import ConfigError, InvalidPath, NotFound
from depot.namespace.paths import normalize_path
from depot.namespace.policy import MetadataPolicy

_URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.DOTALL)
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")
DEFAULT_POLICY = MetadataPolicy.parse("max-age=60s")


def normalize_ufs_uri(uri: str) -> str:
    """``SCHEME://rest`` with the scheme lowercased and no trailing ``/``.

    ``file:///`` becomes ``file://`` so that ``object_uri`` still yields ``file:///a``. The rest
    is kept byte for byte: object stores treat ``a//b`` and ``A`` as distinct keys.
    """
    if not isinstance(uri, str):
        raise ConfigError(f"UFS URI must be a string, not {type(uri).__name__}")
    match = _URI_RE.match(uri.strip())
    if match is None:
        raise ConfigError(
            f"UFS URI {uri!r} has no scheme (write e.g. s3://bucket/prefix or file:///srv/data)"
        )
    scheme, rest = match.groups()
    if _CONTROL_RE.search(rest):
        raise ConfigError(f"UFS URI {uri!r} contains a control character")
    return f"{scheme.lower()}://{rest.rstrip('/')}"


@dataclass(frozen=True, slots=True)
class Mount:
    """One entry of the table. ``options`` (endpoint, credentials) never appear in ``repr``."""

    path: str
    ufs_uri: str
    read_only: bool = False
    policy: MetadataPolicy = DEFAULT_POLICY
    options: Mapping[str, str] = field(default_factory=dict, repr=False, hash=False)
    # "through" or "cache-through" (docs/writes.md).
    write_mode: str = "through"

    def __post_init__(self) -> None:
        try:
            path = normalize_path(self.path)
        except InvalidPath as exc:
            raise ConfigError(f"invalid mount path: {exc}") from None
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "ufs_uri", normalize_ufs_uri(self.ufs_uri))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def scheme(self) -> str:
        return self.ufs_uri.partition("://")[0]

    def ufs_key(self, rel: str) -> str:
        """The UFS key, relative to the mount's URI, of ``rel`` (a path relative to the mount).

        ``rel`` goes through ``normalize_path``, so ``..`` and its disguises are refused here too.
        """
        return normalize_path(rel)[1:]

    def object_uri(self, key: str) -> str:
        """The full URI of ``key``: the stable identity of an object in the caches."""
        return f"{self.ufs_uri}/{key}" if key else self.ufs_uri

    def __str__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"{self.path} -> {self.ufs_uri} ({mode}, {self.policy})"


@dataclass(frozen=True, slots=True)
class Resolved:
    """Where a depot path lives: its mount and its key below the mount's URI."""

    mount: Mount
    path: str
    key: str

    @property
    def uri(self) -> str:
        return self.mount.object_uri(self.key)

    @property
    def is_mount_root(self) -> bool:
        return self.key == ""


class MountTable:
    """Immutable set of mounts with longest-prefix resolution."""

    def __init__(self, mounts: Iterable[Mount]) -> None:
        by_path: dict[str, Mount] = {}
        for mount in mounts:
            if mount.path in by_path:
                raise ConfigError(f"mount path {mount.path!r} is defined twice")
            by_path[mount.path] = mount
        self._by_path = by_path
        self._mounts = tuple(sorted(by_path.values(), key=lambda m: m.path))
        # dir -> names of the next segment of every mount point below it, for listings.
        children: dict[str, set[str]] = {}
        for path in by_path:
            if path == "/":
                continue
            parts = path[1:].split("/")
            for depth, name in enumerate(parts):
                parent = "/" + "/".join(parts[:depth])
                children.setdefault(parent, set()).add(name)
        self._children = {d: sorted(names) for d, names in children.items()}

    @classmethod
    def from_config(cls, configs: Iterable[MountConfig]) -> MountTable:
        """Build the table from the ``mounts`` section; errors name the mount at fault."""
        mounts = []
        for config in configs:
            try:
                mounts.append(
                    Mount(
                        path=config.path,
                        ufs_uri=config.ufs,
                        read_only=config.read_only,
                        policy=MetadataPolicy.parse(config.metadata),
                        options=config.options,
                        write_mode=config.write_mode,
                    )
                )
            except ConfigError as exc:
                raise ConfigError(f"mount {config.path!r}: {exc}") from None
        return cls(mounts)

    @property
    def mounts(self) -> tuple[Mount, ...]:
        """All mounts, sorted by path."""
        return self._mounts

    def __len__(self) -> int:
        return len(self._mounts)

    def __iter__(self) -> Iterator[Mount]:
        return iter(self._mounts)

    def __repr__(self) -> str:
        return f"MountTable({', '.join(str(m) for m in self._mounts)})"

    def mount_at(self, path: str) -> Mount | None:
        """The mount whose mount point is exactly ``path``, if any."""
        return self._by_path.get(normalize_path(path))

    def resolve(self, path: str) -> Resolved:
        """The mount covering ``path`` (longest prefix on segments) and the key below it.

        Raises ``InvalidPath`` for an unsafe path and ``NotFound`` when no mount covers it.
        """
        canonical = normalize_path(path)
        probe = canonical
        by_path = self._by_path
        while True:
            mount = by_path.get(probe)
            if mount is not None:
                key = canonical[1:] if probe == "/" else canonical[len(probe) + 1 :]
                return Resolved(mount, canonical, key)
            if probe == "/":
                raise NotFound("no mount covers this path", canonical)
            probe = probe[: probe.rfind("/")] or "/"

    def child_mounts(self, dir_path: str) -> list[str]:
        """Names under ``dir_path`` that lead to a mount point, so listings can show them.

        For mounts ``/models/llama`` and ``/data``, ``child_mounts("/")`` is ``["data", "models"]``
        even when the root mount's store has no such prefix (or there is no root mount).
        """
        return list(self._children.get(normalize_path(dir_path), ()))
