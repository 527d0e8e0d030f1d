"""Metadata revalidation policies: parsing, printing and freshness against a fake clock."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from depot.core.errors import ConfigError
from depot.namespace.policy import MetadataPolicy, PolicyKind, format_duration


class FakeClock:
    """Time that moves only when the test says so."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.mark.parametrize(
    ("text", "kind", "max_age"),
    [
        ("immutable", PolicyKind.IMMUTABLE, 0.0),
        ("IMMUTABLE", PolicyKind.IMMUTABLE, 0.0),
        ("  always ", PolicyKind.ALWAYS, 0.0),
        ("max-age=60s", PolicyKind.MAX_AGE, 60.0),
        ("max-age=5m", PolicyKind.MAX_AGE, 300.0),
        ("max-age=2h", PolicyKind.MAX_AGE, 7200.0),
        ("max-age=1d", PolicyKind.MAX_AGE, 86400.0),
        ("max-age=250ms", PolicyKind.MAX_AGE, 0.25),
        ("max-age=90", PolicyKind.MAX_AGE, 90.0),
        ("max-age=1.5s", PolicyKind.MAX_AGE, 1.5),
        ("max-age=0s", PolicyKind.MAX_AGE, 0.0),
        ("Max-Age = 10S", PolicyKind.MAX_AGE, 10.0),
    ],
)
def test_parse(text: str, kind: PolicyKind, max_age: float) -> None:
    policy = MetadataPolicy.parse(text)
    assert policy.kind is kind
    assert policy.max_age == max_age


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("immutable", "immutable"),
        ("ALWAYS", "always"),
        ("max-age=60s", "max-age=60s"),
        ("max-age=5m", "max-age=5m"),
        ("max-age = 250ms", "max-age=250ms"),
        ("max-age=0.3", "max-age=0.3"),
    ],
)
def test_str_keeps_the_configured_spelling_and_round_trips(text: str, expected: str) -> None:
    policy = MetadataPolicy.parse(text)
    assert str(policy) == expected
    assert MetadataPolicy.parse(str(policy)) == policy


def test_equality_is_by_meaning_not_spelling() -> None:
    assert MetadataPolicy.parse("max-age=60s") == MetadataPolicy.parse("max-age=1m")
    assert hash(MetadataPolicy.parse("max-age=60s")) == hash(MetadataPolicy.of_max_age(60))
    assert MetadataPolicy.parse("max-age=60s") != MetadataPolicy.parse("max-age=61s")
    assert MetadataPolicy.immutable() != MetadataPolicy.always()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(60.0, "1m"), (300.0, "5m"), (90.0, "90s"), (0.25, "250ms"), (0.0, "0s"), (86400.0, "1d")],
)
def test_constructed_policies_print_compactly(seconds: float, text: str) -> None:
    assert str(MetadataPolicy.of_max_age(seconds)) == f"max-age={text}"
    assert format_duration(seconds) == text


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False))
def test_any_duration_round_trips_exactly(seconds: float) -> None:
    policy = MetadataPolicy.of_max_age(seconds)
    assert MetadataPolicy.parse(str(policy)).max_age == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected 'immutable', 'always' or 'max-age=DURATION'"),
        ("forever", "expected 'immutable'"),
        ("max-age", "expected 'immutable'"),
        ("maxage=5s", "expected 'immutable'"),
        ("immutable=5s", "expected 'immutable'"),
        ("ttl=5s", "expected 'immutable'"),
        ("max-age=", "not a finite, non-negative duration"),
        ("max-age=-1s", "not a finite, non-negative duration"),
        ("max-age=5x", "not a finite, non-negative duration"),
        ("max-age=five", "not a finite, non-negative duration"),
        ("max-age=nan", "not a finite, non-negative duration"),
        ("max-age=inf", "not a finite, non-negative duration"),
        ("max-age=5s=6s", "not a finite, non-negative duration"),
    ],
)
def test_bad_strings_are_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        MetadataPolicy.parse(text)
    assert message in str(info.value)
    assert repr(text) in str(info.value)


def test_non_string_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="must be a string"):
        MetadataPolicy.parse(60)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_constructor_validates_max_age(bad: float) -> None:
    with pytest.raises(ConfigError, match="max-age"):
        MetadataPolicy.of_max_age(bad)


def test_only_max_age_takes_a_duration() -> None:
    with pytest.raises(ConfigError, match="takes no max-age"):
        MetadataPolicy(PolicyKind.IMMUTABLE, 5.0)


def test_immutable_is_always_fresh() -> None:
    clock = FakeClock()
    policy = MetadataPolicy.parse("immutable")
    fetched = clock.now
    assert policy.is_fresh(fetched, clock.now)
    assert policy.is_fresh(fetched, clock.advance(10 * 365 * 86400))
    assert policy.is_fresh(fetched, fetched - 1000)


def test_always_is_never_fresh() -> None:
    clock = FakeClock()
    policy = MetadataPolicy.parse("always")
    assert not policy.is_fresh(clock.now, clock.now)
    assert not policy.is_fresh(clock.now, clock.advance(0.001))


def test_max_age_expires_exactly_at_the_limit() -> None:
    clock = FakeClock()
    policy = MetadataPolicy.parse("max-age=60s")
    fetched = clock.now
    assert policy.is_fresh(fetched, clock.now)
    assert policy.is_fresh(fetched, clock.advance(59.999))
    assert not policy.is_fresh(fetched, clock.advance(0.001))  # age == 60 s
    assert not policy.is_fresh(fetched, clock.advance(3600))


def test_max_age_in_minutes_and_milliseconds() -> None:
    clock = FakeClock()
    fetched = clock.now
    five_minutes = MetadataPolicy.parse("max-age=5m")
    assert five_minutes.is_fresh(fetched, clock.advance(299))
    assert not five_minutes.is_fresh(fetched, clock.advance(1))
    clock = FakeClock()
    fetched = clock.now
    quarter = MetadataPolicy.parse("max-age=250ms")
    assert quarter.is_fresh(fetched, clock.advance(0.2))
    assert not quarter.is_fresh(fetched, clock.advance(0.1))


def test_max_age_zero_is_never_fresh() -> None:
    clock = FakeClock()
    assert not MetadataPolicy.parse("max-age=0s").is_fresh(clock.now, clock.now)


def test_clock_going_backwards_means_stale() -> None:
    clock = FakeClock()
    policy = MetadataPolicy.parse("max-age=1h")
    fetched = clock.now
    assert not policy.is_fresh(fetched, clock.advance(-5))
