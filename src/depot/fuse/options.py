"""``-o opt,...`` of ``depot mount``: depot settings (the ``fuse`` config section) and kernel options.

``-o attr_timeout=1,uid=1000,allow_other`` sets ``fuse.attr_timeout``, ``fuse.uid`` and
``fuse.allow_other``; options of the kernel and libfuse (``ro``/``rw``, ``allow_root``,
``auto_unmount``, ``fsname=``) pass through. Anything else is an error that lists what exists.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from depot.core.config import FuseConfig
from depot.core.errors import ConfigError

# -o names that set a field of the ``fuse`` config section (a bare flag sets a boolean to true).
SETTINGS = {name for name in FuseConfig.model_fields}
# no_<flag> turns a boolean setting off.
NEGATIONS = {"no_kernel_cache": "kernel_cache", "no_prefetch": "prefetch"}
# Passed to libfuse as they are.
KERNEL_FLAGS = {"ro", "rw", "allow_root", "auto_unmount", "debug"}
KERNEL_VALUES = {"fsname"}


def parse_options(values: Iterable[str]) -> tuple[dict[str, Any], set[str]]:
    """``-o`` values (each comma-separated) as (``fuse`` config overrides, kernel options)."""
    settings: dict[str, Any] = {}
    kernel: set[str] = set()
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, arg = item.partition("=")
            name = name.strip().replace("-", "_")
            if name in NEGATIONS and not sep:
                settings[NEGATIONS[name]] = False
            elif name in SETTINGS:
                if sep:
                    settings[name] = arg
                elif isinstance(FuseConfig.model_fields[name].default, bool):
                    settings[name] = True
                else:
                    raise ConfigError(f"mount option {name} needs a value ({name}=...)")
            elif name in KERNEL_FLAGS and not sep:
                kernel.add(name)
            elif name in KERNEL_VALUES and sep:
                kernel.add(f"{name}={arg}")
            else:
                known = sorted(SETTINGS | set(NEGATIONS) | KERNEL_FLAGS | KERNEL_VALUES)
                raise ConfigError(f"unknown mount option {item!r} (known: {', '.join(known)})")
    if {"ro", "rw"} <= kernel:
        raise ConfigError("mount options ro and rw contradict each other")
    return settings, kernel


def kernel_options(settings: FuseConfig, extra: set[str]) -> set[str]:
    """The option set for libfuse: read-only unless ``rw`` (or ``fuse.read_only: false``),
    permission checks by the kernel."""
    options = {"subtype=depot", "default_permissions"}
    if not any(o.startswith("fsname=") for o in extra):
        options.add("fsname=depot")
    writable = "rw" in extra or not settings.read_only
    if "ro" in extra or not writable:
        options.add("ro")
    if settings.allow_other:
        options.add("allow_other")
    options.update(o for o in extra if o != "rw")
    return options


__all__ = ["kernel_options", "parse_options"]
