"""The performance suite's own arithmetic: how a figure is paired with its machine limit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import suite


def test_paired_rounds_takes_the_round_of_the_median_ratio() -> None:
    references = iter([10.0, 4.0, 8.0, 5.0, 6.0])
    measured = iter([5.0, 3.0, 4.4, 2.0, 3.6])  # ratios 0.5, 0.75, 0.55, 0.4, 0.6
    got, ref, details = suite.paired_rounds(lambda: next(references), lambda: next(measured))
    assert (got, ref) == (4.4, 8.0)  # not the best read (5.0), nor the best limit (10.0)
    assert [round(r["ratio"], 2) for r in details["rounds"]] == [0.5, 0.75, 0.55, 0.4, 0.6]
    assert details["best_measured"] == 5.0
    assert details["best_reference"] == 10.0


def test_paired_rounds_alternates_which_runs_first() -> None:
    calls: list[str] = []

    def reference() -> float:
        calls.append("reference")
        return 2.0

    def measure() -> float:
        calls.append("measure")
        return 1.0

    suite.paired_rounds(reference, measure, rounds=3)
    assert calls == ["reference", "measure", "measure", "reference", "reference", "measure"]


def test_a_figure_against_its_round_is_judged_on_that_ratio() -> None:
    results = suite.Results(suite.Settings())
    got, ref, details = suite.paired_rounds(lambda: 20.0, lambda: 9.0, rounds=1)
    row = results.figure("hot_seq_short_circuit", got, ref, **details)
    assert row.ratio == pytest.approx(0.45)
    assert row.met is False
    assert "same round" in row.target
