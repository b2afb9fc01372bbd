"""The statistics that decide benchmark targets (benchmarks/stats.py), on synthetic timings (nothing timed)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.common import decide
from benchmarks.stats import bootstrap_interval, mean_ratio, point, verdict

BASE = [10.0, 11.0, 9.0, 12.0, 10.0, 10.5, 9.5, 11.0]  # baseline seconds per round (a loaded machine)
RATIO = mean_ratio("candidate", "baseline")  # the mean of the per-round ratios


def rounds(factors: list[float]) -> dict[str, list[float]]:
    """Candidate = baseline x factor, round by round."""
    return {"candidate": [b * f for b, f in zip(BASE, factors)], "baseline": list(BASE)}


def test_clear_met_clear_missed_and_straddling_undecided():
    met = decide("t", rounds([1.10, 1.11, 1.09, 1.10, 1.12, 1.08, 1.10, 1.11]), RATIO, "<=", 1.25)
    assert met.verdict == "met" and met.low <= met.value <= met.high < 1.25 and met.rounds == 8
    missed = decide("t", rounds([1.50, 1.52, 1.48, 1.51, 1.49, 1.50, 1.53, 1.47]), RATIO, "<=", 1.25)
    assert missed.verdict == "missed" and missed.low > 1.25
    straddling = decide("t", rounds([1.15, 1.35, 1.20, 1.30, 1.18, 1.32, 1.22, 1.28]), RATIO, "<=", 1.25)
    assert straddling.verdict == "undecided" and straddling.low < 1.25 < straddling.high
    # ">=" targets mirror it
    assert decide("t", rounds([2.5] * 8), RATIO, ">=", 2.0).verdict == "met"
    assert decide("t", rounds([1.5] * 8), RATIO, ">=", 2.0).verdict == "missed"


def test_rounds_are_resampled_in_pairs():
    # The baseline's time doubles from round to round, the candidate always takes 1.2 x the baseline's round:
    # resampled with their rounds kept together, every resample's ratio is 1.2.
    base = [1.0, 2.0, 4.0, 8.0, 16.0]
    paired = {"candidate": [1.2 * b for b in base], "baseline": base}
    low, high = bootstrap_interval(paired, RATIO)
    assert low == pytest.approx(1.2, abs=1e-12) and high == pytest.approx(1.2, abs=1e-12)
    # the same load spread with the pairs broken (candidate rounds reversed) gives a wide interval
    low, high = bootstrap_interval({"candidate": paired["candidate"][::-1], "baseline": base}, RATIO)
    assert low < 1.0 and high > 1.5


def test_interval_is_seeded_and_covers_the_point():
    r = rounds([1.15, 1.35, 1.20, 1.30, 1.18, 1.32, 1.22, 1.28])
    assert bootstrap_interval(r, RATIO) == bootstrap_interval(r, RATIO)
    low, high = bootstrap_interval(r, RATIO)
    assert low <= point(r, RATIO) <= high
    assert point(r, RATIO) == pytest.approx(np.mean(np.divide(r["candidate"], r["baseline"])))


def test_verdict_rules():
    assert verdict(1.0, "<=", 1.25, 0.9, 1.25) == "met"  # the whole interval within the limit
    assert verdict(1.3, "<=", 1.25, 1.26, 1.4) == "missed"
    assert verdict(1.2, "<=", 1.25, 1.1, 1.3) == "undecided"
    assert verdict(1.3, "<=", 1.25) == "missed"  # a counted quantity: no interval, decided by its value
    assert verdict(1.0, "<=", 1.25, rounds=1) == "undecided"  # sampled once: no spread measured
    one = decide("t", {"candidate": [1.0], "baseline": [2.0]}, RATIO, "<=", 1.25)
    assert (one.value, one.low, one.high, one.verdict) == (0.5, None, None, "undecided")


def test_unpaired_rounds_are_refused():
    with pytest.raises(ValueError, match="same number of rounds"):
        bootstrap_interval({"candidate": [1.0, 2.0], "baseline": [1.0]}, RATIO)
