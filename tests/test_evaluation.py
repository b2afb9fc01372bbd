"""Tests for layerlab.evaluation: attack suite, worst case, NRR/sum, sanity checks, eval.json and the CLI."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import train_tiny_cnn
import torch
from torch import nn

from layerlab import evaluation as ev
from layerlab.attacks import fgsm
from layerlab.config import make_config
from layerlab.data import load_splits, to_float

EPS = 8 / 255



@pytest.fixture(scope="module")
def digits():
    """Float test images/labels of the built-in digits set and a small training set."""
    s = load_splits("digits", train_size=600, test_size=200, val_size=0)
    return to_float(s.train.images), s.train.labels, to_float(s.test.images), s.test.labels


@pytest.fixture(scope="module")
def tiny(digits):
    """A small CNN trained to ~90% on digits: robust accuracy at 8/255 lies strictly between 0 and 100."""
    x, y, xt, yt = digits
    model = train_tiny_cnn(x, y)
    assert (model(xt).argmax(1) == yt).float().mean() > 0.8
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished one-epoch smoke run directory (tiny ResNet-18 on digits)."""
    from layerlab.train import train

    out = tmp_path_factory.mktemp("runs") / "st"
    train(make_config("smoke", method="st", epochs=1, train_size=128, test_size=64, width=0.0625, device="cpu"),
          out, progress=False)
    return out


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


# ----------------------------------------------------------------------------- settings


def test_parse_attack_names():
    assert ev.parse_attack("cw100", EPS) == {"name": "cw100", "norm": "linf", "eps": EPS, "alpha": 2 / 255,
                                             "steps": 100, "restarts": 1, "loss": "cw"}
    l2 = ev.parse_attack("pgd100-l2", EPS)
    assert (l2["norm"], l2["eps"], l2["alpha"], l2["steps"], l2["loss"]) == ("l2", 0.5, 0.125, 100, "ce")
    assert ev.parse_attack("aa", EPS)["norm"] == "linf" and ev.parse_attack("aa-l2", EPS)["eps"] == 0.5
    sweep = ev.parse_attack("eps-sweep", EPS, [1, 8])
    assert [p["eps"] for p in ev.sweep_settings(sweep)] == [1 / 255, 8 / 255]
    assert [p["alpha"] for p in ev.sweep_settings(sweep)] == [1 / 255 / 4, 2 / 255]
    assert ev.expand_attacks(["natural", "all"]) == list(ev.SUITE)
    for bad in ("pgd", "cw20-l2", "foo", "pgd0"):
        with pytest.raises(ValueError, match="use natural"):
            ev.parse_attack(bad, EPS)
    with pytest.raises(ValueError, match="positive"):
        ev.parse_attack("eps-sweep", EPS, [0, 1])


# ----------------------------------------------------------------------------- attacks vs foolbox


def test_pgd_and_fgsm_agree_with_foolbox(tiny, digits):
    """An independent implementation (foolbox 3) of the same attacks: FGSM is deterministic and must give the
    same adversarial images; PGD-20 (its own random start) must reach about the same accuracy."""
    fb = pytest.importorskip("foolbox")
    _, _, x, y = digits
    fmodel = fb.PyTorchModel(tiny, bounds=(0, 1))
    ours, _, _ = ev.correct_under(tiny, x, y, ev.parse_attack("pgd20", EPS), seed=0)
    torch.manual_seed(0)
    _, theirs, _ = fb.attacks.LinfPGD(abs_stepsize=2 / 255, steps=20, random_start=True)(fmodel, x, y, epsilons=EPS)
    assert float((theirs - x).abs().max()) <= EPS + 1e-6
    ours_acc, theirs_acc = 100 * float(ours.float().mean()), accuracy(tiny, theirs, y)
    assert 0 < ours_acc < accuracy(tiny, x, y)  # the attack bites but does not break everything
    assert abs(ours_acc - theirs_acc) <= 4.0
    _, fgsm_theirs, _ = fb.attacks.FGSM()(fmodel, x, y, epsilons=EPS)
    fgsm_ours = fgsm(tiny, x, y, eps=EPS)
    assert float((fgsm_ours - fgsm_theirs).abs().max()) <= 1e-6
    fgsm_mask, _, _ = ev.correct_under(tiny, x, y, ev.parse_attack("fgsm", EPS))
    assert 100 * float(fgsm_mask.float().mean()) == accuracy(tiny, fgsm_theirs, y)


def test_suite_worst_case_metrics_and_checks(tiny, digits):
    _, _, x, y = digits
    x, y = x[:100], y[:100]
    report = ev.evaluate_model(tiny, x, y, ["fgsm", "pgd20", "cw100", "pgd20-l2", "eps-sweep"], eps=EPS,
                               sweep_255=[1, 4, 8], batch_size=64, seed=0)
    res = report["results"]
    assert set(res) == {"natural", "fgsm", "pgd20", "cw100", "pgd20-l2"} and report["n"] == 100
    # point-wise worst case, recomputed independently from the stored per-example strings
    linf = [res[k]["correct"] for k in ("natural", "fgsm", "pgd20", "cw100")]
    expected = 100.0 * sum(all(s[i] == "1" for s in linf) for i in range(100)) / 100
    assert report["worst_case"]["linf"]["accuracy"] == pytest.approx(expected)
    assert expected <= min(res[k]["accuracy"] for k in ("fgsm", "pgd20", "cw100"))
    assert report["worst_case"]["l2"]["attacks"] == ["natural", "pgd20-l2"]
    assert sorted(report["worst_case"]["linf"]["attacks"]) == ["cw100", "fgsm", "natural", "pgd20"]
    for k in ("natural", "pgd20", "cw100"):  # stored accuracies match a fresh count of the strings
        assert res[k]["accuracy"] == pytest.approx(100.0 * res[k]["correct"].count("1") / 100)
    # NRR (harmonic mean) and sum
    nat, rob = res["natural"]["accuracy"], res["pgd20"]["accuracy"]
    assert report["metrics"]["pgd20"]["nrr"] == pytest.approx(2 * nat * rob / (nat + rob))
    assert report["metrics"]["pgd20"]["sum"] == pytest.approx(nat + rob)
    assert report["nrr"] == pytest.approx(2 * nat * rob / (nat + rob))
    assert "worst-linf" in report["metrics"]
    # eps sweep: monotone in eps, and its 8/255 point is exactly PGD-20 (same step 2/255, same seed)
    points = report["eps_sweep"]["points"]
    assert [p["eps_255"] for p in points] == pytest.approx([1, 4, 8])
    assert points[0]["accuracy"] >= points[1]["accuracy"] >= points[2]["accuracy"]
    assert points[2]["accuracy"] == pytest.approx(rob)
    # sanity checks ran on the real batches and passed
    checks = report["checks"]
    assert checks["passed"] and checks["logits"]["passed"] and checks["input_gradients"]["passed"]
    for name in ("fgsm", "pgd20", "cw100"):
        b = checks["attacks"][name]["bounds"]
        assert b["passed"] and b["max_norm"] <= EPS + 1e-5 and b["max_norm"] > EPS * 0.9
        assert checks["attacks"][name]["eval_mode"]["forward_calls"] > 0
    assert checks["attacks"]["pgd20-l2"]["bounds"]["max_norm"] <= 0.5 + 1e-5


def test_autoattack_is_at_most_pgd(tiny, digits):
    pytest.importorskip("pyautoattack")
    _, _, x, y = digits
    eps = 48 / 255  # large enough that APGD-CE breaks (almost) everything: keeps AA fast on CPU
    report = ev.evaluate_model(tiny, x[:16], y[:16], ["pgd20", "aa"], eps=eps, seed=0)
    res = report["results"]
    assert res["aa"]["accuracy"] <= res["pgd20"]["accuracy"] + 100 / 16
    assert report["checks"]["attacks"]["aa"]["bounds"]["passed"]
    assert report["checks"]["attacks"]["aa"]["eval_mode"]["passed"]
    assert report["checks"]["attacks"]["aa"]["eval_mode"]["forward_calls"] > 20  # AutoAttack really ran
    assert report["checks"]["attacks"]["aa"]["bounds"]["max_norm"] <= eps + 1e-5


def test_aa_apgd_is_autoattack_standard_without_fab_and_square(tiny, digits):
    pytest.importorskip("pyautoattack")
    _, _, x, y = digits
    eps = 48 / 255
    attack = ev._autoattack(tiny, ev.parse_attack("aa-apgd", eps), 0, torch.device("cpu"))
    assert attack.attacks_to_run == ["apgd-ce", "apgd-t"]
    assert attack.apgd.n_restarts == 1 and attack.apgd_targeted.n_target_classes == 9  # standard's settings
    res = ev.evaluate_model(tiny, x[:16], y[:16], ["aa-apgd", "aa"], eps=eps, seed=0)["results"]
    assert res["aa"]["accuracy"] <= res["aa-apgd"]["accuracy"]  # the same first two attacks, then more


def test_missing_autoattack_gives_install_hint(tiny, digits, monkeypatch):
    _, _, x, y = digits
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import now raises ImportError
    with pytest.raises(RuntimeError, match="pip install pyautoattack"):
        ev.attack_batch(tiny, x[:2], y[:2], ev.parse_attack("aa", EPS))


# ----------------------------------------------------------------------------- the checks catch failures


def test_mode_monitor_flags_training_mode(tiny, digits):
    _, _, x, _ = digits
    monitor = ev.ModeMonitor(tiny)
    with monitor.watch():
        tiny(x[:2])
    assert monitor.report()["passed"]
    tiny.train()
    try:
        with monitor.watch():
            tiny(x[:2])
    finally:
        tiny.eval()
    rep = monitor.report()
    assert not rep["passed"] and rep["forward_calls"] == 2 and rep["training_mode_calls"] == 1


def test_check_logits_flags_probabilities(tiny, digits):
    _, _, x, _ = digits
    assert ev.check_logits(tiny, x[:32])["passed"]
    assert not ev.check_logits(nn.Sequential(tiny, nn.Softmax(dim=1)), x[:32])["passed"]


def test_check_gradients_flags_zero_gradients(tiny, digits):
    _, _, x, y = digits
    assert ev.check_gradients(tiny, x[:16], y[:16])["passed"]
    dead = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    nn.init.zeros_(dead[1].weight)
    rep = ev.check_gradients(dead, x[:16], y[:16])
    assert not rep["passed"] and rep["zero_gradient_examples"] == 16


def test_check_bounds_flags_violations():
    x = torch.full((2, 3, 4, 4), 0.5)
    assert ev.check_bounds(x, x + EPS, EPS, "linf")["passed"]
    assert not ev.check_bounds(x, x + 2 * EPS, EPS, "linf")["passed"]
    assert not ev.check_bounds(x, (x + 0.6), 1.0, "linf")["passed"]  # leaves [0, 1]
    assert not ev.check_bounds(x, x + 0.1, 0.5, "l2")["passed"]  # L2 size 0.1 * sqrt(48) > 0.5
    merged = ev.merge_bounds(ev.check_bounds(x, x + EPS, EPS, "linf"), ev.check_bounds(x, x + 2 * EPS, EPS, "linf"))
    assert not merged["passed"] and merged["max_norm"] == pytest.approx(2 * EPS)


# ----------------------------------------------------------------------------- run directory and CLI


def test_eval_cli_writes_and_merges_eval_json(run_dir):
    from typer.testing import CliRunner

    from layerlab.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--run", str(run_dir), "--attacks", "natural,fgsm,pgd20,eps-sweep",
                                 "--n", "16", "--eps-sweep", "1,8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["n"] == 16 and report["seed"] == 0 and report["eps"] == pytest.approx(EPS)
    assert set(report["results"]) == {"natural", "fgsm", "pgd20"}
    assert report["results"]["pgd20"]["settings"]["steps"] == 20
    assert len(report["eps_sweep"]["points"]) == 2 and (run_dir / "eps_sweep.png").stat().st_size > 0
    assert report["checks"]["passed"]
    result = runner.invoke(app, ["eval", "--run", str(run_dir), "--attacks", "cw100", "--n", "16", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    merged = json.loads((run_dir / "eval.json").read_text())
    assert set(merged["results"]) == {"natural", "fgsm", "pgd20", "cw100"}
    assert sorted(merged["worst_case"]["linf"]["attacks"]) == ["cw100", "fgsm", "natural", "pgd20"]
    assert "eps_sweep" in merged
    bad = runner.invoke(app, ["eval", "--run", str(run_dir), "--attacks", "pgdx", "--device", "cpu"])
    assert bad.exit_code == 2 and "unknown attack" in bad.output


def test_evaluate_run_matches_robust_accuracy(run_dir):
    report = ev.evaluate_run(run_dir, ["pgd20"], n=16, device="cpu", write=False)
    model, cfg, splits = ev.load_run(run_dir, device="cpu")
    direct = ev.robust_accuracy(model, splits.test, ev.parse_attack("pgd20", cfg.eps), limit=16, seed=0)
    assert report["results"]["pgd20"]["accuracy"] == pytest.approx(direct)
    assert report["results"]["natural"]["accuracy"] == pytest.approx(
        accuracy(model, *ev.first_examples(splits.test, 16)))


def test_run_handle_reads_a_run_and_instruments_take_it_as_a_path(st_run, tmp_path):
    from layerlab import runs
    from layerlab.analysis.cka import cka_run

    run = ev.Run(st_run)
    assert ev.Run.of(run) is run and run.name == st_run.name
    assert run.config == ev.load_run_config(st_run) and run.summary["method"] == run.config.method
    assert [r["epoch"] for r in run.metrics] == list(range(1, run.config.epochs + 1))
    splits = run.splits(torch.device("cpu"))
    assert len(splits.test) == run.config.test_size
    x, y = ev.first_examples(splits.test, 8)
    with torch.no_grad():
        a, b = run.model("best")(x), ev.load_run_model(st_run, "best")(x)
    assert torch.equal(a, b)
    by_handle = ev.evaluate_run(run, ["natural", "fgsm"], n=8, device="cpu", write=False)
    by_path = ev.evaluate_run(st_run, ["natural", "fgsm"], n=8, device="cpu", write=False)
    assert ({k: v["accuracy"] for k, v in by_handle["results"].items()}
            == {k: v["accuracy"] for k, v in by_path["results"].items()})
    _, path = cka_run(run, n=8, batch_size=4, steps=1, device="cpu", out=tmp_path / "cka.json", progress=False)
    assert runs.read_json(path)["run"] == str(st_run)
    with pytest.raises(FileNotFoundError, match="config.json"):
        ev.Run(tmp_path / "nothing").config
