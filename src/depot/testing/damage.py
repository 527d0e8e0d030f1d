"""Damage done to files on purpose, for tests of what must never be served."""

from __future__ import annotations

from pathlib import Path


def flip_byte(path: Path, position: int, mask: int = 0x01) -> None:
    """XOR the byte at ``position`` of ``path`` with ``mask``, in place."""
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)
        if not byte:
            raise ValueError(f"{path} has no byte at {position}")
        f.seek(position)
        f.write(bytes([byte[0] ^ mask]))
