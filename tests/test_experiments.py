"""Named experiments (layerlab.experiments): seeded run sets, dependencies, summaries."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest

from layerlab import experiments as ex
from layerlab import runs
from layerlab.methods import Method, build_method
from layerlab.records import export_records, restore_records
from layerlab.train import nrr


def test_run_names_carry_their_seed() -> None:
    specs = ex.seeded("CURE-code", method="cure", init="ST")
    assert [s.name for s in specs] == ["CURE-code", "CURE-code-s1", "CURE-code-s2"]
    assert [ex.seed_of(s.name) for s in specs] == [0, 1, 2] and {ex.group_of(s.name) for s in specs} == {"CURE-code"}
    assert ex.group_of("CURE-d0.98-rconst-s2") == "CURE-d0.98-rconst" and ex.seed_of("U-23-code") == 0


def test_every_experiment_names_each_run_once_and_starts_from_runs_it_has() -> None:
    for exp in ex.EXPERIMENTS.values():
        names = [s.name for s in exp.specs]
        assert len(names) == len(set(names)), exp.name
        assert all(s.init is None or s.init in names[: names.index(s.name)] for s in exp.specs), exp.name
    with pytest.raises(ValueError, match="unknown experiment"):
        ex.experiment("nope")


def test_a_run_name_means_one_config_in_every_experiment_and_every_config_builds(tmp_path) -> None:
    seen: dict[str, ex.RunSpec] = {}
    for exp in ex.EXPERIMENTS.values():
        for spec in exp.specs:
            assert seen.setdefault(spec.name, spec) == spec, f"{spec.name} differs in {exp.name}"
            cfg = spec.config(ex.base_config(exp.profile), tmp_path).validate()
            build_method(cfg.method, cfg.method_args)


def _groups(name: str) -> dict[str, Method]:
    """Seed 0's method of every group of experiment ``name``."""
    return {s.name: build_method(s.changes["method"], s.changes.get("method_args", {}))
            for s in ex.experiment(name).specs if s.changes.get("seed") == 0}


def test_the_awp_sweeps_cover_zero_to_eight_gamma0_and_the_loss_ranges_tile_every_loss() -> None:
    gammas = sorted(m.components[0].gamma if m.components else 0.0 for m in _groups("awp-gamma").values())
    assert gammas == pytest.approx([0.0, 0.5 * ex.AWP_GAMMA0, ex.AWP_GAMMA0, 2 * ex.AWP_GAMMA0, 4 * ex.AWP_GAMMA0,
                                    8 * ex.AWP_GAMMA0])
    ranged = [m.components[0] for n, m in _groups("awp-loss-ranges").items() if n.startswith("AWP-loss")]
    bounds = sorted((c.c_low or 0.0, c.c_min if c.c_min is not None else math.inf) for c in ranged)
    assert bounds[0][0] == 0.0 and bounds[-1][1] == math.inf
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, no overlap
    assert {c.gamma for c in ranged} == {ex.AWP_DEFAULT_GAMMA}


def test_the_cure_grid_changes_one_hyper_parameter_at_a_time() -> None:
    groups = _groups("cure-grid")
    centre = groups.pop("CURE").hparams()
    assert len(groups) == sum(len(v) for v in ex.CURE_GRID.values())
    for name, method in groups.items():
        changed = {k for k, v in method.hparams().items() if centre[k] != v}
        assert len(changed) == 1, (name, changed)


@pytest.fixture
def tiny_experiment(monkeypatch, tiny_cfg):
    exp = ex.Experiment("tiny", "test", "smoke", (ex.RunSpec("ST", {"method": "st"}),
                                                   *ex.seeded("AT-fromST", seeds=(0, 1), method="at", init="ST")))
    monkeypatch.setitem(ex.EXPERIMENTS, "tiny", exp)
    monkeypatch.setattr(ex, "base_config", lambda profile: tiny_cfg())
    return exp


def test_runs_train_after_what_they_start_from_and_summarize_over_seeds(tmp_path, tiny_experiment) -> None:
    root = tmp_path / "root"
    assert ex.run_experiment("tiny", root, log=lambda _: None) == ["ST", "AT-fromST", "AT-fromST-s1"]
    cfg = runs.read_json(root / "AT-fromST-s1" / "config.json")["config"]
    assert cfg["init"] == str(root.resolve() / "ST" / "checkpoints" / "best.pt") and cfg["seed"] == 1
    assert ex.run_experiment("tiny", root, log=lambda _: None) == []  # finished runs are never retrained
    # a run stopped before its first epoch ended (a config, no epoch): started again
    shutil.rmtree(root / "AT-fromST-s1")
    (root / "AT-fromST-s1" / "checkpoints").mkdir(parents=True)
    runs.write_json(root / "AT-fromST-s1" / "config.json", {"config": {}})
    assert ex.run_experiment("tiny", root, log=lambda _: None) == ["AT-fromST-s1"]
    rows, table = ex.summarize("tiny", root)
    at = next(t for t in table if t["group"] == "AT-fromST")
    values = [r["last_robust"] for r in rows if r["group"] == "AT-fromST"]
    assert at["n_seeds"] == 2 and at["seeds"] == "0 1"
    assert at["last_robust_mean"] == pytest.approx(sum(values) / 2, abs=0.01)
    assert at["last_nrr_mean"] == pytest.approx(sum(nrr(r["last_natural"], r["last_robust"]) for r in rows
                                                   if r["group"] == "AT-fromST") / 2, abs=0.01)
    paths = ex.write_summary_csv("tiny", root, tmp_path / "out")
    assert [p.name for p in paths] == ["tiny-runs.csv", "tiny.csv", "tiny-curves.csv"]
    assert "AT-fromST-s1" in paths[0].read_text()


def test_a_recorded_dependency_is_retrained_before_its_dependents(tmp_path, tiny_experiment) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    ex.run_experiment("tiny", first, only=["ST"], log=lambda _: None)
    export_records(first, tmp_path / "rec")
    assert "ST" in restore_records(tmp_path / "rec", second)
    ex.run_experiment("tiny", second, only=["ST", "AT-fromST"], log=lambda _: None)
    assert (second / "ST" / "checkpoints" / "best.pt").exists()
    assert json.loads((second / "ST" / "reproduced.json").read_text())["identical"]
    assert (second / "AT-fromST" / "summary.json").exists() and not (second / "AT-fromST-s1").exists()
    with pytest.raises(ex.RefusedError, match="has no runs"):
        ex.run_experiment("tiny", second, only=["AT-fromST-s9"], log=lambda _: None)
    with pytest.raises(ex.RefusedError, match="has no runs"):
        ex.evaluate_experiment("tiny", second, only=["AT-fromST-s9"], log=lambda _: None)
    assert ex.main(["run", "tiny", "--runs", str(tmp_path / "third"), "--only", "AT-fromST-s9"]) == 2
    assert not (tmp_path / "third").exists()  # refused before anything was written


def test_finished_runs_are_evaluated_once_and_their_worst_case_is_pointwise(tmp_path, tiny_experiment, monkeypatch):
    monkeypatch.setattr(ex, "EVAL_N", 20)
    monkeypatch.setattr(ex, "EVAL_ATTACKS", ("natural", "pgd3", "cw3"))
    monkeypatch.setattr(ex, "AA_SEEDS", (1,))  # seed 1 also gets full AutoAttack, after every worst case
    root = tmp_path / "root"
    ex.run_experiment("tiny", root, log=lambda _: None)
    assert ex.evaluate_experiment("tiny", root, log=lambda _: None) == [
        "ST:last", "AT-fromST:last", "AT-fromST-s1:last", "AT-fromST-s1:last"]
    assert "aa" in runs.read_json(root / "AT-fromST-s1" / "eval-last.json")["results"]
    assert "aa" not in ex.experiment("tiny").attacks("AT-fromST-s1", "best")  # full AutoAttack: last checkpoint only
    assert ex.evaluate_experiment("tiny", root, log=lambda _: None) == []  # nothing is evaluated twice
    run = root / "AT-fromST"
    assert not (run / "eval.json").exists()  # the last checkpoint's evaluation leaves the best one's alone
    report = runs.read_json(run / "eval-last.json")
    assert report["checkpoint"] == "last" and report["n"] == 20
    hits = [report["results"][a]["correct"] for a in ("natural", "pgd3", "cw3")]
    robust = sum(all(h[i] == "1" for h in hits) for i in range(20))
    row = ex.run_row(run)
    assert row["last_worst"] == pytest.approx(100 * robust / 20)
    assert row["last_worst"] <= min(report["results"][a]["accuracy"] for a in ("pgd3", "cw3"))
    assert row["best_worst"] is None and row["best_minus_last_worst"] is None
    monkeypatch.setattr(ex, "EVAL_ATTACKS", ("natural", "pgd3", "cw3", "fgsm"))  # a new attack: only it runs
    assert ex.evaluate_experiment("tiny", root, only=["AT-fromST"], log=lambda _: None) == ["AT-fromST:last"]
    assert set(runs.read_json(run / "eval-last.json")["results"]) == {"natural", "pgd3", "cw3", "fgsm"}
    status = {line.split()[0]: line for line in ex.status_lines("tiny", root)[1:-1]}
    assert "to evaluate" not in status["AT-fromST"] and status["ST"].endswith("to evaluate (last: fgsm)")
    assert ex.status_lines("tiny", root)[-1].startswith("  3/3 trained, 2 checkpoint evaluations left")


def test_status_tells_what_is_left_and_refuses_a_missing_root(tmp_path, tiny_experiment, capsys) -> None:
    root = tmp_path / "root"
    ex.run_experiment("tiny", root, only=["ST"], log=lambda _: None)
    lines = ex.status_lines("tiny", root)
    assert lines[0] == "tiny: test"
    assert lines[1].split()[:4] == ["ST", "finished", "epoch", "1/1"]
    assert lines[2].split()[:4] == ["AT-fromST", "absent", "epoch", "0/1"]
    hours = runs.read_json(root / "ST" / "summary.json")["seconds"] / 3600
    assert lines[-1].startswith(f"  1/3 trained, 3 checkpoint evaluations left; core-hours left: ~{2 * hours:.1f} "
                                "training + unknown evaluation")
    assert ex.main(["status", "tiny", "--runs", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_figures_redraw_from_the_store_alone_and_carry_every_seed_and_the_removal_rate(tmp_path, monkeypatch,
                                                                                       tiny_cfg, capsys) -> None:
    exp = ex.Experiment("lsc-removal", "test", "smoke", tuple(ex.seed_major(
        [ex.seeded("AT", seeds=(0, 1), method="at"),
         ex.seeded("AT-remove", seeds=(0, 1), method="at-remove", method_args={"c_min": 1.0})])))
    monkeypatch.setitem(ex.EXPERIMENTS, "lsc-removal", exp)
    monkeypatch.setattr(ex, "base_config", lambda profile: tiny_cfg(epochs=2))
    root, store, out = tmp_path / "root", tmp_path / "store", tmp_path / "figures"
    ex.run_experiment("lsc-removal", root, log=lambda _: None)
    ex.main(["summarize", "lsc-removal", "--runs", str(root), "--out", str(store)])
    written = sorted(capsys.readouterr().out.split())
    assert written == [str(store / f"lsc-removal{suffix}.csv") for suffix in ("-curves", "-runs", "")]
    shutil.rmtree(root)  # the figures read the store alone
    curves = pd.read_csv(store / "lsc-removal-curves.csv")
    assert list(curves.columns) == ["run", "group", "seed", *ex.CURVE_COLUMNS]
    assert len(curves) == 4 * 2 and set(curves["seed"]) == {0, 1}
    removal = curves.groupby("group")["removal_rate"].apply(lambda s: s.notna().all())
    assert removal["AT-remove"] and not curves.loc[curves["group"] == "AT", "removal_rate"].notna().any()
    assert set(pd.read_csv(store / "lsc-removal.csv")["n_seeds"]) == {2}
    assert ex.main(["figures", "lsc-removal", "--store", str(store), "--out", str(out)]) == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["lsc-removal/rwp_appendix_removal_best_last.png", "lsc-removal/rwp_appendix_removal_curves.png"]
    assert sorted(capsys.readouterr().out.split()) == [str(out / f) for f in files]
    with pytest.raises(ex.RefusedError, match="draws no figures"):
        ex.write_figures("overfit-pilot", store, out)
    (store / "lsc-removal-curves.csv").unlink()
    assert ex.main(["figures", "lsc-removal", "--store", str(store), "--out", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lsc-removal-curves.csv does not exist" in err
    assert f"python -m layerlab.experiments summarize lsc-removal --runs RUN_ROOT --out {store}" in err
    assert not (tmp_path / "nothing").exists()
    ex.write_summary_csv("lsc-removal", tmp_path / "untrained", tmp_path / "empty")  # no run finished yet
    with pytest.raises(ex.RefusedError, match="has no finished run"):
        ex.write_figures("lsc-removal", tmp_path / "empty", tmp_path / "nothing")


def _store_table(name: str, metrics: tuple[str, ...]) -> pd.DataFrame:
    """A synthetic summary of experiment ``name``: every group, 3 seeds, distinct means of ``metrics``."""
    groups = list(dict.fromkeys(ex.group_of(s.name) for s in ex.experiment(name).specs))
    return pd.DataFrame({"group": groups, "n_seeds": 3,
                         **{f"{m}_{stat}": [10.0 + k + i for i in range(len(groups))]
                            for k, m in enumerate(metrics) for stat in ("mean", "std")}})


def test_the_decision_figures_show_every_group_nrr_and_the_released_code_variants(tmp_path, monkeypatch) -> None:
    drawn = {}
    original = ex.plot_group_bars

    def spy(frame, metrics, path, **kw):
        drawn[path.name] = (list(frame["group"]), metrics, kw)
        return original(frame, metrics, path, **kw)

    monkeypatch.setattr(ex, "plot_group_bars", spy)
    decision = _store_table("cure-decision", (*ex.TRADEOFF, "last_worst_nrr"))
    [png] = ex.FIGURES["cure-decision"](decision, pd.DataFrame(), tmp_path)
    groups, metrics, kw = drawn[png.name]
    assert png.exists() and groups == list(decision["group"]) and "last_worst_nrr" in metrics
    assert kw["title"] == ex.experiment("cure-decision").question
    freeze = _store_table("freeze-variants", ex.TRADEOFF)
    [png] = ex.FIGURES["freeze-variants"](freeze, pd.DataFrame(), tmp_path)
    groups, metrics, kw = drawn[png.name]
    assert png.exists() and metrics == ex.TRADEOFF
    assert kw["hatched"] == [f"U-{spec}-code" for spec in ex.FREEZE_SPECS]
    assert {f"U-{spec}" for spec in ex.FREEZE_SPECS} | {"AT"} <= set(groups) - set(kw["hatched"])


def test_the_awp_gamma_figure_puts_each_group_at_its_gamma(tmp_path, monkeypatch) -> None:
    groups = list(_groups("awp-gamma"))
    table = pd.DataFrame({"group": groups, "n_seeds": 3, "best_robust_mean": range(len(groups)),
                          "best_robust_std": 0.5})
    drawn = {}
    original = ex.plot_sweep

    def spy(frame, x, metrics, path, **kw):
        drawn.update(zip(frame["group"], frame[x]))
        return original(frame, x, metrics, path, **kw)

    monkeypatch.setattr(ex, "plot_sweep", spy)
    [png] = ex.FIGURES["awp-gamma"](table, pd.DataFrame(), tmp_path)
    assert png.exists() and drawn == {"AT": 0.0, "AWP-g0.0025": 0.5, "AWP-g0.005": 1.0, "AWP": 2.0, "AWP-g0.02": 4.0,
                                      "AWP-g0.04": 8.0}


def test_the_overfitting_regime_shares_the_pilots_run_and_its_figures_draw(tmp_path, monkeypatch) -> None:
    regime = {s.name: s for s in ex.experiment("robust-overfitting").specs}
    pilot = {s.name: s for s in ex.experiment("overfit-pilot").specs}
    assert regime[ex.OVERFIT_AT.name] == pilot[ex.OVERFIT_AT.name]  # the pilot's run is the regime's AT, seed 0
    for name in ("robust-overfitting", "rwp-sweeps", "awp-loss-ranges", "lsc-removal"):
        for spec in ex.experiment(name).specs:
            cfg = spec.config(ex.base_config("cpu"), tmp_path)
            assert spec.name.startswith(ex.group_of(spec.name)) and ex.OVERFIT_TAG in spec.name, spec.name
            assert (cfg.train_size, cfg.epochs, cfg.width) == (500, 100, 0.5), spec.name
    assert regime[ex.overfit_name("CURE-code")].init == ex.overfit_name("ST")
    # the sweep figure puts each group at its own c_min / K2; every group drawn, the default in both sweeps
    groups = sorted({ex.group_of(s.name) for s in ex.experiment("rwp-sweeps").specs})
    table = pd.DataFrame({"group": groups, "n_seeds": 3, "best_robust_mean": range(len(groups)), "best_robust_std": 0.5})
    drawn = []
    original = ex.plot_sweep

    def spy(frame, x, metrics, path, **kw):
        drawn.append(dict(zip(frame["group"].str.replace(f"-{ex.OVERFIT_TAG}", ""), frame[x])))
        return original(frame, x, metrics, path, **kw)

    monkeypatch.setattr(ex, "plot_sweep", spy)
    paths = ex.FIGURES["rwp-sweeps"](table, pd.DataFrame(), tmp_path)
    assert [p.name for p in paths] == ["rwp_fig3a_c_min.png", "rwp_fig3b_k2.png"] and all(p.exists() for p in paths)
    assert drawn == [{"RWP": 1.7, "RWP-cmin1": 1.0, "RWP-cmin1.4": 1.4, "RWP-cmin2": 2.0, "RWP-cmin2.3": 2.3},
                     {"RWP": 10, "RWP-k1": 1, "RWP-k3": 3, "RWP-k5": 5}]
    curves = pd.DataFrame([{"group": g, "seed": s, "epoch": e, "robust_acc": 20.0 + s, "train_acc": 30.0 + e}
                           for g in ("AT", "RWP") for s in (0, 1) for e in (1, 2, 3)])
    table = pd.DataFrame({"group": ["AT", "RWP"], "n_seeds": 2, "best_worst_mean": [20.0, 22.0],
                          "best_worst_std": 1.0, "last_worst_mean": [15.0, 21.0], "last_worst_std": 1.0})
    paths = ex.FIGURES["robust-overfitting"](table, curves, tmp_path)
    assert [p.name for p in paths] == ["cure_fig5c_rwp_fig3c_overfitting_curves.png",
                                       "cure_table3_rwp_table1_best_last.png"] and all(p.exists() for p in paths)
