"""Claims as code (layerlab.claims): verdicts on synthetic per-run results."""

from __future__ import annotations

import pytest
from scipy import stats

from layerlab.claims import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    Claim,
    Estimate,
    claims_table,
    estimate,
    read_rows,
)
from layerlab.train import nrr


def _rows(group: str, values: list[float], metric: str = "last_robust") -> list[dict]:
    return [{"group": group, "seed": i, metric: v} for i, v in enumerate(values)]


GREATER = Claim("a-over-b", "X", "A beats B", "greater", "last_robust", ("A", "B"))


def test_interval_is_the_student_t_interval() -> None:
    e = Estimate(10.0, 2.0, 3)
    assert e.half_width == pytest.approx(stats.t.ppf(0.975, 2) * 2.0 / 3 ** 0.5, rel=1e-4)
    assert Estimate(1.0, 0.0, 1).half_width == float("inf")


def test_separated_intervals_in_the_papers_direction_reproduce() -> None:
    assert GREATER.check(_rows("A", [50, 51, 52]) + _rows("B", [40, 41, 42]))["verdict"] == REPRODUCED


def test_separated_intervals_the_other_way_do_not_reproduce() -> None:
    assert GREATER.check(_rows("A", [40, 41, 42]) + _rows("B", [50, 51, 52]))["verdict"] == NOT_REPRODUCED


def test_overlapping_intervals_or_too_few_seeds_are_inconclusive() -> None:
    assert GREATER.check(_rows("A", [45, 50, 55]) + _rows("B", [44, 49, 54]))["verdict"] == INCONCLUSIVE
    assert GREATER.check(_rows("A", [60, 61]) + _rows("B", [40, 41]))["verdict"] == INCONCLUSIVE
    assert GREATER.check(_rows("A", [60, 61, 62]))["verdict"] == INCONCLUSIVE  # B has no runs


def test_threshold_and_sweep_peak_claims() -> None:
    gap = Claim("overfit", "X", "AT overfits", "at_least", "best_minus_last_robust", ("AT",), value=3.0)
    assert gap.check(_rows("AT", [5, 5.5, 6], "best_minus_last_robust"))["verdict"] == REPRODUCED
    assert gap.check(_rows("AT", [0, 0.2, -0.1], "best_minus_last_robust"))["verdict"] == NOT_REPRODUCED
    peak = Claim("peak", "X", "inner peak", "peaks_inside", "last_robust", ("c1", "c2", "c3"))
    inner = _rows("c1", [20, 20.5, 21]) + _rows("c2", [25, 25.5, 26]) + _rows("c3", [20, 21, 20.5])
    edge = _rows("c1", [30, 30.5, 31]) + _rows("c2", [25, 25.5, 26]) + _rows("c3", [20, 21, 20.5])
    flat = _rows("c1", [25, 26, 24]) + _rows("c2", [25, 25.5, 26]) + _rows("c3", [24, 26, 25])
    assert [peak.check(r)["verdict"] for r in (inner, edge, flat)] == [REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE]


def test_nrr_is_computed_per_run_from_its_accuracies(tmp_path) -> None:
    path = tmp_path / "x-runs.csv"
    path.write_text("run,group,seed,last_natural,last_robust\nA,A,0,60,20\nA-s1,A,1,50,30\n")
    rows = read_rows([path, tmp_path / "missing.csv"])
    e = estimate(rows, "A", "last_nrr")
    assert e.n == 2 and e.mean == pytest.approx((nrr(60, 20) + nrr(50, 30)) / 2)
    table = claims_table(rows, [GREATER])
    assert table.splitlines()[2].endswith("| inconclusive |")
    assert "A: 25.0 ± 7.1 (n=2); B: no runs" in table
