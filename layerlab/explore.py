"""An interactive explorer of a run root (ipywidgets): ``layerlab.explore("runs/reproduce")``.

Pick runs and blocks, scrub through epochs, toggle natural / adversarial accuracy, and the panels redraw
from the runs' own files only (no model is loaded):

* accuracy curves and a per-epoch table (``metrics.jsonl``), with the chosen epoch marked;
* the natural-vs-adversarial CKA heatmap of the focus run, restricted to the chosen blocks (``cka.json``);
* mean |gradient| per block and the percentage of weights updated per layer at the chosen epoch, for every
  chosen run (``layer_stats.jsonl``; 100 - updated = the share a mask such as CURE's RGP kept fixed; the layers
  a U-spec run froze are at 0%);
* the LSC loss landscapes of the checkpoint nearest the chosen epoch and the removal rate over training
  (``lsc.csv``, ``removal_rate.csv``).

A "what if" panel freezes every block but a chosen set, starts from an ST run of the root and launches a
short adversarial run (:func:`layerlab.train.train` with ``update=SPEC``, ``init=ST/best.pt``) into
``ROOT/whatif/U-SPEC``, with a progress bar; when it finishes the new run is selected next to the others.

Each figure is drawn by matplotlib into an ipympl canvas widget (:class:`FigurePanel`: zoom and pan from its
toolbar, the data under the cursor below it) and the table is HTML, so the app works the same in JupyterLab,
in Voilà (``layerlab explore --runs ROOT``) and headless (the tests call the callbacks and compare the
figures as PNG). Served by Voilà, the page shows a loading message while the kernel starts, and the
kernel of a page that is gone is shut down once idle (:func:`voila_command`). The module is callable:
``layerlab.explore(ROOT)`` is :func:`explore`.
"""

from __future__ import annotations

import contextlib
import functools
import html
import io
import math
import sys
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import ipywidgets as widgets
import numpy as np
import pandas as pd
from ipympl.backend_nbagg import Canvas, FigureManager
from matplotlib.figure import Figure

from layerlab import runs
from layerlab.analysis.curves import curves_of
from layerlab.callbacks import Callback
from layerlab.config import TrainConfig
from layerlab.plots.cka import cka_view, draw_cka
from layerlab.plots.curves import draw_curves
from layerlab.plots.lsc import draw_lsc_landscape, draw_removal_rate
from layerlab.plots.style import apply_style
from layerlab.train import splits_for, train

RUN_FILES = ("metrics.jsonl", "config.json", "summary.json", "cka.json", "layer_stats.jsonl", "lsc.csv",
             "removal_rate.csv")
MODES = {"natural": ("natural_acc", "val_natural_acc"), "adversarial": ("robust_acc", "val_robust_acc")}
WHATIF_DIR = "whatif"
WHATIF_TRAIN_SIZE = 1000  # what-if runs are smoke-scale: at most this many training images
APP_CLASS = "layerlab-explorer"
FIGURE_CLASS = "layerlab-figure"
PANEL_DPI = 80  # pixels per inch of the figure panels and their PNG snapshots (figure sizes are in inches)
TABLE_CSS = ("<style>.layerlab-summary {border-collapse: collapse; margin: 6px 0}"
             " .layerlab-summary th, .layerlab-summary td {padding: 3px 12px; text-align: right;"
             " border-bottom: 1px solid #ddd; white-space: nowrap}"
             " .layerlab-summary th:nth-child(-n+3), .layerlab-summary td:nth-child(-n+3) {text-align: left}</style>")
SELECT_HINT = "Ctrl-click (⌘-click on a Mac) or Shift-click to select several runs or blocks"
KERNEL_CULL_IDLE = 600  # seconds a served explorer's kernel may sit without a page before Voilà shuts it down
KERNEL_CULL_INTERVAL = 60  # seconds between Voilà's checks for such kernels


# --------------------------------------------------------------------------------------
# run files
# --------------------------------------------------------------------------------------


def discover_runs(root: str | Path, depth: int = 2) -> dict[str, Path]:
    """Run directories (holding ``metrics.jsonl``) under ``root`` up to ``depth`` levels, by relative path."""
    root = Path(root)
    found: dict[str, Path] = {}
    if (root / "metrics.jsonl").exists():
        found["."] = root
    level = [root]
    for _ in range(depth):
        level = sorted(p for d in level if d.is_dir() for p in d.iterdir() if p.is_dir())
        for p in level:
            if (p / "metrics.jsonl").exists():
                found[str(p.relative_to(root))] = p
    return dict(sorted(found.items()))


@dataclass
class RunFiles:
    """Everything the explorer shows about one run, read from its files."""

    label: str
    path: Path
    config: dict[str, Any]
    blocks: list[str]
    part_counts: list[dict[str, Any]]  # config.json's parameter counts per part: part, total, trainable
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None
    cka: dict[str, Any] | None
    stats: Any  # pandas DataFrame or None
    lsc: Any
    removal: Any

    @property
    def method(self) -> str:
        return self.config.get("method", "?")

    @property
    def frozen(self) -> bool:
        """Whether some part of the model was trained with fewer trainable weights than it has (a U-spec run)."""
        return any(b["trainable"] < b["total"] for b in self.part_counts)

    @property
    def epochs(self) -> list[int]:
        return [int(r["epoch"]) for r in self.metrics]

    def row_at(self, epoch: int) -> dict[str, Any] | None:
        """The metrics row of ``epoch``, else the last one before it (None before the first)."""
        rows = [r for r in self.metrics if r["epoch"] <= epoch]
        return rows[-1] if rows else None


def _signature(path: Path) -> tuple:
    """Modification times and sizes of a run's files (to notice a run that is still being written)."""
    out = []
    for name in RUN_FILES:
        p = path / name
        out.append((p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else None)
    return tuple(out)


def read_run_files(label: str, path: Path) -> RunFiles:
    """Read a run directory's files (missing analysis files are None)."""
    meta = runs.read_json(path / "config.json") if (path / "config.json").exists() else {}
    stats = None
    if (path / "layer_stats.jsonl").exists():
        rows = runs.read_jsonl(path / "layer_stats.jsonl")
        stats = pd.DataFrame(rows) if rows else None

    def csv(name: str):
        p = path / name
        if not p.exists():
            return None
        frame = pd.read_csv(p)
        return frame if len(frame) else None

    return RunFiles(label=label, path=path, config=meta.get("config", {}),
                    blocks=[b["part"] for b in meta.get("blocks", [])], part_counts=meta.get("blocks", []),
                    metrics=sorted(runs.read_jsonl(path / "metrics.jsonl"), key=lambda r: r["epoch"]),
                    summary=runs.read_json(path / "summary.json") if (path / "summary.json").exists() else None,
                    cka=runs.read_json(path / "cka.json") if (path / "cka.json").exists() else None,
                    stats=stats, lsc=csv("lsc.csv"), removal=csv("removal_rate.csv"))


@functools.lru_cache(maxsize=None)
def weight_layers(model: str, width: float) -> tuple[tuple[str, str], ...]:
    """(parameter, part) of every conv/linear weight of a ``model`` of ``width``, in forward order.

    The model is built on the meta device (no memory, no initialization cost): only its parameter names count.
    """
    import torch

    from layerlab.models import block_of_param, build_model

    with torch.device("meta"):
        net = build_model(model, width=width)
    return tuple((name, block_of_param(name)) for name, p in net.named_parameters() if p.dim() > 1)


def updated_percent(run: RunFiles, epoch: int, blocks: Sequence[str]) -> pd.Series:
    """Percentage of each conv/linear weight tensor updated per step at ``epoch`` (forward order, chosen blocks).

    ``layer_stats.jsonl`` has rows for trainable tensors only, so the layers a U-spec run froze are 0%.
    """
    frame = stats_at(run.stats, epoch)
    frame = frame[frame["shape"].map(len) > 1]
    updated = 100 * frame.set_index("param")["updated_fraction"]
    if run.frozen:
        layers = weight_layers(run.config["model"], float(run.config["width"]))
        updated = updated.reindex([name for name, _ in layers], fill_value=0.0)
        part = dict(layers)
    else:
        part = dict(zip(frame["param"], frame["block"]))
    return updated[[part[name] in blocks for name in updated.index]] if blocks else updated


# --------------------------------------------------------------------------------------
# panels: each draws into the figure it is given
# --------------------------------------------------------------------------------------


def _axes(fig: Figure, ncols: int, width: float, height: float) -> np.ndarray:
    """Clear ``fig`` and give it a styled row of ``ncols`` axes, each ``width`` x ``height`` inches."""
    apply_style()
    fig.clear()
    fig.set_size_inches(width * ncols, height)
    return fig.subplots(1, ncols, squeeze=False)[0]


def _message(fig: Figure, text: str, title: str) -> None:
    """Say in ``fig`` why a panel is empty."""
    ax = _axes(fig, 1, width=5.0, height=3.4)[0]
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, transform=ax.transAxes)


def render_curves(fig: Figure, selected: Sequence[RunFiles], mode: str, epoch: int) -> None:
    """Test (solid) and validation (dashed) accuracy of each run per epoch, the chosen epoch marked."""
    if not selected:
        return _message(fig, "select one or more runs", "accuracy")
    test_key, _ = MODES[mode]
    df = curves_of({run.label: run.metrics for run in selected})
    ax = _axes(fig, 1, width=5.6, height=3.6)[0]
    draw_curves(df, ax, "test", test_key, {run.label: f"C{i % 10}" for i, run in enumerate(selected)},
                with_val=True)
    ax.axvline(epoch, color="0.3", linewidth=1, linestyle=":")
    ax.set(xlabel="epoch", ylabel=f"{mode} accuracy (%)", title=f"{mode} accuracy (solid test, dashed val)")
    ax.legend(fontsize="x-small")


def summary_table(selected: Sequence[RunFiles], mode: str, epoch: int) -> str:
    """HTML table: each run's method, update spec and accuracies at the chosen epoch (chosen mode in bold)."""
    if not selected:
        return "<p>no runs selected</p>"
    test_key, val_key = MODES[mode]

    def fmt(v: Any) -> str:
        return f"{v:.1f}" if isinstance(v, (int, float)) else "–"

    head = ("<tr><th>run</th><th>method</th><th>update</th><th>epoch</th><th>natural</th><th>adversarial</th>"
            "<th>val natural</th><th>val adversarial</th><th>train loss</th></tr>")
    body = []
    for run in selected:
        row = run.row_at(epoch) or {}
        cells = []
        for key in ("natural_acc", "robust_acc", "val_natural_acc", "val_robust_acc", "train_loss"):
            text = fmt(row.get(key))
            cells.append(f"<td><b>{text}</b></td>" if key in (test_key, val_key) else f"<td>{text}</td>")
        body.append(f"<tr><td>{html.escape(run.label)}</td><td>{html.escape(run.method)}</td>"
                    f"<td>{html.escape(str(run.config.get('update') or 'all'))}</td>"
                    f"<td>{row.get('epoch', '–')}</td>{''.join(cells)}</tr>")
    return f"{TABLE_CSS}<table class='layerlab-summary'>{head}{''.join(body)}</table>"


def render_cka(fig: Figure, run: RunFiles | None, blocks: Sequence[str]) -> None:
    """The run's CKA matrix (rows natural, columns adversarial inputs) over the chosen blocks."""
    if run is None:
        return _message(fig, "select a focus run", "CKA")
    if run.cka is None:
        return _message(fig, f"no cka.json in {run.label}\n(layerlab cka --run {run.path})", f"CKA: {run.label}")
    data = run.cka
    rows, cols, matrix = cka_view(data, blocks)
    if not matrix.size:
        return _message(fig, "none of the chosen blocks is in cka.json", f"CKA: {run.label}")
    ax = _axes(fig, 1, width=4.8, height=4.0)[0]
    draw_cka(ax, rows, cols, matrix, annot=len(matrix) <= 8)
    ax.set(title=f"CKA {data.get('mode', '')}: {run.label} (n={data.get('n')})",
           xlabel=data.get("col_label", "columns"), ylabel=data.get("row_label", "rows"))


def stats_at(stats, epoch: int):
    """Layer statistics of ``epoch``, or of the last recorded epoch before it (the first one before any)."""
    if stats is None:
        return None
    epochs = sorted(stats["epoch"].unique())
    before = [e for e in epochs if e <= epoch]
    chosen = before[-1] if before else epochs[0]
    return stats[stats["epoch"] == chosen]


def block_gradients_at(stats, epoch: int, blocks: Sequence[str] = ()) -> dict[str, float]:
    """Mean |gradient| per block at ``epoch`` (tensors weighted by their number of entries), chosen blocks only."""
    frame = stats_at(stats, epoch)
    if frame is None:
        return {}
    out = {}
    for block in dict.fromkeys(frame["block"]):
        if blocks and block not in blocks:
            continue
        part = frame[frame["block"] == block]
        out[block] = float((part["grad_mean_abs"] * part["numel"]).sum() / part["numel"].sum())
    return out


def render_grads(fig: Figure, selected: Sequence[RunFiles], blocks: Sequence[str], epoch: int) -> None:
    """Mean |gradient| per block and % of conv/linear weights updated per layer at ``epoch``, per run."""
    with_stats = [run for run in selected if run.stats is not None]
    if not with_stats:
        return _message(fig, "no layer_stats.jsonl in the selected runs", "gradients and masks")
    ax_g, ax_u = _axes(fig, 2, width=4.6, height=3.6)
    grads = {run.label: block_gradients_at(run.stats, epoch, blocks) for run in with_stats}
    shown = list(dict.fromkeys(b for g in grads.values() for b in g))
    updated = {run.label: updated_percent(run, epoch, blocks) for run in with_stats}
    position = {p: i for i, p in enumerate(dict.fromkeys(p for u in updated.values() for p in u.index))}
    width = 0.8 / len(with_stats)
    for i, run in enumerate(with_stats):
        values = [grads[run.label].get(b, np.nan) for b in shown]
        ax_g.bar(np.arange(len(shown)) + (i - (len(with_stats) - 1) / 2) * width, values, width=width,
                 label=run.label, color=f"C{i % 10}")
        layers = updated[run.label]
        ax_u.plot(layers.index.map(position).to_numpy(), layers.to_numpy(), marker="o", markersize=3,
                  linestyle="none" if len(layers) < 2 else "-", label=run.label, color=f"C{i % 10}")
    ax_g.set_xticks(np.arange(len(shown)))
    ax_g.set_xticklabels(shown, rotation=45, ha="right")
    ax_g.set_yscale("log")
    ax_g.set(ylabel="mean |gradient|", title=f"gradient per block, epoch {epoch}")
    ax_g.legend(fontsize="x-small")
    ax_u.set(xlabel="layer (conv/linear weights, forward order)", ylabel="weights updated per step (%)",
             ylim=(0, 105), title="updated (100 - masked) per layer")


def nearest_checkpoint(lsc, epoch: int) -> str:
    """The lsc.csv checkpoint whose epoch is nearest ``epoch`` (the earlier one on a tie)."""
    cks = lsc.drop_duplicates("checkpoint")[["checkpoint", "epoch"]]
    cks = cks.assign(dist=(cks["epoch"].fillna(epoch) - epoch).abs()).sort_values(["dist", "epoch"], kind="stable")
    return str(cks.iloc[0]["checkpoint"])


def render_lsc(fig: Figure, run: RunFiles | None, epoch: int) -> None:
    """LSC landscapes of the checkpoint nearest ``epoch`` and the removal rate over training (marked)."""
    if run is None:
        return _message(fig, "select a focus run", "LSC")
    if run.lsc is None:
        return _message(fig, f"no lsc.csv in {run.label}\n(layerlab lsc --run {run.path})", f"LSC: {run.label}")
    chosen = nearest_checkpoint(run.lsc, epoch)
    part = run.lsc[run.lsc["checkpoint"] == chosen]
    ax_l, ax_r = _axes(fig, 2, width=4.4, height=3.6)
    draw_lsc_landscape(part, ax_l, f"{run.label}: {chosen}")
    if run.removal is not None:
        rem = run.removal.sort_values("epoch")
        draw_removal_rate(rem, ax_r)
        near = rem.iloc[(rem["epoch"] - epoch).abs().argsort().iloc[0]]
        ax_r.plot([near["epoch"]], [100 * near["removal_rate"]], marker="*", markersize=14, color="C3")
        ax_r.set_title("removal rate")
    else:
        ax_r.axis("off")


# --------------------------------------------------------------------------------------
# what-if runs
# --------------------------------------------------------------------------------------


def spec_of(blocks: Sequence[str], n_blocks: int) -> str:
    """The update spec of chosen parts: ``block2, block3`` -> ``23``, ``head`` -> ``N+1``."""
    digits = []
    for b in blocks:
        if b == "head":
            digits.append(str(n_blocks + 1))
        elif b.startswith("block") and b[5:].isdigit():
            digits.append(b[5:])
        else:
            raise ValueError(f"cannot update {b!r} on its own; choose block1..block{n_blocks} or head")
    if not digits:
        raise ValueError("choose at least one block to update")
    return "".join(sorted(digits, key=int))


def whatif_config(base_run: str | Path, spec: str, *, reinit: bool = True, epochs: int = 2, method: str = "at"):
    """A smoke-scale run that starts from ``base_run``'s best weights and updates only ``spec``."""
    base = Path(base_run)
    cfg = TrainConfig.from_dict(runs.read_json(base / "config.json")["config"])
    size = min(cfg.train_size or WHATIF_TRAIN_SIZE, WHATIF_TRAIN_SIZE)
    return cfg.replace(method=method, method_args={}, init=str(base / "checkpoints" / "best.pt"), update=spec,
                       reinit=reinit, epochs=epochs, train_size=size)


def whatif_dir(root: Path, spec: str, reinit: bool) -> Path:
    """Where a what-if run goes: ``ROOT/whatif/U-SPEC`` (``-noreinit`` when fine-tuning)."""
    return root / WHATIF_DIR / (f"U-{spec}" + ("" if reinit else "-noreinit"))


def _progress_callback(bar: widgets.IntProgress, label: widgets.HTML):
    """A trainer callback that advances ``bar`` each step and reports each finished epoch."""
    class WidgetProgress(Callback):
        def after_step(self, model) -> None:
            bar.value = min(bar.max, bar.value + 1)

        def on_epoch_end(self, epoch, model, run_dir) -> None:
            row = runs.read_jsonl(Path(run_dir) / "metrics.jsonl")[-1]
            if "natural_acc" not in row:  # an epoch without the per-epoch evaluation (TrainConfig.eval_every)
                label.value = f"epoch {epoch}: training accuracy {row['train_acc']:.1f}% (not evaluated)"
                return
            label.value = (f"epoch {epoch}: natural {row['natural_acc']:.1f}%, "
                           f"adversarial {row.get('robust_acc') or 0:.1f}%")

    return WidgetProgress()


# --------------------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------------------


class FigurePanel(widgets.Box):
    """One figure of the app in an ipympl canvas: zoom and pan from its toolbar (shown while the mouse is over
    the figure), the data under the cursor below it. :attr:`png` is the figure as PNG bytes (snapshots, tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.add_class(FIGURE_CLASS)
        self.figure = Figure(dpi=PANEL_DPI)
        self.canvas = Canvas(self.figure)
        self.canvas.header_visible = False
        FigureManager(self.canvas, 0)  # gives the canvas its toolbar
        self.children = (self.canvas,)

    def draw(self, render: Callable[..., None], *args: Any) -> None:
        """Redraw the figure with ``render(figure, *args)``; zoom and pan start afresh."""
        render(self.figure, *args)
        self.figure.tight_layout()  # the canvas shows the whole figure: keep the labels inside it
        self.canvas.toolbar.update()
        self.canvas.draw_idle()

    @property
    def png(self) -> bytes:
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=PANEL_DPI, bbox_inches="tight")
        return buf.getvalue()


class Explorer(widgets.VBox):
    """The explorer app: a VBox of controls, four figure panels, a per-epoch table and the what-if panel."""

    def __init__(self, run_root: str | Path, *, select: Sequence[str] | None = None, whatif_epochs: int = 2,
                 runs: Sequence[str] | None = None):
        """``runs``: show only these runs of the root (by name relative to it; default: every run found)."""
        self.root = Path(run_root).expanduser().resolve()
        self._only = None if runs is None else set(runs)
        self._updating = False
        self._cache: dict[str, tuple[tuple, RunFiles]] = {}
        self._paths: dict[str, Path] = {}
        self._busy = False
        self._thread: threading.Thread | None = None
        self.last_whatif: dict[str, Any] | None = None

        self.title = widgets.HTML(f"<h3>layerlab explorer: <code>{html.escape(str(self.root))}</code></h3>")
        self.run_select = widgets.SelectMultiple(description="runs", rows=8,
                                                 layout=widgets.Layout(width="320px"))
        self.block_select = widgets.SelectMultiple(description="blocks", rows=8,
                                                   layout=widgets.Layout(width="230px"))
        self.epoch = widgets.IntSlider(description="epoch", min=1, max=1, value=1, continuous_update=False)
        self.play = widgets.Play(min=1, max=1, value=1, interval=900, description="play epochs")
        widgets.jslink((self.play, "value"), (self.epoch, "value"))
        self.mode = widgets.ToggleButtons(options=list(MODES), value="adversarial", description="accuracy")
        self.focus = widgets.Dropdown(description="focus run", layout=widgets.Layout(width="320px"))
        self.rescan_button = widgets.Button(description="rescan runs", icon="refresh")
        self.status = widgets.HTML()

        self.curves_panel, self.cka_panel, self.grads_panel, self.lsc_panel = (FigurePanel() for _ in range(4))
        self.table = widgets.HTML()

        self.whatif_base = widgets.Dropdown(description="start from")
        self.whatif_blocks = widgets.SelectMultiple(description="update", rows=5)
        self.whatif_reinit = widgets.Checkbox(value=True, description="re-initialize updated blocks")
        self.whatif_epochs = widgets.IntSlider(description="epochs", min=1, max=10, value=whatif_epochs)
        self.whatif_button = widgets.Button(description="launch what-if run", button_style="primary", icon="play")
        self.whatif_progress = widgets.IntProgress(value=0, min=0, max=1, description="progress")
        self.whatif_log = widgets.HTML("freeze every block but the chosen ones and train them adversarially")

        self.hint = widgets.HTML(f"<small>{html.escape(SELECT_HINT)}</small>")
        controls = widgets.HBox([widgets.VBox([widgets.HBox([self.run_select, self.block_select]), self.hint]),
                                 widgets.VBox([widgets.HBox([self.play, self.epoch]), self.mode, self.focus,
                                               self.rescan_button, self.status])])
        panels = widgets.Box([self.curves_panel, self.cka_panel, self.grads_panel, self.lsc_panel],
                             layout=widgets.Layout(flex_flow="row wrap"))  # as many side by side as fit
        whatif = widgets.VBox([widgets.HBox([self.whatif_base, self.whatif_blocks]),
                               widgets.HBox([self.whatif_reinit, self.whatif_epochs]),
                               widgets.HBox([self.whatif_button, self.whatif_progress]), self.whatif_log])
        self.whatif_panel = widgets.Accordion(children=[whatif], titles=("what if: freeze / update blocks",),
                                              selected_index=0)
        super().__init__(children=[self.title, controls, self.table, panels, self.whatif_panel])
        self.add_class(APP_CLASS)

        self.run_select.observe(self.on_runs, names="value")
        self.block_select.observe(self.on_blocks, names="value")
        self.epoch.observe(self.on_epoch, names="value")
        self.mode.observe(self.on_mode, names="value")
        self.focus.observe(self.on_focus, names="value")
        self.whatif_base.observe(self.on_whatif_base, names="value")
        self.rescan_button.on_click(lambda _: self.rescan())
        self.whatif_button.on_click(lambda _: self.launch_whatif())
        self.rescan(select)

    # ---- data -------------------------------------------------------------------------

    def run(self, label: str) -> RunFiles:
        """The files of run ``label`` (re-read when they changed on disk)."""
        path = self._paths[label]
        sig = _signature(path)
        cached = self._cache.get(label)
        if cached is None or cached[0] != sig:
            self._cache[label] = (sig, read_run_files(label, path))
        return self._cache[label][1]

    def selected(self) -> list[RunFiles]:
        return [self.run(label) for label in self.run_select.value if label in self._paths]

    def focus_run(self) -> RunFiles | None:
        return self.run(self.focus.value) if self.focus.value in self._paths else None

    # ---- callbacks ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """Change several controls without each change redrawing the panels (one redraw follows)."""
        outer = self._updating
        self._updating = True
        try:
            yield
        finally:
            self._updating = outer

    def rescan(self, select: Sequence[str] | None = None) -> None:
        """Find the root's runs again, keep the selection (or choose ``select``), redraw everything."""
        self._paths = {k: p for k, p in discover_runs(self.root).items() if self._only is None or k in self._only}
        labels = list(self._paths)
        keep = [v for v in (select if select is not None else self.run_select.value) if v in self._paths]
        # the first AT run and the first CURE run (shortest names first: ``AT`` before ``AT-s1``), else two runs
        by_name = sorted(labels, key=lambda lab: (len(lab), lab))
        methods = {lab: self.run(lab).method for lab in by_name}
        default = [next(lab for lab in by_name if methods[lab] == m) for m in ("at", "cure")
                   if m in methods.values()] or labels[:2]
        st_runs = [lab for lab in labels if self.run(lab).method == "st" and (self._paths[lab] / "checkpoints"
                                                                             / "best.pt").exists()]
        with self._quiet():
            self.run_select.options = labels
            self.run_select.value = tuple(keep or default)
            self.whatif_base.options = st_runs
            if st_runs and self.whatif_base.value not in st_runs:
                self.whatif_base.value = st_runs[0]
        self.on_whatif_base()
        self.status.value = (f"{len(labels)} runs" if labels else
                             f"no runs (directories with metrics.jsonl) under {html.escape(str(self.root))}")
        self.on_runs()

    def select_runs(self, labels: Sequence[str]) -> None:
        """Select these runs (unknown labels are ignored) and redraw."""
        with self._quiet():
            self.run_select.value = tuple(label for label in labels if label in self._paths)
        self.on_runs()

    def on_runs(self, change: Any = None) -> None:
        """New run selection: blocks, epoch range and focus choices follow, then every panel redraws."""
        if self._updating:
            return
        chosen = self.selected()
        blocks = list(dict.fromkeys(b for run in chosen for b in run.blocks))
        last = max((max(run.epochs, default=1) for run in chosen), default=1)
        with self._quiet():
            kept = [b for b in self.block_select.value if b in blocks]
            self.block_select.options = blocks
            self.block_select.value = tuple(kept or blocks)
            at_end = self.epoch.value >= self.epoch.max
            self.epoch.max = self.play.max = max(1, last)
            if at_end or self.epoch.value > last:
                self.epoch.value = max(1, last)
            self.play.value = self.epoch.value  # the browser's jslink copies the play value onto the slider
            labels = [run.label for run in chosen]
            focus = self.focus.value if self.focus.value in labels else (labels[0] if labels else None)
            self.focus.options = labels
            self.focus.value = focus
        self.redraw()

    def on_blocks(self, change: Any = None) -> None:
        if not self._updating:
            self.update_cka()
            self.update_grads()

    def on_epoch(self, change: Any = None) -> None:
        if not self._updating:
            self.update_curves()
            self.update_grads()
            self.update_lsc()

    def on_mode(self, change: Any = None) -> None:
        if not self._updating:
            self.update_curves()

    def on_focus(self, change: Any = None) -> None:
        if not self._updating:
            self.update_cka()
            self.update_lsc()

    def on_whatif_base(self, change: Any = None) -> None:
        """The what-if block choices are the base run's residual blocks and head."""
        base = self.whatif_base.value
        parts = [b for b in self.run(base).blocks if b != "stem"] if base in self._paths else []
        self.whatif_blocks.options = parts
        self.whatif_button.disabled = not parts
        if not parts:
            self.whatif_log.value = "the what-if panel needs an ST run (method st) in the run root"

    # ---- panels --------------------------------------------------------------------------

    def update_curves(self) -> None:
        chosen = self.selected()
        self.curves_panel.draw(render_curves, chosen, self.mode.value, self.epoch.value)
        self.table.value = summary_table(chosen, self.mode.value, self.epoch.value)

    def update_cka(self) -> None:
        self.cka_panel.draw(render_cka, self.focus_run(), self.block_select.value)

    def update_grads(self) -> None:
        self.grads_panel.draw(render_grads, self.selected(), self.block_select.value, self.epoch.value)

    def update_lsc(self) -> None:
        self.lsc_panel.draw(render_lsc, self.focus_run(), self.epoch.value)

    def redraw(self) -> None:
        """Redraw every panel."""
        self.update_curves()
        self.update_cka()
        self.update_grads()
        self.update_lsc()

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write the current panels (PNG) and table (HTML) into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, panel in (("curves", self.curves_panel), ("cka", self.cka_panel), ("grads", self.grads_panel),
                            ("lsc", self.lsc_panel)):
            paths[name] = out / f"explorer_{name}.png"
            paths[name].write_bytes(panel.png)
        paths["table"] = out / "explorer_table.html"
        paths["table"].write_text(self.table.value)
        return paths

    # ---- what if ---------------------------------------------------------------------------

    def launch_whatif(self, background: bool = True) -> threading.Thread | dict[str, Any] | None:
        """Train the what-if run (in a thread unless ``background`` is False); select it when done."""
        if self._busy:
            self.whatif_log.value = "a what-if run is already training"
            return None
        base = self.whatif_base.value
        if base not in self._paths:
            self.whatif_log.value = "no ST run to start from"
            return None
        try:
            n_blocks = sum(1 for b in self.run(base).blocks if b.startswith("block"))
            spec = spec_of(self.whatif_blocks.value, n_blocks)
            cfg = whatif_config(self._paths[base], spec, reinit=self.whatif_reinit.value,
                                epochs=self.whatif_epochs.value)
            splits = splits_for(cfg)
        except (ValueError, FileNotFoundError) as err:
            self.whatif_log.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
            return None
        out = whatif_dir(self.root, spec, cfg.reinit)
        self.whatif_progress.max = cfg.epochs * math.ceil(len(splits.train) / cfg.batch_size)
        self.whatif_progress.value = 0
        self.whatif_log.value = f"training U-{spec} from {html.escape(base)} for {cfg.epochs} epochs ..."
        self._busy = True
        self.whatif_button.disabled = True
        if not background:
            return self._train_whatif(cfg, out, splits)
        self._thread = threading.Thread(target=self._train_whatif, args=(cfg, out, splits), daemon=True)
        self._thread.start()
        return self._thread

    def _train_whatif(self, cfg, out: Path, splits) -> dict[str, Any] | None:
        try:
            result = train(cfg, out, overwrite=True, progress=False, splits=splits,
                           callbacks=[_progress_callback(self.whatif_progress, self.whatif_log)])
        except Exception as err:  # shown in the app: a failed run must not kill the widget thread silently
            self.whatif_log.value = f"<span style='color:#b00'>failed: {html.escape(str(err))}</span>"
            return None
        finally:
            self._busy = False
            self.whatif_button.disabled = False
        self.last_whatif = {"run": out, "summary": result}
        self.whatif_progress.value = self.whatif_progress.max
        self.whatif_log.value = (f"done: {html.escape(out.name)} natural {result['natural_acc']:.1f}%, "
                                 f"PGD-{result['attack']['steps']} {result['robust_acc']:.1f}%")
        self.rescan(select=[*self.run_select.value, str(out.relative_to(self.root))])
        return result


def explore(run_root: str | Path = "runs/reproduce", **kwargs: Any) -> Explorer:
    """The explorer app for ``run_root`` (display it in a notebook, or serve it with ``layerlab explore``);
    ``select=[...]`` chooses the runs shown first (default: the first AT run and the first CURE run when present)."""
    return Explorer(run_root, **kwargs)


# --------------------------------------------------------------------------------------
# serving with Voilà
# --------------------------------------------------------------------------------------


def app_notebook(run_root: str | Path, path: str | Path) -> Path:
    """Write the notebook that ``layerlab explore`` serves: a loading message (plain markdown, shown at once
    under progressive rendering and hidden by CSS once the app is on the page), then the explorer of ``run_root``."""
    import nbformat

    root = str(Path(run_root).resolve())
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    loading = (f"<style>body:has(.{APP_CLASS}) .layerlab-loading {{display: none}}</style>\n"
               f"<p class='layerlab-loading'>Loading the layerlab explorer of <code>{html.escape(root)}</code>: "
               "starting Python and reading the runs takes a few seconds ...</p>")
    nb.cells = [nbformat.v4.new_markdown_cell(loading),
                nbformat.v4.new_code_cell(f"import layerlab\nlayerlab.explore({root!r})")]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def voila_command(notebook: str | Path, port: int = 8866, open_browser: bool = False,
                  cull_idle: int = KERNEL_CULL_IDLE, cull_interval: int = KERNEL_CULL_INTERVAL) -> list[str]:
    """The Voilà command line that serves ``notebook`` on localhost:``port``.

    Cells render as they finish (progressive rendering), so the loading message shows before the kernel has
    imported anything; a kernel whose page is gone (closed tab, killed browser) is shut down once it has been
    idle ``cull_idle`` seconds, checked every ``cull_interval`` seconds.
    """
    cmd = [sys.executable, "-m", "voila", str(notebook), f"--port={port}", "--Voila.ip=127.0.0.1",
           "--theme=light", "--VoilaConfiguration.progressive_rendering=True",
           f"--MappingKernelManager.cull_idle_timeout={cull_idle}",
           f"--MappingKernelManager.cull_interval={cull_interval}"]
    if not open_browser:
        cmd.append("--no-browser")
    return cmd


class _CallableModule(types.ModuleType):
    """Lets ``layerlab.explore(root)`` work although ``layerlab.explore`` is this module."""

    def __call__(self, run_root: str | Path = "runs/reproduce", **kwargs: Any) -> Explorer:
        return explore(run_root, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
