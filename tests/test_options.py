"""The training options generated from TrainConfig: one config per profile under every command, --config files,
the threat-model flags in 1/255 units, renamed method arguments read from old records."""

from __future__ import annotations

import dataclasses
import json

import pytest
import typer
from typer.testing import CliRunner

from layerlab.cli import app
from layerlab.config import EPS, PGD_STEP, TrainConfig, make_config, upgrade
from layerlab.gallery import base_config
from layerlab.methods import build_method
from layerlab.options import ConfigArgs, flag_of, read_config_file


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_train_help_shows_the_threat_model_and_its_units():
    out = invoke("train", "--help").stdout
    for flag in ("--eps", "--pgd-step", "--norm", "--momentum", "--eval-size", "--epoch-eval-steps",
                 "--channels-last", "--amp", "--config", "--attack-steps"):
        assert flag in out, flag
    assert "1/255" in out and "--alpha" not in out


def test_every_cli_field_has_one_flag_with_help():
    group = typer.main.get_command(app)
    train = {o for p in group.commands["train"].params for o in p.opts}
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli", True):
            assert flag_of(f.name) in train and f.metadata["help"]
    assert flag_of("alpha") == "--pgd-step" and flag_of("batch_size") == "--batch-size"


@pytest.mark.parametrize("profile", ["tiny", "smoke", "cpu", "paper"])
def test_a_profile_is_one_config_under_every_command(profile):
    """train/compare/freeze-study (ConfigArgs) and the gallery build the same config from a profile name."""
    assert ConfigArgs(profile, None, {}).build() == base_config(profile) == make_config(profile)
    assert make_config("cpu").amp and make_config("cpu").channels_last


def test_eps_and_step_flags_are_in_255ths_and_land_exactly_on_the_defaults():
    given = {"eps": 8 / 255, "alpha": 2 / 255}  # what the wrapper passes for --eps 8 --pgd-step 2
    cfg = ConfigArgs("smoke", None, given).build()
    assert cfg.eps == EPS and cfg.alpha == PGD_STEP
    assert make_config("smoke").differences(cfg.to_dict()) == []


def test_config_file_json_yaml_and_a_runs_config_json(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"epochs": 2, "eps": "4/255", "norm": "l2"}))
    (tmp_path / "c.yaml").write_text("epochs: 2\neps: 4/255\nnorm: l2\n")
    (tmp_path / "config.json").write_text(json.dumps({"config": make_config("tiny", epochs=2, eps=4 / 255,
                                                                            norm="l2").to_dict()}))
    for name in ("c.json", "c.yaml", "config.json"):
        cfg = ConfigArgs("smoke", tmp_path / name, {"epochs": 5}).build()
        assert (cfg.epochs, cfg.eps, cfg.norm) == (5, 4 / 255, "l2"), name  # the flag wins over the file
    assert ConfigArgs("smoke", tmp_path / "config.json", {}).build().width == make_config("tiny").width


def test_bad_config_file_is_one_error_line_before_any_work(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"epoch": 2}))
    result = invoke("train", "--config", tmp_path / "c.json", "--out", tmp_path / "run")
    assert result.exit_code == 2 and "unknown keys ['epoch']" in result.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="not a number"):
        (tmp_path / "d.json").write_text(json.dumps({"eps": "eight"}))
        read_config_file(tmp_path / "d.json")


def test_cure_rgp_weight_is_rgp_alpha_and_old_records_still_read():
    old = make_config("smoke", method="cure", method_args={"alpha": 0.2, "p": 10}).to_dict()
    cfg = TrainConfig.from_dict(old)
    assert cfg.method_args == {"rgp_alpha": 0.2, "p": 10}
    assert cfg.differences(old) == []
    assert build_method("cure", cfg.method_args).hparams()["rgp_alpha"] == 0.2
    assert upgrade(make_config("smoke", method="at", method_args={"alpha": 1}).to_dict())["method_args"] == {"alpha": 1}
    with pytest.raises(ValueError):
        build_method("cure", {"alpha": 0.2})  # the PGD step's name is not CURE's


@pytest.mark.slow
def test_the_gallery_reuses_runs_that_compare_trained_with_the_same_profile(tmp_path):
    from layerlab.gallery import context
    from layerlab.gallery.runs import method_runs

    root = tmp_path / "runs"
    result = invoke("compare", "--profile", "tiny", "--methods", "st,at", "--out", root, "--no-progress")
    assert result.exit_code == 0, result.output
    made = {p: p.stat().st_mtime_ns for p in root.glob("*/summary.json")}
    assert len(made) == 2
    found = method_runs(context("tiny", root, tmp_path / "figures"), ["st", "at"])
    assert set(found) == {"st", "at"}
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/summary.json")} == made  # re-used, not retrained


def test_each_default_has_one_home():
    import inspect

    from layerlab.analysis.lsc import lsc_run
    from layerlab.gallery.runs import default_arg
    from layerlab.gallery.settings import SETTINGS
    from layerlab.methods import PRESETS
    from layerlab.methods.cure import RGP_ALPHA, RGP_P
    from layerlab.methods.perturbation import C_MIN

    assert default_arg("rwp", "c_min") == default_arg("trades-rwp", "c_min") == C_MIN
    assert inspect.signature(lsc_run).parameters["c_min"].default == C_MIN
    assert PRESETS["rwp-cifar10"][1]["c_min"] == C_MIN and all(C_MIN in s.rwp_cmins for s in SETTINGS.values())
    assert default_arg("cure", "p") == default_arg("cure-eff", "p") == PRESETS["cure-resnet18-cifar10"][1]["p"] == RGP_P
    assert default_arg("cure", "rgp_alpha") == RGP_ALPHA
    assert TrainConfig().eps == EPS and TrainConfig().alpha == PGD_STEP
    lsc_help = invoke("lsc", "--help").stdout
    assert f"default: {C_MIN:g}" in lsc_help.replace("\n", " ")
