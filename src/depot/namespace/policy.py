"""How long cached metadata of a mount may be used before the under store is asked again.

``immutable`` objects never change once written (model snapshots, dataset shards): metadata is
fetched once. ``max-age=DUR`` trusts it for DUR, which bounds how long an overwrite in the UFS can
go unnoticed. ``always`` revalidates on every open, for data that changes under depot's feet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from depot.core.errors import ConfigError
from depot.core.types import parse_duration


class PolicyKind(StrEnum):
    IMMUTABLE = "immutable"
    MAX_AGE = "max-age"
    ALWAYS = "always"


_UNITS = (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 0.001))


def format_duration(seconds: float) -> str:
    """The shortest spelling of ``seconds`` that ``parse_duration`` reads back exactly."""
    for suffix, unit in _UNITS:
        count = seconds / unit
        if 1 <= count < 1e15 and count == int(count):
            text = f"{int(count)}{suffix}"
            if parse_duration(text) == seconds:
                return text
    if seconds == 0:
        return "0s"
    return f"{seconds!r}s"


@dataclass(frozen=True, slots=True)
class MetadataPolicy:
    """A revalidation rule; build it with ``parse`` or one of the constructors below."""

    kind: PolicyKind
    max_age: float = 0.0
    # How the duration was written in the config, so ``str`` shows ``60s`` and not ``1m``.
    spelling: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind is PolicyKind.MAX_AGE:
            if not math.isfinite(self.max_age) or self.max_age < 0:
                raise ConfigError(
                    f"max-age must be a finite, non-negative duration, not {self.max_age!r} "
                    "(use 'immutable' for metadata that never expires)"
                )
        elif self.max_age != 0.0:
            raise ConfigError(f"policy {self.kind.value!r} takes no max-age")

    @classmethod
    def immutable(cls) -> MetadataPolicy:
        return cls(PolicyKind.IMMUTABLE)

    @classmethod
    def always(cls) -> MetadataPolicy:
        return cls(PolicyKind.ALWAYS)

    @classmethod
    def of_max_age(cls, seconds: float) -> MetadataPolicy:
        return cls(PolicyKind.MAX_AGE, float(seconds))

    @classmethod
    def parse(cls, text: str) -> MetadataPolicy:
        """Read ``immutable``, ``always`` or ``max-age=DUR`` (``60s``, ``5m``, ``250ms``, ``1h``)."""
        if not isinstance(text, str):
            raise ConfigError(f"metadata policy must be a string, not {type(text).__name__}")
        spec = text.strip().lower()
        if spec == PolicyKind.IMMUTABLE.value:
            return cls.immutable()
        if spec == PolicyKind.ALWAYS.value:
            return cls.always()
        name, sep, value = spec.partition("=")
        if sep and name.strip() == PolicyKind.MAX_AGE.value:
            value = value.strip()
            try:
                seconds = parse_duration(value) if value else math.nan
            except ValueError:
                seconds = math.nan
            if not math.isfinite(seconds):
                raise ConfigError(
                    f"invalid metadata policy {text!r}: {value!r} is not a finite, non-negative duration "
                    "(use e.g. max-age=60s, max-age=5m)"
                )
            return cls(PolicyKind.MAX_AGE, seconds, spelling=value)
        raise ConfigError(
            f"invalid metadata policy {text!r}: expected 'immutable', 'always' or "
            "'max-age=DURATION' (e.g. max-age=60s)"
        )

    def is_fresh(self, fetched_at: float, now: float) -> bool:
        """Whether metadata fetched at ``fetched_at`` may still be used at ``now`` (seconds).

        A clock that went backwards (``now < fetched_at``) counts as stale for ``max-age``:
        revalidating costs one round trip, serving stale data costs correctness.
        """
        if self.kind is PolicyKind.IMMUTABLE:
            return True
        if self.kind is PolicyKind.ALWAYS:
            return False
        age = now - fetched_at
        return 0.0 <= age < self.max_age

    def __str__(self) -> str:
        if self.kind is PolicyKind.MAX_AGE:
            return f"max-age={self.spelling or format_duration(self.max_age)}"
        return self.kind.value
