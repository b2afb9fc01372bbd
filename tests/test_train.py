"""Tests for layerlab.train and layerlab.runs: schedules, NRR, resume, run-dir safety, divergence, checkpoints."""

from __future__ import annotations

import math
import os
import stat

import pytest
import torch
import torch.nn.functional as F

from layerlab import methods, runs
from layerlab.attacks import eval_mode
from layerlab.config import make_config
from layerlab.data import eval_batches
from layerlab.evaluation import model_from_checkpoint
from layerlab.methods.base import Method, Objective, Outputs
from layerlab.runs import CheckpointError, RunDirExistsError
from layerlab.callbacks import Callback
from layerlab.train import TrainingDiverged, epoch_seconds, evaluate, evaluated_epoch, lr_at, nrr, train

TIMING = ("seconds", "eval_seconds", "train_seconds_per_epoch", "final_eval_seconds", "process_seconds",
          "process_write_seconds")
EVAL_KEYS = ("natural_acc", "robust_acc", "val_natural_acc", "val_robust_acc", "eval_seconds")


def _without_timing(obj):
    """``obj`` with every wall-clock field removed, recursively."""
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def _states_equal(a, b) -> bool:
    """Exact equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b))
    return a == b


# ------------------------------------------------------------------------------- schedules, NRR


def test_lr_step_schedule_divides_by_ten_at_half_and_three_quarters():
    cfg = make_config("smoke", epochs=200, lr=0.1, schedule="step")
    assert lr_at(cfg, 0) == 0.1 and lr_at(cfg, 99) == 0.1
    assert lr_at(cfg, 100) == pytest.approx(0.01) and lr_at(cfg, 149) == pytest.approx(0.01)
    assert lr_at(cfg, 150) == pytest.approx(0.001) and lr_at(cfg, 199) == pytest.approx(0.001)
    odd = make_config("smoke", epochs=10, lr=1.0)
    assert [round(lr_at(odd, e), 6) for e in range(10)] == [1.0] * 5 + [0.1] * 3 + [0.01] * 2


def test_lr_other_schedules():
    multi = make_config("smoke", epochs=10, lr=0.2, schedule="multistep:3,6")
    assert [round(lr_at(multi, e), 6) for e in range(8)] == [0.2] * 3 + [0.02] * 3 + [0.002] * 2
    cos = make_config("smoke", epochs=8, lr=0.1, schedule="cosine")
    for e in range(8):
        assert lr_at(cos, e) == pytest.approx(0.05 * (1 + math.cos(math.pi * e / 8)))
    assert lr_at(cos, 0) == pytest.approx(0.1) and lr_at(cos, 4) == pytest.approx(0.05)
    const = make_config("smoke", epochs=8, lr=0.3, schedule="constant")
    assert {lr_at(const, e) for e in range(8)} == {0.3}
    with pytest.raises(ValueError, match="unknown schedule 'linear'.*cosine"):
        lr_at(make_config("smoke", schedule="linear"), 0)


def test_nrr_is_the_harmonic_mean():
    assert nrr(50, 50) == 50
    assert nrr(0, 0) == 0.0
    assert nrr(80, 40) == pytest.approx(2 / (1 / 80 + 1 / 40))
    assert nrr(80, 40) == nrr(40, 80)
    assert 40 < nrr(80, 40) < 60  # between min and arithmetic mean
    assert nrr(90, 0) == 0.0


# ------------------------------------------------------------------------------- evaluation cadence


def test_evaluated_epochs_follow_eval_every_the_last_epoch_and_the_lr_decays():
    def evaluated(**kw):
        cfg = make_config("smoke", epochs=10, **kw)
        return [e + 1 for e in range(cfg.epochs) if evaluated_epoch(cfg, e)]

    assert evaluated() == list(range(1, 11))  # the default evaluates every epoch
    # every 4th (4, 8), the last (10), the first epochs at lr/10 (6) and lr/100 (9: step decays at 50 % and 75 %)
    assert evaluated(eval_every=4) == [4, 6, 8, 9, 10]
    assert evaluated(eval_every=4, schedule="multistep:2,5") == [3, 4, 6, 8, 10]  # lr drops after epochs 2, 5
    assert evaluated(eval_every=4, schedule="cosine") == [4, 8, 10]  # a smooth decay has no decay epochs
    assert evaluated(eval_every=20) == [6, 9, 10]


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_eval_every_must_be_a_positive_whole_number(value):
    with pytest.raises(ValueError, match="--eval-every"):
        make_config("smoke", eval_every=value).validate()


def test_eval_every_skips_evaluations_without_changing_training_or_the_evaluated_rows(tiny_cfg, digits_splits,
                                                                                     tmp_path):
    cfg = tiny_cfg(method="at", epochs=3, schedule="constant", keep_every=1)
    every = train(cfg, tmp_path / "every", progress=False, splits=digits_splits)
    sparse = train(cfg.replace(eval_every=2), tmp_path / "sparse", progress=False, splits=digits_splits)
    rows = {name: runs.read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("every", "sparse")}
    # eval_every=1 (the default) evaluates every epoch: each row holds the per-epoch evaluation of that epoch's
    # weights, as an independent evaluation of its checkpoint gives it
    for row in rows["every"]:
        assert all(k in row for k in EVAL_KEYS)
        model = model_from_checkpoint(torch.load(tmp_path / "every" / "checkpoints" / f"epoch-{row['epoch']}.pt",
                                                 weights_only=True))
        kw = dict(eps=cfg.eps, alpha=cfg.alpha, steps=cfg.epoch_eval_steps, batch_size=cfg.eval_batch_size,
                  seed=cfg.seed)
        test = evaluate(model, digits_splits.test, limit=cfg.eval_size, **kw)
        val = evaluate(model, digits_splits.val, **kw)
        assert (row["natural_acc"], row["robust_acc"]) == (test["natural_acc"], test["robust_acc"])
        assert (row["val_natural_acc"], row["val_robust_acc"]) == (val["natural_acc"], val["robust_acc"])
    # eval_every=2: epochs 2 and 3 (the last) are evaluated, epoch 1 is not; training is the same bit for bit
    assert [all(k in r for k in EVAL_KEYS) for r in rows["sparse"]] == [False, True, True]
    assert not any(k in rows["sparse"][0] for k in EVAL_KEYS)
    assert _without_timing(rows["sparse"][1:]) == _without_timing(rows["every"][1:])
    assert _without_timing(rows["sparse"][0]) == {k: v for k, v in _without_timing(rows["every"][0]).items()
                                                  if k not in EVAL_KEYS}
    last = {name: torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["model"]
            for name in rows}
    assert _states_equal(last["sparse"], last["every"])
    assert sparse["best_epoch"] in (2, 3)  # chosen among the evaluated epochs
    assert sparse["process_write_seconds"] > 0 and every["process_write_seconds"] > 0
    assert runs.read_json(tmp_path / "sparse" / "config.json")["config"]["eval_every"] == 2


# ------------------------------------------------------------------------------- resume


class _CrashOnce(Exception):
    """Simulated kill of the process."""


def test_resume_equals_an_uninterrupted_run(tiny_cfg, digits_splits, tmp_path, monkeypatch, capsys):
    cfg = tiny_cfg(method="at", epochs=2)
    full = train(cfg, tmp_path / "full", progress=False, splits=digits_splits)
    assert capsys.readouterr() == ("", "")  # progress=False prints nothing

    # (a) stop after one epoch, then resume.
    part = train(cfg, tmp_path / "split", progress=False, splits=digits_splits, stop_after=1)
    assert part["stopped_after"] == 1 and not (tmp_path / "split" / "summary.json").exists()
    assert len(runs.read_jsonl(tmp_path / "split" / "metrics.jsonl")) == 1
    resumed = train(cfg, tmp_path / "split", progress=False, splits=digits_splits, resume=True)

    # (b) killed while writing epoch 2's metrics row, (c) killed after it, before epoch 2's last.pt:
    # either way resume must redo epoch 2 exactly once.
    real_save, real_append = runs.save_checkpoint, runs.append_jsonl

    def crash_in_append(path, row):
        if row["epoch"] == 2:
            raise _CrashOnce
        real_append(path, row)

    def crash_before_last(path, model, meta, **extra):
        if extra.get("epoch") == 2:
            raise _CrashOnce
        real_save(path, model, meta, **extra)

    results = {"split": resumed}
    for name, attr, crash in (("crash-append", "append_jsonl", crash_in_append),
                              ("crash-save", "save_checkpoint", crash_before_last)):
        monkeypatch.setattr(runs, attr, crash)
        with pytest.raises(_CrashOnce):
            train(cfg, tmp_path / name, progress=False, splits=digits_splits)
        monkeypatch.undo()
        results[name] = train(cfg, tmp_path / name, progress=False, splits=digits_splits, resume=True)

    ref_last = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    ref_best = torch.load(tmp_path / "full" / "checkpoints" / "best.pt", weights_only=True)
    ref_metrics = _without_timing(runs.read_jsonl(tmp_path / "full" / "metrics.jsonl"))
    assert [r["epoch"] for r in ref_metrics] == [1, 2]
    for name, summary in results.items():
        last = torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)
        best = torch.load(tmp_path / name / "checkpoints" / "best.pt", weights_only=True)
        assert _states_equal(last["model"], ref_last["model"]), name
        assert _states_equal(last["optimizer"], ref_last["optimizer"]), name
        assert _states_equal(best["model"], ref_best["model"]), name
        assert _without_timing(runs.read_jsonl(tmp_path / name / "metrics.jsonl")) == ref_metrics, name
        assert _without_timing(summary) == _without_timing(full), name
        # the run's time counts every process that trained it: the resumed epochs and the final evaluation
        metrics = runs.read_jsonl(tmp_path / name / "metrics.jsonl")
        assert summary["seconds"] == pytest.approx(epoch_seconds(metrics) + summary["final_eval_seconds"]), name
        assert len(metrics) == 2 and summary["process_seconds"] > 0, name
        assert runs.read_json(tmp_path / name / "config.json")["config"] == cfg.to_dict()


def test_checkpoints_load_weights_only_and_describe_the_model(st_run, digits_splits):
    last = torch.load(st_run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    best = torch.load(st_run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    assert {"model", "meta", "optimizer", "method", "config", "epoch", "best_score", "best_epoch"} <= set(last)
    assert set(best) == {"model", "meta"}
    meta = best["meta"]
    assert {k: meta[k] for k in ("model", "width", "num_classes", "dataset", "method", "epoch")} == {
        "model": "resnet18", "width": 0.0625, "num_classes": 10, "dataset": "digits", "method": "st", "epoch": 1}
    assert meta["mean"] == pytest.approx(list(digits_splits.mean)) and meta["std"] == pytest.approx(list(digits_splits.std))
    # The metadata alone rebuilds a model whose natural accuracy matches the summary's "best" evaluation.
    model = model_from_checkpoint(best)
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in eval_batches(digits_splits.test, 64))
    summary = runs.read_json(st_run / "summary.json")
    assert 100.0 * correct / len(digits_splits.test) == pytest.approx(summary["best"]["natural_acc"])
    assert summary["method"] == "st" and summary["epochs"] == 1 and summary["n_test"] == len(digits_splits.test)


def test_evaluate_matches_an_independent_count(st_run, digits_splits):
    model = model_from_checkpoint(runs.load_checkpoint(st_run))
    res = evaluate(model, digits_splits.test, eps=8 / 255, alpha=2 / 255, steps=0, limit=20, batch_size=8)
    assert res["n"] == 20 and "robust_acc" not in res
    x = digits_splits.test.images[:20].float() / 255
    with torch.no_grad():
        expected = int((model(x).argmax(1) == digits_splits.test.labels[:20]).sum())
    assert res["natural_acc"] == pytest.approx(100.0 * expected / 20)
    adv = evaluate(model, digits_splits.test, eps=8 / 255, alpha=2 / 255, steps=2, limit=20, batch_size=8)
    assert adv["robust_acc"] <= adv["natural_acc"] and adv["n"] == 20


# ------------------------------------------------------------------------------- run-dir safety


def test_existing_run_dir_is_refused_and_untouched(st_run, tiny_cfg, digits_splits, snapshot_files):
    before = snapshot_files(st_run)
    with pytest.raises(RunDirExistsError, match="--resume.*--overwrite"):
        train(tiny_cfg(method="st"), st_run, progress=False, splits=digits_splits)
    assert snapshot_files(st_run) == before


def test_a_run_dir_being_trained_is_refused_to_another_process(st_run, tiny_cfg, digits_splits, snapshot_files,
                                                                tmp_path):
    """The lock is per process (flock): a child process holds it, this one is refused and writes nothing."""
    import subprocess
    import sys

    before = snapshot_files(st_run)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from layerlab import runs\n"
                               f"with runs.run_lock({str(st_run)!r}):\n print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(runs.RunDirBusyError, match=f"being trained by pid {holder.pid}.*another --out"):
            train(tiny_cfg(method="st"), st_run, resume=True, progress=False, splits=digits_splits)
    finally:
        holder.kill()
        holder.wait()
    assert snapshot_files(st_run) == before
    with runs.run_lock(st_run):  # released when the holder died
        pass


def test_saved_configs_compare_by_what_changes_training():
    cfg = make_config("smoke")
    saved = cfg.to_dict()
    del saved["keep_every"]  # written before the field existed: counts as the default
    assert cfg.replace(keep_every=0).differences(saved) == []
    assert cfg.replace(keep_every=5).differences(saved) == []  # output only
    assert cfg.replace(epochs=9).differences(saved) == [f"epochs: {cfg.epochs!r} vs 9"]


def test_run_dir_without_files_is_reused(tmp_path):
    """A run that failed before writing anything (e.g. data not found) does not block the next attempt."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert runs.prepare_run_dir(tmp_path / "run") == tmp_path / "run"
    (tmp_path / "run" / "notes.txt").write_text("x")
    with pytest.raises(RunDirExistsError):
        runs.prepare_run_dir(tmp_path / "run")
    runs.prepare_run_dir(tmp_path / "run", overwrite=True)
    assert not (tmp_path / "run" / "notes.txt").exists() and (tmp_path / "run" / "checkpoints").is_dir()
    with pytest.raises(CheckpointError, match="cannot resume"):
        runs.prepare_run_dir(tmp_path / "run", resume=True)


# ------------------------------------------------------------------------------- divergence


class _NaNAfter(Objective):
    """Cross-entropy that turns NaN from epoch ``start`` on (to test the divergence guard)."""

    name = "nan"

    def __init__(self, start: int):
        self.start = start

    def loss(self, model, x, x_adv, y, ctx):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return Outputs(loss * float("nan") if ctx.epoch >= self.start else loss, logits_nat=logits)


class _CopyLast(Callback):
    """Keeps the bytes of last.pt at the end of each epoch."""

    def __init__(self):
        self.saved: dict[int, bytes] = {}

    def on_epoch_end(self, epoch, model, run_dir):
        self.saved[epoch] = (run_dir / "checkpoints" / "last.pt").read_bytes()


@pytest.fixture
def nan_method(monkeypatch):
    """Registers ``nan-at-N`` methods for this test only."""
    for start in (0, 1):
        monkeypatch.setitem(methods.METHODS, f"nan-at-{start}",
                            (lambda start=start: Method(f"nan-at-{start}", _NaNAfter(start)), "test only"))


def test_nan_loss_stops_training_and_keeps_last_checkpoint(nan_method, tiny_cfg, digits_splits, tmp_path):
    run_dir = tmp_path / "nan"
    spy = _CopyLast()
    with pytest.raises(TrainingDiverged) as info:
        train(tiny_cfg(method="nan-at-1", epochs=2), run_dir, progress=False, splits=digits_splits, callbacks=[spy])
    msg = str(info.value)
    last = run_dir / "checkpoints" / "last.pt"
    assert "nan" in msg and "epoch 2, step 1" in msg
    assert f"last good checkpoint is {last} (epoch 1)" in msg and "--lr" in msg
    assert list(spy.saved) == [1] and last.read_bytes() == spy.saved[1]
    state = runs.load_checkpoint(last)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in runs.read_jsonl(run_dir / "metrics.jsonl")] == [1]
    assert not (run_dir / "summary.json").exists()
    # Resuming goes back to the good epoch-1 weights (and diverges again, deterministically).
    with pytest.raises(TrainingDiverged, match="epoch 2, step 1"):
        train(tiny_cfg(method="nan-at-1", epochs=2), run_dir, progress=False, splits=digits_splits, resume=True)
    assert last.read_bytes() == spy.saved[1]


def test_nan_in_first_epoch_names_no_checkpoint(nan_method, tiny_cfg, digits_splits, tmp_path):
    with pytest.raises(TrainingDiverged) as info:
        train(tiny_cfg(method="nan-at-0"), tmp_path / "nan0", progress=False, splits=digits_splits)
    msg = str(info.value)
    assert "epoch 1, step 1" in msg and "no checkpoint was saved yet" in msg and "last.pt" not in msg
    assert not (tmp_path / "nan0" / "checkpoints" / "last.pt").exists()


# ------------------------------------------------------------------------------- checkpoints (runs.py)


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a readable checkpoint.*last.pt or best.pt"):
        runs.load_checkpoint(path)


def test_torch_file_without_keys_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match=r"not a layerlab checkpoint \(needs keys \['model', 'meta'\]\)"):
        runs.load_checkpoint(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="not a layerlab checkpoint"):
        runs.load_checkpoint(path)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "meta": {}, "obj": _CrashOnce()}, path)  # an arbitrary object: not weights only
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        runs.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        runs.load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_of_another_architecture_as_init(st_run, tiny_cfg, digits_splits, tmp_path):
    init = st_run / "checkpoints" / "best.pt"
    with pytest.raises(CheckpointError) as info:
        train(tiny_cfg(method="at", model="preactresnet18", init=str(init)), tmp_path / "x", progress=False,
              splits=digits_splits)
    msg = str(info.value)
    assert f"--init {init} holds a resnet18 (width 0.0625, 10 classes)" in msg
    assert "requested preactresnet18" in msg and "--model/--width/--dataset" in msg
    with pytest.raises(CheckpointError, match="width 0.0625.*width 0.125"):
        train(tiny_cfg(method="at", width=0.125, init=str(init)), tmp_path / "y", progress=False, splits=digits_splits)


def test_atomic_writes_leave_no_temp_files_and_normal_permissions(tmp_path, monkeypatch):
    from layerlab.models import build_model

    model = build_model("resnet18", width=0.0625)
    for i in range(3):
        runs.write_json(tmp_path / "a.json", {"i": i})
        runs.save_checkpoint(tmp_path / "ck.pt", model, {"i": i})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "ck.pt"]
    assert runs.read_json(tmp_path / "a.json") == {"i": 2}
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives under the current umask
    for name in ("a.json", "ck.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == stat.S_IMODE(plain.stat().st_mode), name
    plain.unlink()

    # A failing write leaves the previous file intact and no temporary file behind.
    before = (tmp_path / "ck.pt").read_bytes()

    def broken_save(obj, path):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        runs.save_checkpoint(tmp_path / "ck.pt", model, {"i": 9})
    assert (tmp_path / "ck.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "ck.pt"]
    with pytest.raises(TypeError):
        runs.save_checkpoint(tmp_path / "ck.pt", model, {"bad": object()})  # metadata must be JSON


def test_jsonl_roundtrip(tmp_path):
    path = tmp_path / "m.jsonl"
    assert runs.read_jsonl(path) == []
    rows = [{"epoch": 1, "acc": 0.5}, {"epoch": 2, "acc": None}]
    for r in rows:
        runs.append_jsonl(path, r)
    assert runs.read_jsonl(path) == rows


def test_evaluation_runs_in_eval_mode_and_restores_flags(st_run, digits_splits):
    model = model_from_checkpoint(runs.load_checkpoint(st_run))
    model.train()
    model.block2.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    evaluate(model, digits_splits.test, eps=8 / 255, alpha=2 / 255, steps=1, limit=16)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())  # BN statistics untouched
    with eval_mode(model):
        assert not any(m.training for m in model.modules())


def test_loading_a_checkpoint_leaves_the_global_rng_alone(st_run):
    state = runs.load_checkpoint(st_run)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model_from_checkpoint(state)
    assert torch.equal(torch.rand(3), expected)
