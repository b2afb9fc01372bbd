"""Run configuration: one dataclass holds every training setting, profiles and presets override it.

Every value has one home: its default (and its command-line help, :mod:`layerlab.options`) lives in
:class:`TrainConfig`, a profile (``tiny``, ``smoke``, ``cpu``, ``paper``) changes a consistent set of them, a
config file, then a method preset change them further, and explicit user arguments override all of these, in that
order. A profile means the same config under every command.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

# The papers' L-inf threat model: radius 8/255 and PGD step 2/255 of the [0, 1] input range.
EPS = 8 / 255
PGD_STEP = 2 / 255
PIXEL_LEVELS = 255  # the command line gives eps and the PGD step in 1/255 units ("--eps 8" is 8/255)


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A field with its ``--help`` text (``meta``: ``flag`` names its option, ``per`` divides the option's value,
    ``cli=False`` keeps it off the generated options)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Everything that determines a training run (and nothing that does not)."""

    method: str = _f("at", "training method", cli=False)
    method_args: dict[str, Any] = _f({}, "method hyper-parameters", cli=False)
    model: str = _f("resnet18", "resnet18, preactresnet18, wrn34-10, wrn28-10, resnet50, resnet101")
    width: float = _f(1.0, "channel width multiplier (1.0 = the standard model)")
    dataset: str = _f("cifar10", "digits (built in), cifar10, cifar100, svhn, or folder:PATH")
    data_dir: str | None = _f(None, "where datasets live (else $LAYERLAB_DATA)")
    download: bool = _f(False, "let torchvision download the dataset")
    train_size: int | None = _f(None, "class-balanced training subset size (seeded)")
    val_size: int = _f(1000, "validation examples held out of training, used to pick 'best'")
    test_size: int | None = _f(None, "class-balanced test subset size (seeded)")
    eval_size: int | None = _f(1000, "test images of the per-epoch robust accuracy")
    eval_every: int = _f(1, "per-epoch evaluation every N epochs, plus the last epoch and the first epoch at each "
                            "decayed step learning rate; 'best' is chosen among the evaluated epochs")
    epochs: int = _f(200, "training epochs")
    batch_size: int = _f(128, "batch size")
    eval_batch_size: int = _f(256, "evaluation batch size")
    lr: float = _f(0.1, "initial learning rate (SGD)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "weight decay")
    schedule: str = _f("step", "step (/10 at 50%,75%), multistep:E1,E2, cosine, constant")
    norm: str = _f("linf", "threat model norm: linf or l2")
    eps: float = _f(EPS, "attack radius, in 1/255 units (8 = 8/255)", per=PIXEL_LEVELS)
    alpha: float = _f(PGD_STEP, "PGD step size, in 1/255 units (2 = 2/255)", per=PIXEL_LEVELS, flag="pgd-step")
    attack_steps: int = _f(10, "PGD steps at training time (paper: 10)")
    epoch_eval_steps: int = _f(10, "PGD steps of the per-epoch robust accuracy")
    eval_steps: int = _f(20, "PGD steps of the final robust accuracy (paper: 20)")
    seed: int = _f(0, "random seed (model init, data order, attacks)")
    init: str | None = _f(None, "start from this checkpoint (e.g. an ST run's best.pt)")
    update: str | None = _f(None, "update only these blocks (e.g. 23), freeze the rest")
    reinit: bool = _f(True, "re-initialize the updated blocks (else fine-tune them)")
    reset_bn: bool = _f(False, "when re-initializing, also reset BatchNorm (weights and statistics) of the updated "
                                "blocks (else keep the ST model's)")
    train_stem: bool = _f(False, "keep the stem trainable whatever --update freezes (the released code's freeze study "
                                 "never freezes it); else the stem follows block1")
    frozen_bn: str = _f("fixed", "BatchNorm statistics of frozen blocks: fixed (the ST model's) or adapt (updated "
                                 "by the training forwards, as in the released code)")
    select_on: str = _f("val", "pick the best epoch on val or test robust accuracy")
    grad_stats: bool = _f(True, "record per-layer gradient statistics (layer_stats.jsonl)")
    device: str = _f("auto", "auto (CUDA when present), cpu, cuda, cuda:1, ...")
    amp: bool = _f(False, "bf16 autocast for the training steps and the per-epoch evaluation (the final evaluation "
                          "stays fp32)")
    compile: bool = _f(False, "torch.compile (inductor) the training steps and the per-epoch evaluation")
    channels_last: bool = _f(False, "channels_last memory format")
    keep_every: int = _f(0, "also keep checkpoints/epoch-E.pt every N epochs (LSC over training; 0 = best/last only)")

    # Fields that change what a run writes, not what it learns: re-using a run ignores them.
    OUTPUT_ONLY: ClassVar[tuple[str, ...]] = ("keep_every",)
    # Fields with a fixed set of values.
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "norm": ("linf", "l2"), "select_on": ("val", "test"), "frozen_bn": ("fixed", "adapt"),
    }

    def validate(self) -> "TrainConfig":
        """Check every value before any work; a bad one raises a one-line ValueError naming its option and the fix.
        Returns the config itself."""
        def flag(name: str) -> str:
            field_ = next(f for f in dataclasses.fields(self) if f.name == name)
            return "--" + field_.metadata.get("flag", name.replace("_", "-"))

        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int):
            raise ValueError(f"--eval-every must be a whole number of epochs (got {self.eval_every!r}); give 1 or more")
        positive = ("epochs", "batch_size", "eval_batch_size", "train_size", "test_size", "eval_size", "eval_every",
                    "width")
        for name in positive:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{flag(name)} must be positive (got {value!r}); give a value above 0")
        for name in ("val_size", "attack_steps", "epoch_eval_steps", "eval_steps", "keep_every", "lr", "momentum",
                     "weight_decay", "eps", "alpha"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{flag(name)} must not be negative (got {value!r}); give 0 or more")
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{flag(name)} {getattr(self, name)!r} is not one of {', '.join(choices)}")
        kind, _, arg = self.schedule.partition(":")
        if kind not in ("step", "multistep", "cosine", "constant") or (kind == "multistep") != bool(arg):
            raise ValueError(f"--schedule {self.schedule!r} is not one of step, multistep:E1,E2, cosine, constant")
        if kind == "multistep":
            try:
                [float(m) for m in arg.split(",") if m]
            except ValueError:
                raise ValueError(f"--schedule {self.schedule!r}: milestones must be epochs, e.g. "
                                 f"multistep:100,150") from None
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Rebuild a config, rejecting unknown keys with a message naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(names)}")
        return cls(**upgrade(data))

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """Fields of a saved config (``config.json``) that would make it a different run than this one.

        Keys a saved config lacks count as the field's default; :attr:`OUTPUT_ONLY` fields are ignored."""
        defaults = TrainConfig().to_dict()
        saved = upgrade(saved)
        return [f"{k}: {saved.get(k, defaults[k])!r} vs {v!r}" for k, v in self.to_dict().items()
                if k not in self.OUTPUT_ONLY and saved.get(k, defaults[k]) != v]

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with ``changes`` applied (``None`` values are ignored, so CLI defaults pass through)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# Method arguments that were renamed: method -> {old name: new name}. Saved configs are read with the new names.
RENAMED_METHOD_ARGS: dict[str, dict[str, str]] = {"cure": {"alpha": "rgp_alpha"}, "cure-eff": {"alpha": "rgp_alpha"}}


def upgrade(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config (``config.json``) with renamed method arguments under their current names."""
    renames = RENAMED_METHOD_ARGS.get(saved.get("method", ""), {})
    args = saved.get("method_args") or {}
    if not any(k in args for k in renames):
        return saved
    return {**saved, "method_args": {renames.get(k, k): v for k, v in args.items()}}


# Profiles: consistent defaults that any explicit argument overrides. A profile means the same config under
# every command (train, freeze-study, compare, reproduce), so their runs are shared.
PROFILES: dict[str, dict[str, Any]] = {
    # Built-in data (no download), a tiny ResNet-18: seconds on a laptop CPU. For tests and the README.
    "smoke": dict(
        dataset="digits", width=0.125, epochs=4, batch_size=64, train_size=None, val_size=100,
        test_size=200, eval_size=100, attack_steps=5, epoch_eval_steps=5, eval_steps=20, keep_every=1,
    ),
    # Smaller still (width 1/16, 600 digits, 3 epochs, PGD-2 in training): the figure gallery and notebooks in
    # about a minute per notebook.
    "tiny": dict(
        dataset="digits", width=0.0625, epochs=3, batch_size=32, train_size=600, val_size=50,
        test_size=100, eval_size=50, attack_steps=2, epoch_eval_steps=3, eval_steps=5, keep_every=1,
    ),
    # CIFAR-10 subset and a width-16 ResNet-18, trained under bf16 autocast in channels_last memory (PGD
    # perturbations and the final evaluation stay fp32): one PGD-10 AT run takes about 10-20 minutes on 2 cores.
    "cpu": dict(
        dataset="cifar10", width=0.25, epochs=8, batch_size=128, train_size=8000, val_size=500,
        test_size=1000, eval_size=500, attack_steps=10, epoch_eval_steps=10, eval_steps=20, keep_every=2,
        amp=True, channels_last=True,
    ),
    # The papers' settings: full ResNet-18, 200 epochs, PGD-10 eps 8/255 step 2/255, batch 128, lr 0.1, wd 5e-4.
    "paper": dict(
        dataset="cifar10", width=1.0, epochs=200, batch_size=128, train_size=None, val_size=1000,
        test_size=None, eval_size=1000, attack_steps=10, epoch_eval_steps=10, eval_steps=20,
        lr=0.1, weight_decay=5e-4, keep_every=20,
    ),
}

# Epochs of the naturally trained (ST) model that the freeze study and CURE start from. ST is ~7x cheaper
# than PGD-10 AT, and the paper starts from a converged ST model, so miniatures give it more epochs.
ST_EPOCHS: dict[str, int] = {"tiny": 3, "smoke": 4, "cpu": 24, "paper": 200}


def make_config(profile: str = "smoke", **overrides: Any) -> TrainConfig:
    """The config of ``profile`` with ``overrides`` applied (``None`` means "keep the profile's value")."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    return TrainConfig().replace(**PROFILES[profile]).replace(**overrides)


def profile_of(cfg: TrainConfig) -> str:
    """The profile ``cfg`` follows, for the run header: ``smoke``, ``smoke (changed: epochs, lr)`` when a few of
    the profile's values were overridden, ``custom`` when no profile is close (half its values or more differ)."""
    def changed(name: str) -> list[str]:
        return [k for k, v in PROFILES[name].items() if getattr(cfg, k) != v]

    name = min(PROFILES, key=lambda p: len(changed(p)))
    diff = changed(name)
    if 2 * len(diff) >= len(PROFILES[name]):
        return "custom"
    return name if not diff else f"{name} (changed: {', '.join(diff)})"


def dumps(obj: Any) -> str:
    """Stable, readable JSON for run files."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
