"""The runs the gallery trains: its CURE is the experiments' ``CURE-code``, and at the cpu profile the
robust-overfitting groups train the experiments' runs of the overfitting regime, config for config. Training is
replaced by a spy that records the config and marks the run finished (no model is trained)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from layerlab import experiments as ex
from layerlab.config import TrainConfig
from layerlab.gallery import SETTINGS, context
from layerlab.gallery import runs as gallery_runs
from layerlab.gallery.settings import CURE_ABLATION, CURE_RUN, OVERFIT_METHODS
from layerlab.methods.cure import CODE_ARGS


@pytest.fixture
def trained(monkeypatch) -> dict[str, TrainConfig]:
    """Run name -> the config the gallery trained it with (each run then counts as finished; asked for again, it
    must be asked for with the same config, as :func:`layerlab.study.run_or_reuse` requires)."""
    found: dict[str, TrainConfig] = {}

    def spy(cfg: TrainConfig, run_dir: Path, **_) -> dict:
        if run_dir.name in found:
            assert cfg == found[run_dir.name], run_dir.name
            return {}
        found[run_dir.name] = cfg
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text("{}")
        return {}

    monkeypatch.setattr(gallery_runs, "run_or_reuse", spy)
    monkeypatch.setattr(gallery_runs, "splits_for", lambda cfg: None)  # no data is loaded
    return found


def experiments_config(name: str, root: Path) -> TrainConfig:
    """The config the experiments train run ``name`` with, under ``root`` (the same in every experiment naming it)."""
    specs = [s for e in ex.EXPERIMENTS.values() for s in e.specs if s.name == name]
    assert specs and all(s == specs[0] for s in specs), name
    return specs[0].config(ex.base_config("cpu"), root)


def test_cpu_overfitting_groups_train_the_experiments_regime_runs(tmp_path, trained) -> None:
    ctx = context("cpu", tmp_path / "runs", tmp_path / "figures").overfitting()
    assert ctx.regime.changes == ex.OVERFIT and ctx.regime.name("AT") == ex.overfit_name("AT")
    table3 = gallery_runs.method_runs(ctx, OVERFIT_METHODS)  # overfitting: CURE Fig. 5c, Table 3
    lsc = gallery_runs.method_runs(ctx, ["at", "rwp"])  # lsc: RWP Fig. 2
    base = gallery_runs.method_runs(ctx, ["at", "awp", "rwp"])  # rwp_ablations: RWP Fig. 3c
    sweeps = gallery_runs.rwp_sweep_runs(ctx, base["rwp"])  # rwp_ablations: RWP Fig. 3a / 3b
    # every seed-0 run of both experiments, no other run, each with the experiments' config
    regime = {s.name for e in ("robust-overfitting", "rwp-sweeps") for s in ex.EXPERIMENTS[e].specs
              if ex.seed_of(s.name) == 0}
    assert set(trained) == regime
    for name, cfg in trained.items():
        assert cfg == experiments_config(name, ctx.root), name
        assert cfg == cfg.replace(**ctx.regime.changes), name  # the regime the settings name
    assert {m: p.name for m, p in table3.items()} == {m: ex.overfit_name(gallery_runs.run_group(m))
                                                      for m in OVERFIT_METHODS}
    assert lsc["at"] == table3["at"] and base["rwp"] == table3["rwp"]
    cure = trained[ex.overfit_name(CURE_RUN)]
    assert cure.method_args == CODE_ARGS  # from the regime's own ST model
    assert cure.init == str(ctx.root / ex.overfit_name("ST") / "checkpoints" / "best.pt")
    assert trained[ex.overfit_name("AT")].keep_every == ex.OVERFIT["keep_every"]  # RWP Fig. 2's checkpoints
    swept = {(param, value) for param, value, _ in sweeps}
    cpu = SETTINGS["cpu"]
    assert swept == {("c_min", c) for c in cpu.rwp_cmins} | {("steps", k) for k in cpu.rwp_steps}
    assert all(run.name.endswith(ex.OVERFIT_TAG) for _, _, run in sweeps)
    assert {s.regime for p, s in SETTINGS.items() if p != "cpu"} == {None}  # the other profiles keep their runs


def test_gallery_cure_and_its_table7_variants_are_the_experiments_cure_code(tmp_path, trained) -> None:
    ctx = context("cpu", tmp_path / "runs", tmp_path / "figures")
    (ctx.root / "ST").mkdir()
    (ctx.root / "ST" / "summary.json").write_text("{}")  # the ST model they start from, finished
    found = gallery_runs.cure_runs(ctx, CURE_ABLATION)
    assert set(found) == set(trained) == {"CURE-code", "CURE-code-p0", "CURE-code-gamma0", "CURE-code-p0-gamma0"}
    assert trained[CURE_RUN] == experiments_config(CURE_RUN, ctx.root)  # cure-decision's CURE-code
    base = ex.base_config("cpu")
    for suffix, (_, _, args) in CURE_ABLATION.items():
        (spec,) = ex.seeded(CURE_RUN + suffix, seeds=(0,), method="cure", init="ST",
                            method_args={**CODE_ARGS, **args})
        assert trained[spec.name] == spec.config(base, ctx.root)
    assert trained["CURE-code-p0-gamma0"].method_args == {**CODE_ARGS, "p": 0, "gamma": 0}
    assert gallery_runs.method_runs(ctx, ["cure"])["cure"] == ctx.root / CURE_RUN  # re-used, not trained again
    assert context("tiny", tmp_path / "t", tmp_path / "f").overfitting().regime is None


def test_a_regime_run_the_experiments_train_otherwise_is_refused_before_training(tmp_path, trained) -> None:
    ctx = context("cpu", tmp_path / "runs", tmp_path / "figures").overfitting()
    with pytest.raises(ValueError, match=f"the experiments train {re.escape(ex.overfit_name('AT'))} as at"):
        gallery_runs.experiment_runs(ctx, {ex.overfit_name("RWP"): ("rwp", {}),
                                           ex.overfit_name("AT"): ("awp", {})})
    with pytest.raises(ValueError, match="no experiment has a run named 'RWP-cmin9"):
        gallery_runs.variant_runs(ctx, "rwp", {"RWP-cmin9": {"c_min": 9.0}})
    assert trained == {}


def test_a_manifest_names_the_regime_of_the_runs_its_group_read(tmp_path) -> None:
    import json
    from dataclasses import asdict

    from layerlab.gallery.manifest import _jsonable, paper_differences

    ctx = context("cpu", tmp_path / "runs", tmp_path / "figures")
    ctx.use({"at": ctx.root / "AT"})
    assert not any(ex.OVERFIT_TAG in d for d in paper_differences(ctx))  # a group on the profile's own runs
    ctx.overfitting().use({"at": ctx.root / ex.overfit_name("AT")})  # noted in the call's own manifest
    (note,) = [d for d in paper_differences(ctx) if ex.OVERFIT_TAG in d]
    assert f"train_size {ex.OVERFIT['train_size']}" in note and f"epochs {ex.OVERFIT['epochs']}" in note
    assert json.loads(json.dumps(_jsonable(asdict(ctx.s))))["regime"] == {"tag": ex.OVERFIT_TAG,
                                                                           "changes": ex.OVERFIT}
