"""What the gallery makes and how big: the figure groups, the figure settings per profile, one call's context.

Each :class:`FigureGroup` record is the only home of a group's names: its key (``layerlab reproduce --only``),
number, folder under the figures directory, notebook, title and the papers' claims (:data:`layerlab.claims.CLAIMS`)
its figures show. :data:`SETTINGS` sizes each group's runs and
analyses under a profile; the training config itself is the profile's (:func:`layerlab.config.make_config`), so
``layerlab train``, ``compare``, ``freeze-study`` and ``reproduce`` with one profile share their runs. A profile's
overfitting regime (:attr:`FigureSettings.regime`) is the exception: the robust-overfitting groups then read the
runs of :mod:`layerlab.experiments` in that regime, with the experiments' configs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerlab.config import ST_EPOCHS, TrainConfig, make_config
from layerlab.experiments import EVAL_N, OVERFIT, OVERFIT_TAG
from layerlab.layerwise import paper_specs
from layerlab.methods.cure import TABLE7_ABLATION
from layerlab.methods.perturbation import C_MIN, RWP_CMIN_SWEEP, RWP_K2_SWEEP

PathMap = dict[str, Path]
RUN_ROOT = "runs/reproduce"  # the notebooks' and `layerlab reproduce`'s default run root (git ignores runs/)
FIGURES_DIR = "runs/figures"
GALLERY_DIR = "figures"  # the committed gallery, drawn from the records under results/

# The robust-overfitting comparison (CURE Fig. 5c, Table 3).
OVERFIT_METHODS = ("at", "trades", "awp", "rwp", "cure")
# Models whose robustness is compared beyond accuracy (corruptions, minimum perturbation, attributions).
ANALYSIS_METHODS = ("st", "at", "cure")
# The gallery's CURE runs as the released code runs it (layerlab.methods.cure.CODE_ARGS), from the ST model: the
# experiments' run of this name (README, "CURE: the paper's text and the released code").
CURE_RUN = "CURE-code"
# CURE Table 7: run-name suffix (after CURE_RUN) -> (RGP on, revision on, CURE arguments on top of the gallery's
# CURE's). "" is the gallery's CURE run itself.
CURE_ABLATION = TABLE7_ABLATION


@dataclass(frozen=True)
class FigureGroup:
    """One figure group: what ``--only`` calls it, its number, notebook and title (its folder follows), and the keys
    of the claims (:data:`layerlab.claims.CLAIMS`) its figures show, whose verdicts its notebook prints."""

    key: str
    number: int
    notebook: str
    title: str
    claims: tuple[str, ...] = ()

    @property
    def folder(self) -> str:
        """The group's directory under the figures directory (``04_tradeoff``)."""
        return f"{self.number:02d}_{self.key}"


# In notebook order: later groups re-use earlier groups' runs.
GROUPS: dict[str, FigureGroup] = {g.key: g for g in (
    FigureGroup("freeze_study", 1, "01_freeze_study.ipynb", "Layer-wise freeze study (CURE Fig. 2b, 11)",
                ("u23-natural-over-sat", "u23-robust-over-sat", "u23-code-natural-over-sat",
                 "u23-code-robust-over-sat")),
    FigureGroup("cka", 2, "02_representation_similarity.ipynb", "CKA natural vs adversarial (CURE Fig. 3, 12)"),
    FigureGroup("overfitting", 3, "03_robust_overfitting.ipynb", "Robust overfitting (CURE Fig. 4, 5c, Table 3)",
                ("at-robust-overfits", "awp-closes-at-gap", "cure-code-closes-at-gap")),
    FigureGroup("tradeoff", 4, "04_tradeoff.ipynb", "Natural-robust trade-off (CURE Fig. 1, 5a, Table 1)",
                ("cure-nrr-over-trades", "cure-code-nrr-over-trades", "cure-beats-trades-from-st",
                 "cure-code-beats-trades-from-st")),
    FigureGroup("attack_strength", 5, "05_attack_strength.ipynb", "Accuracy against the attack's eps (CURE Fig. 5b)"),
    FigureGroup("gradients", 6, "06_gradient_analysis.ipynb", "Gradients and updated weights (CURE Fig. 6)"),
    FigureGroup("corruptions", 7, "07_natural_corruptions.ipynb", "Natural corruptions (CURE Fig. 7, 9)"),
    FigureGroup("minpert_attributions", 8, "08_minimum_perturbation_attributions.ipynb",
                "Minimum perturbations (CURE Fig. 8) and attributions (extension)"),
    FigureGroup("lsc", 9, "09_lsc_landscapes.ipynb",
                "LSC loss landscapes (RWP Fig. 2) and small-loss share (extension)"),
    FigureGroup("rwp_ablations", 10, "10_rwp_ablations.ipynb", "RWP curves and c_min / K2 sweeps (RWP Fig. 3)",
                ("awp-gamma-peaks-inside", "awp-small-loss-range-closes-the-gap", "rwp-closes-at-gap",
                 "rwp-over-awp-last", "rwp-over-at-best", "rwp-cmin-peaks-inside", "rwp-k2-peaks-inside")),
    FigureGroup("cure_ablation", 11, "11_cure_ablation.ipynb", "CURE ablation (CURE Table 7)",
                ("rgp-raises-natural", "rgp-raises-robustness", "revision-raises-natural",
                 "revision-raises-robustness")),
    FigureGroup("explorer", 12, "12_interactive_explorer.ipynb", "The interactive explorer"),
)}


def group_of(name: str) -> FigureGroup:
    """The group named by its key or its folder (``tradeoff`` or ``04_tradeoff``); unknown names list the keys."""
    for g in GROUPS.values():
        if name in (g.key, g.folder):
            return g
    raise ValueError(f"unknown figure group {name!r}; choose from {', '.join(GROUPS)}")


@dataclass(frozen=True)
class Regime:
    """A training regime of :mod:`layerlab.experiments` whose runs some figure groups read instead of the profile's:
    the tag its run names end in and its config changes on the profile's config (both the experiments')."""

    tag: str
    changes: dict[str, Any]

    def name(self, group: str) -> str:
        """A run group's name in the regime (``AT`` -> ``AT-n500-e100-w0.5-v200``)."""
        return f"{group}-{self.tag}"


# The regime in which AT robust-overfits at CPU scale (layerlab.experiments.OVERFIT; its robust-overfitting and
# rwp-sweeps experiments train its runs).
OVERFITTING = Regime(OVERFIT_TAG, dict(OVERFIT))


@dataclass(frozen=True)
class FigureSettings:
    """How big each figure's runs and analyses are under one profile."""

    st_epochs: int = 4
    specs: tuple[str, ...] = ()  # freeze study, re-initialized updated blocks (CURE Fig. 2b)
    noreinit_specs: tuple[str, ...] = ()  # freeze study, fine-tuned updated blocks (CURE Fig. 11)
    methods: tuple[str, ...] = ("at", "trades", "awp", "rwp", "cure")  # trade-off table (CURE Table 1)
    eval_n: int | None = 50  # test images of the attack suite (None = the whole test split)
    # the checkpoint the gallery runs its attack suite and eps sweep on (the other one is shown from training's own
    # final evaluation, or from an experiment's evaluation of it)
    eval_checkpoint: str = "best"
    attacks: tuple[str, ...] = ("natural", "pgd20", "cw20")
    sweep_255: tuple[float, ...] = (1, 2, 4, 8)
    cka_n: int = 64
    cka_batch: int = 32
    corruption_n: int | None = 50
    corruption_severities: tuple[int, ...] = (1, 3, 5)
    minpert_n: int = 4
    minpert_iters: int = 6
    minpert_steps: int = 10
    fmn_steps: int = 20
    attr_n: int = 4
    ig_steps: int = 8
    layer_steps: int = 4
    lsc_n: int = 100
    lsc_points: int = 9
    lsc_directions: int = 2
    lsc_panels: int = 2  # checkpoints whose landscapes are drawn
    rwp_cmins: tuple[float, ...] = (1.0, C_MIN)
    rwp_steps: tuple[int, ...] = (1, 10)
    # The robust-overfitting groups (overfitting, lsc, rwp_ablations) read the experiments' runs of this regime, in
    # which AT robust-overfits; None: the profile's own runs. Fig. 4 (the U-spec curves) stays on the profile's runs:
    # the regime has no U-spec runs.
    regime: Regime | None = None
    progress: bool = False  # progress bars by default


_FULL_ATTACKS = ("natural", "pgd20", "cw100", "aa")
_SMALL = dict(specs=("1", "23"), noreinit_specs=("23",))
_FULL = dict(progress=True, specs=tuple(paper_specs(4)), noreinit_specs=tuple(paper_specs(4)),
             methods=("at", "trades", "mart", "awp", "rwp", "cure"), attacks=_FULL_ATTACKS,
             sweep_255=(0.25, 0.5, 1, 2, 3, 4, 5, 6, 7, 8), cka_batch=100, corruption_severities=(1, 2, 3, 4, 5),
             minpert_n=8, minpert_iters=12, minpert_steps=50, fmn_steps=100, attr_n=6, ig_steps=32, layer_steps=16,
             lsc_n=1000, lsc_points=21, lsc_directions=3, rwp_cmins=RWP_CMIN_SWEEP, rwp_steps=RWP_K2_SWEEP)

# Keyed by profile name (config.PROFILES): the gallery trains exactly the profile's config.
SETTINGS: dict[str, FigureSettings] = {
    # A subset of the freeze study's specs, two sweep values and no AutoAttack (about 66 s per model even at
    # this size): at ``tiny`` a notebook runs in about a minute on two CPU cores.
    "tiny": FigureSettings(st_epochs=ST_EPOCHS["tiny"], **_SMALL),
    "smoke": FigureSettings(st_epochs=ST_EPOCHS["smoke"], **_SMALL),
    # Every spec, attack and sweep value; hours on a CPU.
    # The robust-overfitting figures read the overfitting regime's runs (layerlab.experiments.OVERFIT): at this
    # size the profile's own training does not overfit.
    # The attack suite and the corruptions on the experiments' EVAL_N test images, and the attack suite on the
    # checkpoint the experiments' claims read (the last: at this size training does not robust-overfit), so a
    # run's evaluation (RUN/eval-last.json) is one file that gallery and experiments both add attacks to.
    "cpu": FigureSettings(st_epochs=ST_EPOCHS["cpu"], eval_n=EVAL_N, eval_checkpoint="last", cka_n=500,
                          corruption_n=EVAL_N, lsc_panels=3, regime=OVERFITTING, **_FULL),
    # The papers' settings (the whole test split); GPU days. Paper-scale training overfits by itself: no regime.
    "paper": FigureSettings(st_epochs=ST_EPOCHS["paper"], eval_n=None, cka_n=1000, corruption_n=None, lsc_panels=4,
                            **_FULL),
}


def settings(profile: str) -> FigureSettings:
    """The figure settings of ``profile``; unknown names list the valid ones."""
    if profile not in SETTINGS:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(SETTINGS)}")
    return SETTINGS[profile]


def base_config(profile: str, data_dir: str | None = None) -> TrainConfig:
    """The training config every figure's runs share: the profile's own."""
    settings(profile)
    return make_config(profile, data_dir=data_dir)


@dataclass
class Context:
    """One figure call: profile, settings, resolved directories and the shared training config; it collects
    the runs the call reads and the multi-run result files it draws from, for the group's manifest."""

    profile: str
    root: Path
    figures: Path
    data_dir: str | None
    progress: bool
    s: FigureSettings
    cfg: TrainConfig
    started: float = field(default_factory=time.time)
    used: dict[str, Path] = field(default_factory=dict)  # run name -> run directory
    sources: list[Path] = field(default_factory=list)  # result files of several runs (RUN_ROOT/analysis/...)
    regime: Regime | None = None  # the runs are the experiments' runs in this regime (FigureSettings.regime)

    def group_dir(self, group: FigureGroup) -> Path:
        """The figure group's output directory (created)."""
        path = self.figures / group.folder
        path.mkdir(parents=True, exist_ok=True)
        return path

    def overfitting(self) -> "Context":
        """This call reading the runs of the profile's overfitting regime (:attr:`FigureSettings.regime`); itself when
        the profile has none. The runs used and the result files read are collected into the same manifest."""
        return dataclasses.replace(self, regime=self.s.regime) if self.s.regime else self

    def use(self, found: PathMap) -> PathMap:
        """Note runs this call reads (returns ``found`` unchanged)."""
        self.used.update({Path(p).name: Path(p) for p in found.values()})
        return found


def context(profile: str, run_root: str | Path, figures_dir: str | Path, data_dir: str | None = None,
            progress: bool | None = None) -> Context:
    """Resolve a figure call's arguments (``progress`` defaults to the profile's figure settings)."""
    root = Path(run_root).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    figures = Path(figures_dir).expanduser().resolve()
    figures.mkdir(parents=True, exist_ok=True)
    data = None if data_dir in (None, "") else str(data_dir)
    s = settings(profile)
    return Context(profile, root, figures, data, s.progress if progress is None else bool(progress), s,
                   base_config(profile, data))
