"""The one trainer: data -> model -> method steps -> run directory.

Every method (``st``, ``at``, ``trades``, CURE, AWP, RWP, MART, ...) runs through
:func:`train`; the CLI and the notebooks call it. Randomness is seeded per epoch from the
run's seed, so ``resume`` continues an interrupted run to the same result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from layerlab import distributed, runs
from layerlab.analysis.layer_stats import GradStats, block_summary
from layerlab.attacks import eval_mode, pgd
from layerlab.callbacks import Callback
from layerlab.config import TrainConfig, profile_of
from layerlab.data import ImageSet, Splits, eval_batches, load_splits, train_batches
from layerlab.layerwise import apply_update_spec, block_report, trainable_parts
from layerlab.methods import AttackSettings, Method, StepContext, build_method
from layerlab.models import build_model
from layerlab.progress import bar as progress_bar, note


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; under torchrun ``cuda`` is this process's GPU."""
    if name == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return distributed.local_device(torch.device(name))


def splits_for(cfg: TrainConfig, *, device: torch.device | None = None, data_dir: str | None = None) -> Splits:
    """The data splits ``cfg`` trains and evaluates on (``data_dir`` overrides the config's), on ``device``
    (default: the config's device)."""
    return load_splits(cfg.dataset, data_dir or cfg.data_dir, download=cfg.download, train_size=cfg.train_size,
                       test_size=cfg.test_size, val_size=cfg.val_size, seed=cfg.seed,
                       device=resolve_device(cfg.device) if device is None else device)


def nrr(natural: float, robust: float) -> float:
    """Natural-robust ratio, the harmonic mean 2*nat*rob/(nat+rob) (CURE Eq. 9)."""
    return 0.0 if natural + robust == 0 else 2 * natural * robust / (natural + robust)


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate of 0-based ``epoch``: ``step`` (/10 at 50% and 75%), ``multistep:E1,E2``,
    ``cosine`` or ``constant``."""
    kind, _, arg = cfg.schedule.partition(":")
    if kind == "step":
        milestones = [cfg.epochs * 0.5, cfg.epochs * 0.75]
    elif kind == "multistep":
        milestones = [float(m) for m in arg.split(",") if m]
    elif kind == "cosine":
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * epoch / max(1, cfg.epochs)))
    elif kind == "constant":
        return cfg.lr
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}; use step, multistep:E1,E2, cosine or constant")
    return cfg.lr * 0.1 ** sum(epoch >= m for m in milestones)


def evaluated_epoch(cfg: TrainConfig, epoch: int) -> bool:
    """Whether 0-based ``epoch`` ends with the per-epoch evaluation: every ``eval_every``-th epoch, the last
    epoch, and the first epoch at each decayed learning rate of a ``step``/``multistep`` schedule (where the
    best robust accuracy of robust overfitting usually lies)."""
    stepped = cfg.schedule.partition(":")[0] in ("step", "multistep")
    decayed = stepped and epoch > 0 and lr_at(cfg, epoch) < lr_at(cfg, epoch - 1)
    return (epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1 or decayed


def evaluate(model: nn.Module, data: ImageSet, *, eps: float, alpha: float, steps: int, norm: str = "linf",
             batch_size: int = 256, seed: int = 0, limit: int | None = None, progress: bool = False,
             desc: str = "evaluation") -> dict[str, float]:
    """Natural and PGD accuracy (percent) on the first ``limit`` examples of ``data``; steps=0 skips PGD.
    ``progress`` shows a bar over the batches named ``desc``."""
    correct_nat = correct_adv = total = 0
    generator = torch.Generator(data.images.device).manual_seed(seed)
    n = len(data) if limit is None else min(limit, len(data))
    batches = progress_bar(eval_batches(data, batch_size), desc=desc, total=math.ceil(n / batch_size),
                           progress=progress, unit="batch")
    with eval_mode(model), batches:
        for x, y in batches:
            if limit is not None and total >= limit:
                break
            if limit is not None:
                x, y = x[: limit - total], y[: limit - total]
            with torch.no_grad():
                correct_nat += int((model(x).argmax(1) == y).sum())
            if steps > 0:
                x_adv = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, generator=generator)
                with torch.no_grad():
                    correct_adv += int((model(x_adv).argmax(1) == y).sum())
            total += len(y)
    result = {"natural_acc": 100.0 * correct_nat / max(1, total), "n": total}
    if steps > 0:
        result["robust_acc"] = 100.0 * correct_adv / max(1, total)
    return result


@dataclass
class Setup:
    """Everything a run trains: data, model, method, optimizer."""

    cfg: TrainConfig
    splits: Splits
    model: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    device: torch.device
    # What the training steps call: DDP(model) under torchrun and/or torch.compile(...) when cfg.compile, else
    # None (= model). ``model`` stays the plain module, so checkpoints, evaluation and callbacks see unprefixed
    # parameter names.
    step_model: nn.Module | None = None
    # What the per-epoch evaluation calls: torch.compile(model) when cfg.compile (the step model itself on one
    # process), else None (= model). The final evaluation stays eager (fp32).
    eval_model: nn.Module | None = None


def build_run_model(cfg: TrainConfig, splits: Splits) -> nn.Module:
    """The model of ``cfg``: built from the seed, loaded from ``cfg.init`` and frozen/re-initialized
    per ``cfg.update`` (on the CPU, so initialization does not depend on the device)."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, num_classes=splits.num_classes, width=cfg.width,
                        mean=splits.mean, std=splits.std)
    if cfg.init:
        runs.load_weights(model, runs.load_checkpoint(cfg.init), source=f"--init {cfg.init}")
    if cfg.update:
        apply_update_spec(model, cfg.update, reinit=cfg.reinit, reset_bn=cfg.reset_bn, seed=cfg.seed,
                          train_stem=cfg.train_stem, frozen_bn=cfg.frozen_bn)
    return model


def setup(cfg: TrainConfig, splits: Splits | None = None) -> Setup:
    """Data, model, method and optimizer for ``cfg`` (``splits`` may be passed to share loaded data)."""
    device = resolve_device(cfg.device)
    if splits is None:
        splits = splits_for(cfg, device=device)
    model = build_run_model(cfg, splits).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if distributed.active():
        distributed.per_rank_batch(cfg.batch_size, len(splits.train))  # fail now when the batch does not split
        if device.type == "cuda":
            distributed.sync_batchnorm(model)  # global-batch statistics, as on one process (CPU: per rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN time and pick the fastest kernels
    method = build_method(cfg.method, cfg.method_args)
    method.setup(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: the update spec freezes the whole model")
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    step_model = distributed.wrap(model, device) if distributed.active() else None  # DDP averages gradients
    eval_model = None
    if cfg.compile:
        # CURE's RGP mask backpropagates twice through one graph (retain_graph=True), which compiled backward
        # graphs refuse when they donate their saved buffers.
        torch._functorch.config.donated_buffer = False
        eval_model = torch.compile(model)  # shares parameters and buffers
        step_model = eval_model if step_model is None else torch.compile(step_model)
    return Setup(cfg, splits, model, method, optimizer, device, step_model, eval_model)


def _meta(cfg: TrainConfig, s: Setup, epoch: int) -> dict[str, Any]:
    """JSON-able metadata stored in every checkpoint (enough to rebuild the model)."""
    return {"model": cfg.model, "width": cfg.width, "num_classes": s.splits.num_classes,
            "dataset": s.splits.name, "mean": list(s.splits.mean), "std": list(s.splits.std),
            "method": cfg.method, "epoch": epoch, "seed": cfg.seed, "update": cfg.update}


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for (CUDA or CPU), else a no-op."""
    if not cfg.amp:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _epoch_generator(cfg: TrainConfig, epoch: int, device: torch.device) -> torch.Generator:
    """The generator that drives all randomness of one epoch (shuffling, augmentation, attacks)."""
    return torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + epoch)


def _global_step_stats(loss: float, correct: int, n: int, device: torch.device) -> tuple[float, int, int]:
    """(mean loss, correct, examples) of the whole global batch from every rank's share."""
    totals = torch.tensor([loss * n, correct, n], dtype=torch.float64, device=device)
    distributed.all_reduce_sum_([totals])
    loss_sum, correct_all, n_all = totals.tolist()
    return loss_sum / n_all, round(correct_all), round(n_all)


def train_epoch(s: Setup, epoch: int, callbacks: Iterable[Callback] = (), progress: bool = True) -> dict[str, float]:
    """One epoch of the method's steps; returns mean loss and accuracy. Stops on a NaN/inf loss.

    Under torchrun every rank trains on its shard of each global batch of ``cfg.batch_size`` examples
    (incomplete global batches are dropped, so all ranks take the same steps); the epoch generator is
    seeded identically on every rank and shuffling/augmentation draw for the global batch, so the ranks'
    random streams stay identical. Loss and accuracy are those of the global batches.
    """
    cfg = s.cfg
    generator = _epoch_generator(cfg, epoch, s.device)
    world = distributed.world_size()
    per_rank = distributed.per_rank_batch(cfg.batch_size, len(s.splits.train))
    steps_per_epoch = (math.ceil(len(s.splits.train) / cfg.batch_size) if world == 1
                       else len(s.splits.train) // cfg.batch_size)
    attack = AttackSettings(cfg.eps, cfg.alpha, cfg.attack_steps, cfg.norm)
    callbacks = list(callbacks)
    hooks = [cb.after_backward for cb in callbacks]
    loss_sum, correct, seen = 0.0, 0, 0
    batches = train_batches(s.splits.train, per_rank, generator, drop_last=world > 1, rank=distributed.rank(),
                            world_size=world)
    bar = progress_bar(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", progress=progress,
                       unit="step")
    for step, (x, y) in enumerate(bar):
        ctx = StepContext(epoch, cfg.epochs, step, steps_per_epoch, attack, generator, hooks,
                          shard=(distributed.rank(), world))
        for cb in callbacks:
            cb.before_step(s.model)
        with _autocast(cfg, s.device):
            out = s.method.train_step(s.model if s.step_model is None else s.step_model, x, y, s.optimizer, ctx)
        for cb in callbacks:
            cb.after_step(s.model)
        # The step's one host read (loss and hits together): the only wait for the device per step.
        loss, hits = torch.stack([out.loss.detach().double(), (out.logits.detach().argmax(1) == y).sum().double()]
                                 ).tolist()
        hits, n = int(hits), len(y)
        if world > 1:  # every rank sees the global batch's numbers, so all stop together on a NaN
            loss, hits, n = _global_step_stats(loss, hits, n, s.device)
        if not math.isfinite(loss):
            raise TrainingDiverged(f"training loss became {loss} at epoch {epoch + 1}, step {step + 1}")
        loss_sum += loss * n
        correct += hits
        seen += n
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
    return {"train_loss": loss_sum / max(1, seen), "train_acc": 100.0 * correct / max(1, seen)}


def evaluate_epoch(s: Setup, epoch: int, progress: bool = False) -> dict[str, float]:
    """Per-epoch natural/PGD accuracy on a test subset and on the validation split."""
    cfg = s.cfg
    model = s.model if s.eval_model is None else s.eval_model
    kw = dict(eps=cfg.eps, alpha=cfg.alpha, steps=cfg.epoch_eval_steps, norm=cfg.norm,
              batch_size=cfg.eval_batch_size, seed=cfg.seed, progress=progress)
    with _autocast(cfg, s.device):  # as the model trains (bf16 under --amp); the final evaluation is fp32
        test = evaluate(model, s.splits.test, limit=cfg.eval_size, desc=f"epoch {epoch + 1} test", **kw)
        val = (evaluate(model, s.splits.val, desc=f"epoch {epoch + 1} val", **kw)
               if s.splits.val is not None and len(s.splits.val) else None)
    row = {"natural_acc": test["natural_acc"], "robust_acc": test.get("robust_acc")}
    if val is not None:
        row.update(val_natural_acc=val["natural_acc"], val_robust_acc=val.get("robust_acc"))
    return row


def _selection_score(cfg: TrainConfig, row: dict[str, Any]) -> float:
    """The number "best" maximizes: robust accuracy (natural for ST) on the validation split, or on the
    test subset when there is no validation split or ``select_on="test"``."""
    prefix = "val_" if cfg.select_on == "val" and "val_natural_acc" in row else ""
    kind = "natural_acc" if cfg.method == "st" or row.get("robust_acc") is None else "robust_acc"
    return float(row[prefix + kind])


def final_evaluation(s: Setup, model: nn.Module | None = None, *, progress: bool = False,
                     name: str = "final") -> dict[str, float]:
    """Natural and PGD-``eval_steps`` accuracy (percent) on the whole test split, plus NRR (``progress``: a bar
    named after the model evaluated, ``name``)."""
    cfg = s.cfg
    res = evaluate(model or s.model, s.splits.test, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.eval_steps,
                   norm=cfg.norm, batch_size=cfg.eval_batch_size, seed=cfg.seed + 1, progress=progress,
                   desc=f"test PGD-{cfg.eval_steps} ({name} model)")
    return {"natural_acc": res["natural_acc"], "robust_acc": res["robust_acc"],
            "nrr": nrr(res["natural_acc"], res["robust_acc"]), "n_test": res["n"]}


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, stop_after: int | None = None, callbacks: Iterable[Callback] = (),
          splits: Splits | None = None) -> dict[str, Any]:
    """Train ``cfg`` into run directory ``out`` and return its summary.

    ``resume`` continues from ``checkpoints/last.pt``; ``stop_after`` ends this call after that
    many completed epochs (to test or split long runs); an existing run needs ``overwrite``.

    Under torchrun (:mod:`layerlab.distributed`) every rank trains; rank 0 alone writes the run directory,
    evaluates, runs the callbacks and shows progress, while the others wait; every rank returns rank 0's
    summary. All ranks read ``last.pt`` to resume (``out`` must be on a file system they share). Rank 0
    holds a lock on ``out`` throughout: a second process training the same run directory is refused.
    """
    cfg.validate()  # bad settings are refused before anything is written
    build_method(cfg.method, cfg.method_args)
    with contextlib.ExitStack() as lock:
        distributed.on_main(lambda: lock.enter_context(runs.run_lock(out)))
        return _train(cfg, out, resume=resume, overwrite=overwrite, progress=progress, stop_after=stop_after,
                      callbacks=callbacks, splits=splits)


def saved_config(out: str | Path) -> TrainConfig | None:
    """The config run directory ``out`` was trained with (its ``config.json``), or None when it has none."""
    path = Path(out) / "config.json"
    return TrainConfig.from_dict(runs.read_json(path)["config"]) if path.is_file() else None


def _train(cfg: TrainConfig, out: str | Path, *, resume: bool, overwrite: bool, progress: bool,
           stop_after: int | None, callbacks: Iterable[Callback], splits: Splits | None) -> dict[str, Any]:
    """:func:`train` with the run directory locked."""
    main = distributed.is_main()
    run_dir = distributed.on_main(lambda: runs.prepare_run_dir(out, overwrite=overwrite, resume=resume))
    callbacks = list(callbacks) if main else []
    progress = progress and main
    if resume:
        last = runs.load_checkpoint(run_dir / "checkpoints" / "last.pt")
        if "config" in last:
            saved = TrainConfig.from_dict(last["config"])
            diff = cfg.differences(saved.to_dict())
            if diff:
                raise ValueError(f"cannot resume {run_dir}: it was trained with other settings (saved vs given: "
                                 f"{'; '.join(diff)}); drop those options to continue it as it was, or pass "
                                 f"--overwrite to start over")
            cfg = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in TrainConfig.OUTPUT_ONLY})
    s = setup(cfg, splits)
    if cfg.grad_stats and main:
        if not any(isinstance(cb, GradStats) for cb in callbacks):
            callbacks.append(GradStats())
    start_epoch, best_score, best_epoch = 0, float("-inf"), 0
    write_seconds = 0.0  # this process's checkpoint and callback writes at the ends of its epochs
    if resume:
        runs.load_weights(s.model, last, source=str(run_dir / "checkpoints" / "last.pt"))
        s.optimizer.load_state_dict(last["optimizer"])
        s.method.load_state_dict(last.get("method", {}))
        start_epoch, best_score, best_epoch = int(last["epoch"]), float(last["best_score"]), int(last["best_epoch"])
    note(run_header(cfg, run_dir, s, start_epoch), progress)
    distributed.on_main(lambda: _start_files(s, run_dir, resume, start_epoch, callbacks))
    t_run = time.time()
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    epochs_bar = progress_bar(range(start_epoch, end_epoch), desc=f"{cfg.method} {run_dir.name}", progress=progress,
                              leave=True, unit="epoch")
    for epoch in epochs_bar:
        lr = lr_at(cfg, epoch)
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        t0 = time.time()
        try:
            stats = train_epoch(s, epoch, callbacks, progress)
        except TrainingDiverged as err:
            last_pt = run_dir / "checkpoints" / "last.pt"
            kept = (f"the last good checkpoint is {last_pt} (epoch {epoch})" if epoch > 0 and last_pt.exists()
                    else "no checkpoint was saved yet")
            raise TrainingDiverged(f"{err}; nothing was saved for this epoch and {kept}; "
                                   f"lower --lr or check the data and method settings") from None
        seconds = time.time() - t0
        # Rank 0 evaluates and writes while the other ranks wait for its result (or its error).
        row, best_score, best_epoch, written = distributed.on_main(functools.partial(
            _end_epoch, s, run_dir, epoch, lr, stats, t0, seconds, best_score, best_epoch, callbacks, progress))
        write_seconds += written
        if "natural_acc" in row:
            epochs_bar.set_postfix(nat=f"{row['natural_acc']:.1f}", rob=f"{row.get('robust_acc') or 0:.1f}")
    if end_epoch < cfg.epochs:
        summary = {"stopped_after": end_epoch, "run_dir": str(run_dir)}
    else:
        summary = distributed.on_main(lambda: write_summary(s, run_dir, best_epoch, time.time() - t_run,
                                                            write_seconds, progress=progress))
    for cb in callbacks:
        cb.on_train_end(run_dir, summary)
    return summary


def run_header(cfg: TrainConfig, run_dir: Path, s: Setup, start_epoch: int = 0) -> str:
    """The line a run starts with: what it trains, on which data, the profile, where it writes, on which device."""
    details = ([] if cfg.width == 1 else [f"width {cfg.width:g}"]) + ([f"update {cfg.update}"] if cfg.update else [])
    what = f"{cfg.method} {cfg.model}" + (f" ({', '.join(details)})" if details else "")
    epochs = (f"from epoch {start_epoch + 1} of {cfg.epochs}" if start_epoch
              else f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}")
    return (f"{'resume' if start_epoch else 'train'} {what} on {s.splits.name} ({len(s.splits.train):,} train / "
            f"{len(s.splits.test):,} test), {epochs}, profile {profile_of(cfg)} -> {run_dir} on {s.device}"
            + (f" x{distributed.world_size()}" if distributed.world_size() > 1 else ""))


def _start_files(s: Setup, run_dir: Path, resume: bool, start_epoch: int, callbacks: list[Callback]) -> None:
    """Write config.json (or drop metrics rows of epochs a resumed run redoes) and start the callbacks."""
    if resume:
        kept = [r for r in runs.read_jsonl(run_dir / "metrics.jsonl") if r["epoch"] <= start_epoch]
        (run_dir / "metrics.jsonl").write_text("".join(runs.dumps_line(r) for r in kept))
    else:
        started_from = runs.init_identity(s.cfg.init)
        runs.write_json(run_dir / "config.json", {"config": s.cfg.to_dict(), "environment": runs.environment(),
                                                  "method_hparams": s.method.hparams(),
                                                  "blocks": [vars(r) for r in block_report(s.model)],
                                                  **({"init_identity": started_from} if started_from else {})})
    for cb in callbacks:
        cb.on_train_start(s.model, s.method, run_dir, s.cfg, start_epoch)


def _end_epoch(s: Setup, run_dir: Path, epoch: int, lr: float, stats: dict[str, float], t0: float, seconds: float,
               best_score: float, best_epoch: int, callbacks: list[Callback],
               progress: bool = False) -> tuple[dict[str, Any], float, int, float]:
    """Evaluate (on the epochs :func:`evaluated_epoch` names), append the metrics row, save best/last
    checkpoints, run the callbacks; returns (row, best score, best epoch, seconds spent writing checkpoints and
    running the callbacks). The row of an epoch without evaluation has no accuracy and no ``eval_seconds``, and
    "best" is chosen among the evaluated epochs."""
    cfg = s.cfg
    row = {"epoch": epoch + 1, "lr": lr, **stats, **s.method.epoch_stats(), "seconds": seconds}
    if evaluated_epoch(cfg, epoch):
        row.update(evaluate_epoch(s, epoch, progress), eval_seconds=time.time() - t0 - seconds)
    t_write = time.perf_counter()
    meta = _meta(cfg, s, epoch + 1)
    # Metrics first, last.pt after: a crash in between leaves a row that resume drops and redoes.
    runs.append_jsonl(run_dir / "metrics.jsonl", row)
    score = _selection_score(cfg, row) if "natural_acc" in row else float("-inf")
    if score > best_score:
        best_score, best_epoch = score, epoch + 1
        runs.save_checkpoint(run_dir / "checkpoints" / "best.pt", s.model, meta)
    runs.save_checkpoint(run_dir / "checkpoints" / "last.pt", s.model, meta, optimizer=s.optimizer.state_dict(),
                         method=s.method.state_dict(), config=cfg.to_dict(), epoch=epoch + 1,
                         best_score=best_score, best_epoch=best_epoch)
    if cfg.keep_every and (epoch + 1) % cfg.keep_every == 0:
        runs.save_checkpoint(run_dir / "checkpoints" / f"epoch-{epoch + 1}.pt", s.model, meta)
    for cb in callbacks:
        cb.on_epoch_end(epoch + 1, s.model, run_dir)
    grad_stats = next((cb for cb in callbacks if isinstance(cb, GradStats)), None)
    blocks = block_summary(grad_stats.epoch_rows) if grad_stats is not None else {}
    for cb in callbacks:
        cb.on_epoch_metrics(epoch + 1, row, blocks)
    return row, best_score, best_epoch, time.perf_counter() - t_write


def write_summary(s: Setup, run_dir: Path, best_epoch: int, seconds: float, write_seconds: float = 0.0, *,
                  progress: bool = False) -> dict[str, Any]:
    """Evaluate the final (and best) model on the test split and write ``summary.json`` (``write_seconds``: what
    this process spent writing checkpoints and running the callbacks at the ends of its epochs; ``progress``: a
    bar per model evaluated)."""
    cfg = s.cfg
    metrics = runs.read_jsonl(run_dir / "metrics.jsonl")
    t_final = time.time()
    summary: dict[str, Any] = {
        "method": cfg.method, "model": cfg.model, "width": cfg.width, "dataset": s.splits.name,
        "epochs": cfg.epochs, "seed": cfg.seed, "update": cfg.update, "reinit": cfg.reinit,
        "trainable": trainable_parts(s.model), "method_hparams": s.method.hparams(),
        "attack": {"norm": cfg.norm, "eps": cfg.eps, "alpha": cfg.alpha, "steps": cfg.eval_steps},
        **final_evaluation(s, progress=progress, name="last"),
        "best_epoch": best_epoch, "best_selected_on": "val" if cfg.select_on == "val" and s.splits.val else "test",
        "train_seconds_per_epoch": sum(r["seconds"] for r in metrics) / max(1, len(metrics)),
        "seconds": seconds,
    }
    # dataclasses.replace, not cfg.replace (which skips None): the best weights need no --init file and no freezing.
    best_model = build_run_model(dataclasses.replace(cfg, init=None, update=None), s.splits).to(s.device)
    runs.load_weights(best_model, runs.load_checkpoint(run_dir / "checkpoints" / "best.pt"))
    summary["best"] = final_evaluation(s, best_model, progress=progress, name=f"best, epoch {best_epoch}")
    for name, extra in s.method.extra_models().items():
        summary[name] = final_evaluation(s, extra, progress=progress, name=name)
    # "seconds": the whole run's wall time over every process that trained it (a resumed run's earlier epochs
    # too): each epoch with its evaluation, plus these final evaluations; "process_seconds": this process's epochs
    summary["final_eval_seconds"] = time.time() - t_final
    summary["process_seconds"] = seconds
    summary["process_write_seconds"] = write_seconds
    summary["seconds"] = epoch_seconds(metrics) + summary["final_eval_seconds"]
    runs.write_json(run_dir / "summary.json", summary)
    return summary


def epoch_seconds(metrics: list[dict[str, Any]]) -> float:
    """Wall seconds of a run's epochs (training and per-epoch evaluation) from its ``metrics.jsonl`` rows."""
    return float(sum(epoch_wall(r) for r in metrics))


def epoch_wall(row: dict[str, Any]) -> float:
    """One ``metrics.jsonl`` row's wall seconds: the epoch's training plus its evaluation."""
    return float(row["seconds"] + row.get("eval_seconds", 0.0))
