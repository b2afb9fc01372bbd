"""What the figure notebooks (``notebooks/NN_*.ipynb``) call, and how their committed outputs are made.

Every notebook has the papermill parameters :data:`PARAMETERS` (its parameters cell is :func:`parameters_source`).
Without a ``PROFILE`` a notebook draws its group again from the committed records into the committed gallery
(:func:`draw` -> :func:`~layerlab.gallery.manifest.redraw`: nothing trains, and an up-to-date group is left
byte for byte as it was); with one it makes the group at that profile (:func:`~layerlab.gallery.manifest.make`).
:func:`verdict` shows the verdicts of the papers' claims the group shows (:mod:`layerlab.claims`, from the committed
experiments' per-run results), the papers' published numbers beside ours (:mod:`~layerlab.gallery.reference`), or,
for a group with neither, the numbers of the runs it was drawn from. :func:`execute` runs the notebooks for
committing (``layerlab notebooks``): papermill with the default parameters, one thread, no volatile metadata; a
group whose manifest does not match its records, or that the records cannot draw (it was drawn by an earlier
definition of the group), is committed without outputs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from layerlab import claims, runs
from layerlab.records import NotRecorded
from layerlab.gallery.manifest import MANIFEST, make, read_manifests, redraw, verify, write_readme
from layerlab.gallery.reference import comparison_table, markdown_table
from layerlab.gallery.settings import FIGURES_DIR, GALLERY_DIR, GROUPS, RUN_ROOT, PathMap, base_config, group_of

NOTEBOOKS_DIR = "notebooks"  # where the notebooks are, relative to the repository root; they run from there
REPOSITORY = Path("..")  # the repository root, relative to the notebooks' working directory
EXPERIMENTS = "results/experiments"  # the experiments' per-run results (NAME-runs.csv) the claims are checked on
# name -> (default, what it means); the defaults' only home: every notebook's parameters cell is parameters_source()
PARAMETERS: dict[str, tuple[Any, str]] = {
    "PROFILE": (None, "None: draw the committed figures again from the records in results/ (nothing trains); "
                      "tiny (about a minute, digits) | smoke | cpu (hours, CIFAR-10 subset) | paper: make them"),
    "RUN_ROOT": ((REPOSITORY / RUN_ROOT).as_posix(), "with a PROFILE: the run root every notebook shares "
                                                     "(runs already there are re-used, never retrained)"),
    "DATA_DIR": (None, "where CIFAR-10 lives for cpu/paper (None: $LAYERLAB_DATA); tiny and smoke use digits"),
    "FIGURES": (None, f"None: {(REPOSITORY / GALLERY_DIR).as_posix()} without a PROFILE, "
                      f"{(REPOSITORY / FIGURES_DIR).as_posix()} with one; one folder per notebook"),
}
WIDGET_OUTPUTS = ("application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json")


def parameters_source() -> str:
    """The source of every notebook's papermill parameters cell."""
    return "\n".join(["# Parameters (papermill overrides them: papermill NB.ipynb OUT.ipynb -p PROFILE tiny)"]
                     + [f"{name} = {value!r}  # {doc}" for name, (value, doc) in PARAMETERS.items()])


def figures_dir(profile: str | None, figures: str | Path | None) -> Path:
    """The gallery a notebook draws into: ``figures``, else the committed one (no profile) or the made one."""
    if figures is not None:
        return Path(figures)
    return REPOSITORY / (GALLERY_DIR if profile is None else FIGURES_DIR)


def draw(key: str, profile: str | None, run_root: str | Path, figures: str | Path | None,
         data_dir: str | None = None) -> PathMap:
    """What a notebook calls: without ``profile``, draw group ``key`` again from the records its committed
    manifest names (:func:`redraw`, nothing trains) and rewrite the gallery's README; with one, make it at that
    profile in ``run_root`` (:func:`make`). Returns ``{name: path}``."""
    out = figures_dir(profile, figures)
    if profile is None:
        paths = redraw(key, out, data_dir, progress=False)
        write_readme(out)
        return paths
    return make(key, profile, run_root, out, data_dir)


def verdict_markdown(key: str, figures: str | Path, experiments: str | Path = REPOSITORY / EXPERIMENTS) -> str:
    """Markdown: the verdicts of the claims group ``key`` shows, checked on ``experiments/*-runs.csv``; the papers'
    numbers beside the group's table in ``figures``; or, when it has neither, the runs its manifest read."""
    group = group_of(key)
    known = {c.key: c for c in claims.CLAIMS}
    unknown = [k for k in group.claims if k not in known]
    if unknown:
        raise ValueError(f"group {key} names unknown claims {unknown}; choose from {', '.join(known)}")
    group_dir = Path(figures) / group.folder
    parts = []
    if group.claims:
        rows = claims.read_rows(sorted(Path(experiments).glob("*-runs.csv")))
        parts += [f"**Verdicts** of the papers' claims this group shows, from the per-run results in "
                  f"`{EXPERIMENTS}/*-runs.csv` (`python -m layerlab.claims {EXPERIMENTS}`): 95% Student-t intervals "
                  f"of the group means over training seeds, inconclusive under {claims.MIN_SEEDS} seeds.", "",
                  claims.claims_table(rows, [known[k] for k in group.claims])]
    table = comparison_table(key, group_dir)
    if table:
        parts += ["**The paper's numbers beside ours**, from the table above.", "", *table]
    if not parts:
        used = runs.read_json(group_dir / MANIFEST)["runs"]
        columns = ["run", "method", "epochs", "natural_acc", "robust_acc", "nrr", "best_epoch"]
        parts += ["No claim of `layerlab.claims` rests on this group and the papers print no numbers for it; "
                  "the runs it was drawn from (last checkpoint, PGD-20):", "",
                  *markdown_table([{c: r[c] for c in columns} for r in used], columns)]
    return "\n".join(parts).rstrip("\n") + "\n"


def verdict(key: str, profile: str | None, figures: str | Path | None) -> None:
    """Show :func:`verdict_markdown` of group ``key`` as a notebook draws it (``profile`` and ``figures`` as
    given to :func:`draw`); printed outside a notebook."""
    text = verdict_markdown(key, figures_dir(profile, figures))
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:
        get_ipython = None  # noqa: N806
    if get_ipython is None or get_ipython() is None:
        print(text, end="")
    else:
        display(Markdown(text))


def _strip(nb: Any) -> Any:
    """A notebook without what changes between executions or names this machine: papermill's and the kernel's
    metadata, timings, stderr (warnings, progress) and widget outputs and state."""
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("widgets", None)
    nb.metadata["language_info"] = {"name": nb.metadata.get("language_info", {}).get("name", "python")}
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if not cell.metadata.get("tags", True):
            cell.metadata.pop("tags")
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.outputs:
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                continue
            for mime in WIDGET_OUTPUTS:
                out.get("data", {}).pop(mime, None)
            if out.get("output_type") in ("display_data", "execute_result") and not out.get("data"):
                continue
            kept.append(out)
        cell.outputs = kept
    return nb


def paths_named(nb: Any, paths: Sequence[str | Path]) -> list[str]:
    """The ``paths`` a notebook's text names (its sources and outputs, images left out: base64 may hold anything)."""
    text = [c.source for c in nb.cells]
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text += [str(v) for k, v in out.get("data", {}).items() if not k.startswith("image/")]
            text += [str(out.get("text", "")), str(out.get("metadata", ""))]
    text.append(str(nb.metadata))
    joined = "\n".join(text)
    return [str(p) for p in paths if str(p) in joined]


def clear(nb: Any) -> Any:
    """A notebook without outputs and execution counts."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return _strip(nb)


def execute(notebooks: str | Path = NOTEBOOKS_DIR, only: Sequence[str] | None = None) -> dict[str, str]:
    """Execute the figure notebooks in place with their default parameters, as they are committed: each group is
    drawn again from the records (nothing trains) and shown. A group whose manifest does not match its records
    (:func:`verify`) is left without outputs. Returns ``{key: what was done}``."""
    import nbformat
    import papermill

    notebooks = Path(notebooks)
    groups = [group_of(k) for k in only] if only else list(GROUPS.values())  # every name checked first
    figures = notebooks / figures_dir(None, None)
    if not figures.is_dir():
        raise FileNotFoundError(f"{figures} does not exist; run from the repository root or pass --notebooks DIR")
    profiles = {m["profile"] for m in read_manifests(figures) if m["key"] in {g.key for g in groups}}
    if not os.environ.get("LAYERLAB_DATA") and any(base_config(p).dataset != "digits" for p in profiles):
        raise FileNotFoundError(f"the groups were drawn at profile {', '.join(sorted(profiles))}, whose data a "
                                f"redraw loads; set LAYERLAB_DATA=DIR to the directory holding it")
    problems = verify(figures)
    machine = [notebooks.resolve().parent, Path(tempfile.gettempdir()).resolve()]
    # one thread; the kernels import the library of the checkout the notebooks are in
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(machine[0]), *filter(None, [os.environ.get("PYTHONPATH")])])}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    done = {}
    try:
        for group in groups:
            path = notebooks / group.notebook
            stale = [p for p in problems if p.startswith((f"{group.folder}:", f"{group.folder}/"))]
            if stale:
                nbformat.write(clear(nbformat.read(path, as_version=4)), path)
                done[group.key] = f"outputs cleared: {len(stale)} record problem(s), e.g. {stale[0]}"
                continue
            with tempfile.TemporaryDirectory(prefix="layerlab-notebook-") as tmp:
                executed = Path(tmp) / group.notebook
                try:
                    papermill.execute_notebook(str(path), str(executed), cwd=str(notebooks), kernel_name="python3",
                                               progress_bar=False, log_output=False)
                except papermill.PapermillExecutionError as err:
                    if err.ename != NotRecorded.__name__:
                        raise
                    # drawn by an earlier definition of the group: the current one reads runs the records lack
                    nbformat.write(clear(nbformat.read(path, as_version=4)), path)
                    done[group.key] = f"outputs cleared: the group cannot be drawn from the records ({err.evalue})"
                    continue
                nb = _strip(nbformat.read(executed, as_version=4))
            found = paths_named(nb, machine)
            if found:
                raise ValueError(f"{path}: its outputs name {found[0]}; show paths relative to the notebook")
            nbformat.write(nb, path)
            done[group.key] = "executed"
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return done
