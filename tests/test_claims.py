"""Claims as code (layerlab.claims): verdicts on synthetic per-run results."""

from __future__ import annotations

import pytest
from scipy import stats

from layerlab.claims import (
    BEGIN,
    CLAIMS,
    END,
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    Claim,
    Estimate,
    claims_table,
    estimate,
    experiment_figures,
    main,
    read_rows,
    readme_section,
    update_readme,
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
    assert table.splitlines()[2].endswith("| **inconclusive** |")
    assert "A: 25.0 ± 7.1 (n=2); B: no runs" in table


def test_a_run_shared_by_two_experiments_counts_once_and_worst_case_nrr_uses_the_worst_column(tmp_path) -> None:
    a, b = tmp_path / "a-runs.csv", tmp_path / "b-runs.csv"
    header = "run,group,seed,last_natural,last_robust,last_worst\n"
    a.write_text(header + "AT,AT,0,40,26,24\n")
    b.write_text(header + "AT,AT,0,40,26,24\nAT-s1,AT,1,42,25,23\n")
    rows = read_rows([a, b])
    assert estimate(rows, "AT", "last_robust").n == 2
    assert estimate(rows, "AT", "last_worst_nrr").mean == pytest.approx((nrr(40, 24) + nrr(42, 23)) / 2)
    worst = Claim("w", "X", "A more robust", "greater", "last_worst", ("AT", "B"))
    assert "AT: 25.5 ± 0.7 (n=2)" in worst.check(rows)["pgd20"]  # PGD-20 is reported beside the worst case


def test_the_readme_section_is_replaced_in_place(tmp_path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n\n## group 1\n")
    rows = _rows("A", [50, 51, 52]) + _rows("B", [40, 41, 42])
    update_readme(readme, readme_section("results", rows))
    first = readme.read_text()
    assert first.index("intro") < first.index(BEGIN) < first.index(END) < first.index("## group 1")
    update_readme(readme, readme_section("results", rows))
    assert readme.read_text() == first


def test_the_committed_claims_table_is_the_one_the_committed_results_give() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "figures" / "README.md").read_text()
    committed = text[text.index(BEGIN): text.index(END) + len(END)]
    rows = read_rows(sorted((root / "results" / "experiments").glob("*-runs.csv")))
    figures = experiment_figures(root / "figures")
    assert committed == readme_section("results/experiments", rows, figures), (
        "figures/README.md's claims are stale: python -m layerlab.claims results/experiments --readme figures/README.md")
    assert len(CLAIMS) == committed.count("| **")


def test_the_claims_section_links_the_experiment_figures_drawn_from_the_store(tmp_path, capsys) -> None:
    from layerlab import experiments

    store, figures = tmp_path / "store", tmp_path / "figures"
    store.mkdir()
    (store / "cure-decision.csv").write_text("group,n_seeds,last_natural_mean,last_natural_std\nCURE,3,60,1\n")
    (store / "cure-decision-curves.csv").write_text("run,group,seed,epoch\n")
    (store / "cure-decision-runs.csv").write_text("run,group,seed,last_natural\nCURE,CURE,0,60\n")
    (figures / "experiments" / "not-an-experiment").mkdir(parents=True)
    (figures / "experiments" / "not-an-experiment" / "x.png").write_bytes(b"")
    (figures / "README.md").write_text("# gallery\n\nintro\n\n## group 1\n")
    assert main([str(store), "--readme", str(figures / "README.md")]) == 0
    assert "Figures of the experiments" not in (figures / "README.md").read_text()  # none drawn yet
    out = figures / "experiments"
    assert experiments.main(["figures", "cure-decision", "--store", str(store), "--out", str(out)]) == 0
    assert experiment_figures(figures) == {"cure-decision": ["experiments/cure-decision/cure_decision_last.png"]}
    assert main([str(store), "--readme", str(figures / "README.md")]) == 0
    text = (figures / "README.md").read_text()
    line = ("- `cure-decision`: [cure_decision_last.png](experiments/cure-decision/cure_decision_last.png) "
            f"(`python -m layerlab.experiments figures cure-decision --store {store.as_posix()} "
            "--out figures/experiments`)")
    assert text.index("| **") < text.index(line) < text.index(END) < text.index("## group 1")
    rows = read_rows([store / "cure-decision-runs.csv"])
    assert text[text.index(BEGIN): text.index(END) + len(END)] == readme_section(store.as_posix(), rows,
                                                                              experiment_figures(figures))


def test_rewriting_the_gallery_readme_keeps_the_claims_section(tmp_path) -> None:
    from layerlab.gallery import write_readme

    readme = tmp_path / "README.md"
    readme.write_text("# old\n\nintro\n\nold body\n")
    section = readme_section("results", _rows("A", [50, 51, 52]))
    update_readme(readme, section)
    text = write_readme(tmp_path).read_text()
    assert section in text and "old body" not in text


def test_every_claim_reads_groups_that_an_experiment_trains() -> None:
    from layerlab.experiments import EXPERIMENTS, group_of

    groups = {group_of(s.name) for exp in EXPERIMENTS.values() for s in exp.specs}
    for claim in CLAIMS:
        assert set(claim.groups) <= groups, (claim.key, set(claim.groups) - groups)
