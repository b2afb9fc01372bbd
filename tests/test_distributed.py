"""Distributed training (layerlab.distributed): DDP on 2 CPU processes (gloo) against one process, and
independent study runs spread over GPUs.

The equivalence test trains AT, CURE and RWP with 2 processes x 8 examples and compares every step with
one process training the same global batches of 16. On CPU each rank normalizes with its own shard's
BatchNorm statistics (SyncBatchNorm needs a GPU). The one-process reference reproduces exactly this
per-rank effect — a BatchNorm that normalizes each rank's positions of the batch separately (running
statistics from rank 0's shard, which DDP broadcasts) — and nothing else: the DDP side runs the
production code unchanged, so gradient averaging, the PGD random starts (each rank's rows of the global
batch's draw), the all-reduced RGP gradients, the synchronized RWP statistics and the revision draws are
what is tested.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layerlab import distributed, runs
from layerlab import train as trainer
from layerlab.config import make_config
from layerlab.methods.base import Method
from layerlab.methods.cure import Revision, RGPMask
from layerlab.methods.perturbation import WeightPerturbation

WORLD = 2
# 64 training examples in global batches of 16: 4 steps per epoch, 8 examples per rank.
BASE = dict(dataset="digits", width=0.0625, epochs=1, batch_size=16, train_size=64, val_size=32, test_size=32,
            eval_size=32, eval_batch_size=64, attack_steps=2, epoch_eval_steps=1, eval_steps=2, lr=0.05,
            device="cpu", seed=0)
# name -> (method, method args, epochs). r=0.9/d=0.5 make the revision model fire often and move visibly;
# c_min=2.45 lets part of each batch qualify for RWP. The DDP side trains CURE's 2 epochs as 1 + a resume.
TASKS = {
    "at": ("at", {}, 1),
    "cure": ("cure", {"r": 0.9, "d": 0.5}, 2),
    "rwp": ("rwp", {"c_min": 2.45, "steps": 3}, 1),
    "at-remove": ("at-remove", {"c_min": 2.3}, 1),  # the kept count is the global batch's
}
STEPS = 64 // 16  # per epoch


def _config(name: str, **overrides):
    method, args, epochs = TASKS[name]
    return make_config("smoke", **{**BASE, "method": method, "method_args": args, "epochs": epochs, **overrides})


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


REAL_TRAIN_STEP = Method.train_step
REAL_BUILD = trainer.build_run_model


def _to_float64(module: nn.Module, args: tuple) -> tuple:
    return (args[0].double(),)


def _build_float64(cfg, splits) -> nn.Module:
    """The run's model in float64 (inputs cast on entry): the comparison with one process then is not
    dominated by float32 rounding, which PGD's sign() steps and the mask's ranking would amplify."""
    model = REAL_BUILD(cfg, splits).double()
    model.register_forward_pre_hook(_to_float64)
    return model


def _record_steps(records: list[dict]):
    """A Method.train_step that records, after every step, the weights and what each component decided."""
    original = REAL_TRAIN_STEP

    def train_step(self, model, x, y, optimizer, ctx):
        out = original(self, model, x, y, optimizer, ctx)
        plain = distributed.unwrap(model)
        rec = {"params": _flat(plain.parameters()), "buffers": _flat(plain.buffers()), "n": len(y)}
        for c in self.components:
            if isinstance(c, RGPMask):
                rec["mask"] = _flat(c.masks.values())
            if isinstance(c, Revision):
                rec["revisions"] = c.revisions
                rec["revision"] = _flat(c.model.state_dict().values())
            if isinstance(c, WeightPerturbation):
                rec["wp"] = dict(c._last)
        records.append(rec)
        return out

    return train_step


def _write_audit(root: Path, writes: list[str]):
    """An audit hook noting every file-system change under ``root`` made by this process."""
    root_s = str(root)
    flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if event == "open":
            path, mode, oflags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((oflags or 0) & flags)
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree"):
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(root_s):
            writes.append(f"{event} {os.fsdecode(path)}")

    return hook


def _worker(rank: int, port: int, out: str, splits) -> None:
    """One DDP rank, started the way torchrun starts it (environment variables)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LAYERLAB_DIST_TIMEOUT_MINUTES="2")
    torch.set_num_threads(1)
    from layerlab.cli import app

    root = Path(out)
    writes: list[str] = []
    sys.addaudithook(_write_audit(root / "runs", writes))
    records: dict[str, list[dict]] = {}
    result: dict = {"records": records, "writes": writes}
    with distributed.launch("cpu") as created:
        result["created"] = created and distributed.active() and distributed.world_size() == WORLD
        trainer.build_run_model = _build_float64
        for name in TASKS:
            records[name] = []
            Method.train_step = _record_steps(records[name])
            run_dir = root / "runs" / name
            if name == "cure":  # resume under DDP: every rank loads last.pt
                result["cure_stopped"] = trainer.train(_config(name), run_dir, progress=False, splits=splits,
                                                       stop_after=1)
            result[name] = trainer.train(_config(name), run_dir, progress=False, splits=splits,
                                         resume=name == "cure")
        trainer.build_run_model = REAL_BUILD
        # The CLI under torchrun (float32, the production path): only rank 0 prints.
        records["cli"] = []
        Method.train_step = _record_steps(records["cli"])
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            app(["train", "--method", "at", "--profile", "smoke", "--width", "0.0625", "--train-size", "64",
                 "--test-size", "32", "--val-size", "32", "--epochs", "1", "--batch-size", "16",
                 "--attack-steps", "1", "--eval-steps", "1", "--device", "cpu", "--no-progress",
                 "--out", str(root / "runs" / "cli")], standalone_mode=False)
        result["cli_stdout"] = text.getvalue()
        Method.train_step = REAL_TRAIN_STEP
        try:  # a global batch that does not split over the ranks is refused on every rank
            trainer.train(_config("at", batch_size=15), root / "runs" / "odd", progress=False, splits=splits)
        except ValueError as err:
            result["odd_batch_error"] = str(err)
    result["torn_down"] = not torch.distributed.is_initialized()
    torch.save(result, root / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory, digits_splits):
    """Run the 2-process job once; returns (output directory, rank 0 result, rank 1 result)."""
    import torchvision  # noqa: F401  (imported here once: forked ranks inherit it and the modules below)

    import layerlab.analysis.layer_stats  # noqa: F401
    import layerlab.cli  # noqa: F401

    out = tmp_path_factory.mktemp("ddp")
    # fork (Linux) saves each rank re-importing torch; this process runs torch single-threaded (conftest).
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    torch.multiprocessing.start_processes(_worker, args=(_free_port(), str(out), digits_splits), nprocs=WORLD,
                                          join=True, start_method=method)
    return out, torch.load(out / "rank0.pt", weights_only=False), torch.load(out / "rank1.pt", weights_only=False)


# --------------------------------------------------------------- the one-process reference


class _ShardBatchNorm(nn.BatchNorm2d):
    """Training-mode statistics per rank shard (positions r::WORLD of the batch); running statistics from
    rank 0's shard: what per-rank BatchNorm computes under DDP with rank 0's buffers broadcast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        parts = [F.batch_norm(x[r::WORLD], self.running_mean if r == 0 else None,
                              self.running_var if r == 0 else None, self.weight, self.bias, True,
                              self.momentum, self.eps) for r in range(WORLD)]
        return torch.stack(parts, 1).flatten(0, 1)


@pytest.fixture
def one_process_like_ranks(monkeypatch):
    """Patch one process to reproduce the per-rank BatchNorm statistics (nothing else differs: the ranks
    draw their PGD random starts as rows of the global batch's draw)."""

    def build(cfg, splits):
        model = _build_float64(cfg, splits)
        for m in model.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = _ShardBatchNorm
        return model

    monkeypatch.setattr(trainer, "build_run_model", build)

    def run(name, out, splits):
        records: list[dict] = []
        monkeypatch.setattr(Method, "train_step", _record_steps(records))
        summary = trainer.train(_config(name), out, progress=False, splits=splits)
        return summary, records

    return run


# --------------------------------------------------------------------------------- DDP tests


def test_process_group_from_torchrun_environment_and_teardown(ddp_results):
    _, r0, r1 = ddp_results
    assert r0["created"] and r1["created"]
    assert r0["torn_down"] and r1["torn_down"]


@pytest.mark.parametrize("name", [*TASKS, "cli"])
def test_ranks_hold_identical_weights_after_every_step(ddp_results, name):
    _, r0, r1 = ddp_results
    a, b = r0["records"][name], r1["records"][name]
    assert len(a) == len(b) == STEPS * (TASKS[name][2] if name in TASKS else 1)  # drop_last: every rank, every step
    assert all(s["n"] == 8 for s in a + b)  # global batch 16 = 2 x 8
    for s0, s1 in zip(a, b):
        assert torch.equal(s0["params"], s1["params"])
        for key in ("mask", "revision", "revisions", "wp"):
            if key in s0:
                assert (torch.equal(s0[key], s1[key]) if isinstance(s0[key], torch.Tensor)
                        else s0[key] == s1[key]), key
    assert not torch.equal(a[0]["params"], a[-1]["params"])  # it did train


@pytest.mark.parametrize("name", list(TASKS))
def test_two_processes_equal_one_process_with_the_global_batch(ddp_results, one_process_like_ranks,
                                                               digits_splits, tmp_path, name):
    _, r0, _ = ddp_results
    summary, ref = one_process_like_ranks(name, tmp_path / name, digits_splits)
    ddp = r0["records"][name]
    assert len(ref) == len(ddp)
    for step, (d, s) in enumerate(zip(ddp, ref)):
        # float64 rounding differences only (a missing reduction or mask sync shows up at ~1e-2)
        assert torch.allclose(d["params"], s["params"], rtol=1e-6, atol=1e-8), f"step {step}"
        assert torch.allclose(d["buffers"], s["buffers"], rtol=1e-6, atol=1e-8), f"step {step}"
        if "mask" in d:  # the CURE mask comes from the all-reduced gradients: the global batch's RGP
            assert torch.equal(d["mask"], s["mask"]) and d["mask"].any()
            assert d["revisions"] == s["revisions"]
            assert torch.allclose(d["revision"], s["revision"], rtol=1e-6, atol=1e-8)
        if "wp" in d:  # global qualifying count, same number of K2 ascent steps
            assert d["wp"] == s["wp"]
    for key in ("natural_acc", "robust_acc", "nrr"):  # rank 0 evaluated the same model
        assert r0[name][key] == summary[key]
        assert r0[name]["best"][key] == summary["best"][key]
    if name == "cure":
        assert ddp[-1]["revisions"] > 0
        assert r0[name]["revision"]["robust_acc"] == summary["revision"]["robust_acc"]
    if name == "rwp":  # the test exercises partial qualification and several ascent steps
        qualified = [d["wp"]["qualified"] for d in ddp]
        assert any(0 < q < 16 for q in qualified) and any(d["wp"]["steps"] > 1 for d in ddp)
    if name == "at-remove":  # some examples removed, counted over the global batches
        out = ddp_results[0] / "runs" / name / "metrics.jsonl"
        [got], [want] = runs.read_jsonl(out), runs.read_jsonl(tmp_path / name / "metrics.jsonl")
        assert 0 < got["removal_rate"] < 1 and (got["removal_rate"], got["removed"]) == (want["removal_rate"],
                                                                                       want["removed"])


def test_metrics_are_those_of_the_global_batches(ddp_results, one_process_like_ranks, digits_splits, tmp_path):
    out, _, _ = ddp_results
    one_process_like_ranks("at", tmp_path / "at", digits_splits)
    got, want = runs.read_jsonl(out / "runs" / "at" / "metrics.jsonl"), runs.read_jsonl(tmp_path / "at" / "metrics.jsonl")
    assert len(got) == len(want) == 1
    assert got[0]["train_loss"] == pytest.approx(want[0]["train_loss"], rel=1e-9)
    for key in ("train_acc", "natural_acc", "robust_acc", "val_natural_acc", "val_robust_acc"):
        assert got[0][key] == want[0][key]


def test_only_rank_zero_writes_files(ddp_results):
    out, r0, r1 = ddp_results
    assert r1["writes"] == []
    written = " ".join(r0["writes"])
    for name in ("at", "cure", "rwp", "cli"):
        for part in ("config.json", "metrics.jsonl", "summary.json", "layer_stats.jsonl", "last.pt", "best.pt"):
            assert (out / "runs" / name / ("checkpoints" if part.endswith(".pt") else "") / part).exists()
        assert f"runs/{name}/checkpoints" in written


def test_checkpoints_hold_the_plain_model(ddp_results, digits_splits):
    out, _, _ = ddp_results
    state = runs.load_checkpoint(out / "runs" / "cure" / "checkpoints" / "last.pt")
    model = trainer.build_run_model(_config("cure"), digits_splits)
    runs.load_weights(model, state)  # no "module." prefixes: loads into a plain model
    assert set(state["method"]["revision"]["model"]) == set(model.state_dict())


def test_resume_under_ddp_continues_the_run(ddp_results):
    # The 2-epoch CURE run stopped after epoch 1 and was resumed; its equality with one uninterrupted
    # process is checked step by step above. Here: both parts ran and the metrics hold each epoch once.
    out, r0, r1 = ddp_results
    assert r0["cure_stopped"]["stopped_after"] == r1["cure_stopped"]["stopped_after"] == 1
    assert [r["epoch"] for r in runs.read_jsonl(out / "runs" / "cure" / "metrics.jsonl")] == [1, 2]
    assert runs.load_checkpoint(out / "runs" / "cure" / "checkpoints" / "last.pt")["epoch"] == 2
    assert r1["cure"] == r0["cure"]  # every rank returns rank 0's summary


def test_cli_prints_once_and_a_batch_that_does_not_split_is_refused(ddp_results):
    _, r0, r1 = ddp_results
    assert r0["cli_stdout"].startswith("at: natural") and r1["cli_stdout"] == ""
    for r in (r0, r1):
        assert "batch size 15 does not split over 2 processes" in r["odd_batch_error"]


# ------------------------------------------------------------------------- helpers, no processes


def test_collectives_are_no_ops_on_one_process():
    t = torch.tensor([1.0, 2.0])
    distributed.all_reduce_mean_([t])
    distributed.all_reduce_sum_([t])
    distributed.broadcast_([t])
    assert t.tolist() == [1.0, 2.0]
    assert distributed.on_main(lambda: 7) == 7 and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.per_rank_batch(15) == 15
    with distributed.launch("cpu") as created:  # no torchrun environment: nothing to do
        assert not created and not distributed.active()


def test_sync_batchnorm_keeps_parameters_and_frozen_statistics(digits_splits):
    cfg = _config("at", update="23")
    model = trainer.build_run_model(cfg, digits_splits)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    distributed.sync_batchnorm(model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
    assert all(p is params[n] for n, p in model.named_parameters())  # the optimizer's tensors
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32))  # no process group: plain BatchNorm statistics
    state = model.state_dict()
    assert torch.equal(state["block1.0.bn1.running_mean"], before["block1.0.bn1.running_mean"])  # frozen
    assert not torch.equal(state["block2.0.bn1.running_mean"], before["block2.0.bn1.running_mean"])  # trained


def test_gpu_lists_are_checked():
    assert distributed.parse_gpus("0,1") == [0, 1] and distributed.parse_gpus(" 2 ") == [2]
    for bad in ("", "a", "0,0", "-1"):
        with pytest.raises(ValueError, match="--gpus"):
            distributed.parse_gpus(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_freeze_study_gpus_is_refused_without_cuda(tmp_path):
    from typer.testing import CliRunner

    from layerlab.cli import app

    result = CliRunner().invoke(app, ["freeze-study", "--blocks", "23", "--gpus", "0,1", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "--gpus needs CUDA GPUs but none is available" in result.output
    assert not any(tmp_path.iterdir())


def test_jobs_run_at_most_one_per_device_and_failures_are_reported(tmp_path):
    script = ("import os, sys, time; d = os.environ['CUDA_VISIBLE_DEVICES']; t = time.time(); time.sleep(0.4); "
              "print(d, t, time.time()); sys.exit(int(sys.argv[1]))")
    jobs = [distributed.Job(f"j{i}", [sys.executable, "-c", script, str(int(i == 2) * 3)], tmp_path / f"j{i}.log")
            for i in range(5)]
    messages: list[str] = []
    codes = distributed.run_on_devices(jobs, ["4", "7"], echo=messages.append)
    assert codes == {"j0": 0, "j1": 0, "j2": 3, "j3": 0, "j4": 0}
    spans = []
    for job in jobs:
        device, start, end = job.log.read_text().split()
        spans.append((device, float(start), float(end)))
    assert {d for d, _, _ in spans} == {"4", "7"}
    for device in ("4", "7"):  # jobs on one device never overlap
        mine = sorted((s, e) for d, s, e in spans if d == device)
        assert all(e1 <= s2 for (_, e1), (s2, _) in itertools.pairwise(mine))
    assert any("j2: FAILED (exit 3)" in m for m in messages)


@pytest.mark.slow
def test_study_on_gpus_trains_the_runs_in_subprocesses_like_the_sequential_study(st_run, tmp_path, monkeypatch):
    from layerlab.study import run_freeze_study

    cfg = make_config("smoke", **{**BASE, "train_size": 32, "batch_size": 32, "device": "auto"})
    base = str(st_run / "checkpoints" / "best.pt")
    kw = dict(base=base, sat=False, progress=False)
    sequential = run_freeze_study(cfg.replace(device="cpu"), "23,4", tmp_path / "seq", **kw)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # children see no GPU and train on the CPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    parallel = run_freeze_study(cfg, "23,4", tmp_path / "par", gpus=[0, 1], **kw)
    assert [r["run"] for r in parallel] == [r["run"] for r in sequential] == ["U-23", "U-4"]
    for p, s in zip(parallel, sequential):
        for key in ("natural_acc", "robust_acc", "nrr", "trainable_params", "best_epoch"):
            assert p[key] == s[key], key
    logs = sorted(p.name for p in (tmp_path / "par" / "logs").iterdir())
    assert logs == ["U-23.log", "U-4.log"]
    assert "U-23: natural" in (tmp_path / "par" / "logs" / "U-23.log").read_text()
    assert (tmp_path / "par" / "study.csv").read_text().count("\n") == 3
