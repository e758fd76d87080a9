"""The values-per-statistic fit of a G sweep (``tasks.runner.g_rule``)."""

from __future__ import annotations

import math

import pytest

from tasks.runner.g_rule import VFit, fit_lines, fit_values_per_statistic


def test_fit_finds_each_columns_parabola_peak() -> None:
    values = {(v, b): 50 - (math.log2(v) - peak) ** 2 for b, peak in ((1, 9.8), (8, 11.5))
              for v in (64, 256, 1024, 4096, 16384)}
    fits = fit_values_per_statistic(values)
    assert [f.column for f in fits] == [1, 8]
    assert fits[0].peak == pytest.approx(2 ** 9.8)
    assert fits[1].peak == pytest.approx(2 ** 11.5)
    assert (fits[0].best_measured, fits[1].best_measured) == (1024, 4096)


def test_fit_clips_to_the_swept_range_and_refuses_to_invent_a_peak() -> None:
    rising = {(v, 2): math.log2(v) ** 2 for v in (16, 128, 1024)}  # convex: no interior maximum
    edge = {(v, 4): -(math.log2(v) - 20) ** 2 for v in (16, 128, 1024)}  # peak far beyond 1,024
    few = {(16, 8): 1.0, (128, 8): 2.0, (7, 8): float("nan")}
    fits = {f.column: f for f in fit_values_per_statistic(rising | edge | few)}
    assert fits[2].peak is None and fits[2].best_measured == 1024
    assert fits[4].peak == pytest.approx(1024)
    assert fits[8] == VFit(column=8, best_measured=128, best_score=2.0, peak=None, points=2)
    text = "\n".join(fit_lines(list(fits.values()), "b"))
    assert "b = 2: no interior peak" in text and "b = 8: too few values of V to fit" in text
    assert fit_lines([], "b") == []
