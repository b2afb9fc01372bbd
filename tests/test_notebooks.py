"""The figure notebooks: each tells its figure group's story (title, claim, one papermill parameters cell, the
call, the figures and tables, the verdict computed by the library, the gallery link); committed with the outputs
of `layerlab notebooks` (drawn from the committed records), which must match the committed gallery, except the
groups drawn from replaced records (no outputs); and every notebook runs top to bottom at smoke scale, in order,
on one shared run root (later notebooks re-use earlier runs)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

from committed_gallery import PENDING, REPO, STALE  # noqa: E402
from layerlab import claims  # noqa: E402
from layerlab.gallery import GROUPS  # noqa: E402
from layerlab.gallery.manifest import SHOWN  # noqa: E402
from layerlab.gallery.notebooks import (EXPERIMENTS, clear, execute, parameters_source, paths_named,  # noqa: E402
                                        verdict_markdown)

NOTEBOOKS = REPO / "notebooks"
# The numbers the tiny gallery reported at 7bd14fd, before the gallery became a package (gallery_numbers); the
# tables that since report seeds (mean and std at both checkpoints) are left out, their runs' numbers are kept.
RECORDED = Path(__file__).resolve().parent / "data" / "tiny_gallery_numbers.json"
ORDER = [g.notebook for g in GROUPS.values()]
GROUP = {g.notebook: g for g in GROUPS.values()}
SLOW = {"10_rwp_ablations.ipynb", "11_cure_ablation.ipynb"}  # the most training: several extra runs each


def read(name: str):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_notebooks_match_the_figure_registry():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(ORDER)
    assert ORDER == sorted(ORDER)  # numbered in the order they run


def test_each_claim_is_shown_by_one_figure_group():
    shown = [k for g in GROUPS.values() for k in g.claims]
    assert sorted(shown) == sorted(c.key for c in claims.CLAIMS), "name each claim in exactly one FigureGroup.claims"


@pytest.mark.parametrize("name", ORDER)
def test_notebook_tells_its_story_in_order(name):
    """Title, the parameters cell (the library's), the call, the figures, the verdict, the gallery link."""
    nb, group = read(name), GROUP[name]
    title, parameters = nb.cells[:2]
    assert title.cell_type == "markdown" and title.source.startswith(f"# {group.number:02d} · {group.title}\n")
    assert parameters.cell_type == "code" and "parameters" in parameters.metadata.get("tags", [])
    assert parameters.source == parameters_source()  # every default has one home: gallery.notebooks.PARAMETERS
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    calls = [f'gallery.draw("{group.key}", PROFILE, RUN_ROOT, FIGURES, DATA_DIR)', "gallery.show(paths)",
             f'gallery.verdict("{group.key}", PROFILE, FIGURES)']
    at = [next(i for i, source in enumerate(code) if call in source) for call in calls]
    assert at == sorted(at), "draw, show, then the verdict"
    link = f"(../figures/README.md#{group.folder})"
    assert link in nb.cells[-1].source and nb.cells[-1].cell_type == "markdown"
    assert f"\n## {group.folder}\n" in (REPO / "figures" / "README.md").read_text()  # the anchor GitHub makes


def shown_outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if SHOWN in o.get("metadata", {})]


@pytest.mark.parametrize("name", ORDER)
def test_committed_outputs_are_the_committed_gallery(name):
    """CI's staleness check: every figure and table a committed notebook shows is the current file of figures/
    (the PNG's bytes, the table's sha256), its verdict is what the library computes now from the committed
    results, and nothing names this machine. Groups drawn from replaced records or by an earlier definition of the
    group (which cannot be drawn again from the records) are committed without outputs."""
    nb, group = read(name), GROUP[name]
    nbformat.validate(nb)
    assert paths_named(nb, [REPO, Path(tempfile.gettempdir()).resolve()]) == [], f"{name}: names a machine path"
    assert not {"papermill", "widgets"} & set(nb.metadata), f"{name}: execution metadata committed"
    code = [c for c in nb.cells if c.cell_type == "code"]
    if group.folder in STALE | PENDING:
        assert all(c.outputs == [] and c.execution_count is None for c in code), \
            f"{name}: its group reads replaced records or was drawn by an earlier definition; commit it without " \
            f"outputs (`layerlab notebooks` clears them)"
        return
    fix = f"re-execute it: LAYERLAB_DATA=DIR layerlab notebooks --only {group.key}"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{name}: not executed in order; {fix}"
    manifest = json.loads((REPO / "figures" / group.folder / "manifest.json").read_text())
    files = {f"{group.folder}/{f}" for f in manifest["files"].values()}
    shown = shown_outputs(nb)
    assert {o.metadata[SHOWN]["file"] for o in shown} == files, f"{name}: shows other files than its group; {fix}"
    for out in shown:
        path = REPO / "figures" / out.metadata[SHOWN]["file"]
        assert out.metadata[SHOWN]["sha256"] == sha256(path.read_bytes()), f"{name}: shows an older {path.name}; {fix}"
        if "image/png" in out.data:
            assert sha256(base64.b64decode(out.data["image/png"])) == sha256(path.read_bytes()), (name, path.name)
    cell = next(c for c in code if "gallery.verdict(" in c.source)
    assert [o.data["text/markdown"] for o in cell.outputs] == [
        verdict_markdown(group.key, REPO / "figures", REPO / EXPERIMENTS)], f"{name}: the verdict changed; {fix}"


def test_verdict_reads_the_claims_from_the_experiments_results(tmp_path):
    """The freeze study's verdicts follow the per-run results: U-23 well above SAT over three seeds each is
    reproduced; with two seeds it is inconclusive; the table is the claims' own (python -m layerlab.claims)."""
    group = GROUPS["freeze_study"]
    header = "run,group,seed,last_natural,last_robust,last_worst\n"
    rows = [f"U-23{s},U-23,{i},{60 + i},30,{28 + i}\n" for i, s in enumerate(("", "-s1", "-s2"))]
    rows += [f"AT{s},AT,{i},{40 + i},25,{20 + i}\n" for i, s in enumerate(("", "-s1", "-s2"))]
    (tmp_path / "study-runs.csv").write_text(header + "".join(rows))
    text = verdict_markdown("freeze_study", REPO / "figures", tmp_path)
    known = {c.key: c for c in claims.CLAIMS}
    table = claims.claims_table(claims.read_rows([tmp_path / "study-runs.csv"]), [known[k] for k in group.claims])
    assert table in text
    natural, robust = (line for line in text.splitlines() if line.startswith("| U-23 is more"))
    assert "61.0 ± 1.0 (n=3)" in natural and natural.endswith("**reproduced** |")
    assert robust.endswith("**reproduced** |")
    (tmp_path / "study-runs.csv").write_text(header + "".join(r for r in rows if "-s2" not in r))
    assert "**reproduced**" not in verdict_markdown("freeze_study", REPO / "figures", tmp_path)


def test_verdict_without_claims_shows_the_papers_numbers_or_the_runs_read(monkeypatch):
    import dataclasses
    import importlib

    settings = importlib.import_module("layerlab.gallery.settings")  # the package's `settings` is a function
    ablation = verdict_markdown("cure_ablation", REPO / "figures", REPO / EXPERIMENTS)
    assert ablation.index("**Verdicts**") < ablation.index("Published: CURE Table 7")
    monkeypatch.setitem(settings.GROUPS, "cure_ablation",
                        dataclasses.replace(settings.GROUPS["cure_ablation"], claims=()))
    ablation = verdict_markdown("cure_ablation", REPO / "figures", REPO / EXPERIMENTS)
    assert "Published: CURE Table 7" in ablation and "**Verdicts**" not in ablation
    overfitting = verdict_markdown("overfitting", REPO / "figures", REPO / EXPERIMENTS)  # claims, then the paper's
    assert overfitting.index("**Verdicts**") < overfitting.index("Published: CURE Table 3")
    gradients = verdict_markdown("gradients", REPO / "figures", REPO / EXPERIMENTS)
    manifest = json.loads((REPO / "figures" / "06_gradients" / "manifest.json").read_text())
    assert [line.split(" | ")[0][2:] for line in gradients.splitlines()[4:]] == [r["run"] for r in manifest["runs"]]


def test_clear_keeps_no_output_and_no_execution_metadata():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1", execution_count=3, outputs=[
        nbformat.v4.new_output("stream", name="stderr", text="warning from /somewhere"),
        nbformat.v4.new_output("display_data", data={"image/png": "iVBO", "text/plain": "<Image>"})])],
        metadata={"papermill": {"input_path": "/somewhere"}, "widgets": {}, "language_info": {"name": "python",
                                                                                            "version": "3.x"}})
    nb.cells[0].metadata.update(papermill={"duration": 1.0}, execution={"iopub.status.idle": "now"}, tags=[])
    cleared = clear(nb)
    assert cleared.cells[0].outputs == [] and cleared.cells[0].execution_count is None
    assert cleared.cells[0].metadata == {} and dict(cleared.metadata) == {"language_info": {"name": "python"}}


def test_paths_named_reads_text_and_metadata_not_images():
    image = nbformat.v4.new_output("display_data", data={"image/png": "iVBO/some/rootAAAA"})
    label = nbformat.v4.new_output("display_data", data={"text/markdown": "`/some/root/fig.png`"})
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("show()", outputs=[image])])
    assert paths_named(nb, ["/some/root"]) == []
    nb.cells[0].outputs.append(label)
    assert paths_named(nb, ["/some/root", "/elsewhere"]) == ["/some/root"]


def test_execute_names_the_missing_data_before_any_work(monkeypatch, snapshot_files):
    monkeypatch.delenv("LAYERLAB_DATA", raising=False)
    before = snapshot_files(NOTEBOOKS)
    with pytest.raises(FileNotFoundError, match="set LAYERLAB_DATA=DIR"):
        execute(NOTEBOOKS, only=["gradients"])
    assert snapshot_files(NOTEBOOKS) == before
    with pytest.raises(ValueError, match="unknown figure group"):
        execute(NOTEBOOKS, only=["nope"])


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """One run root and figure folder for every notebook of the session; one thread per kernel, which imports this
    checkout's library."""
    base = tmp_path_factory.mktemp("notebooks")
    old = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MPLBACKEND", "PYTHONPATH")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg",
                      PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [old["PYTHONPATH"]])]))
    yield {"runs": base / "runs", "figures": base / "figures", "executed": base / "executed"}
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def summaries(root: Path) -> dict[Path, int]:
    """Modification time of every finished run's summary.json (unchanged = the run was re-used)."""
    return {p: p.stat().st_mtime_ns for p in root.rglob("summary.json")}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in ORDER])
def test_notebook_runs_at_smoke_scale(name, shared):
    papermill = pytest.importorskip("papermill")
    before = summaries(shared["runs"])
    start = time.time()
    shared["executed"].mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(NOTEBOOKS / name), str(shared["executed"] / name), kernel_name="python3", progress_bar=False,
        cwd=str(NOTEBOOKS), execution_timeout=600, log_output=False,
        parameters={"PROFILE": "tiny", "RUN_ROOT": str(shared["runs"]), "DATA_DIR": None,
                    "FIGURES": str(shared["figures"])})  # raises PapermillExecutionError on any error
    after = summaries(shared["runs"])
    assert {p: after[p] for p in before} == before, "finished runs must be re-used, not retrained"
    groups = list(shared["figures"].glob(f"{name[:2]}_*"))
    assert len(groups) == 1, groups
    pngs = list(groups[0].glob("*.png"))
    assert pngs and all(p.stat().st_mtime >= start - 1 and p.stat().st_size > 2000 for p in pngs)
    executed = nbformat.read(shared["executed"] / name, as_version=4)
    shown = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "image/png" in o.get("data", {})]
    assert len(shown) == len(pngs), "gallery.show displays every figure the notebook wrote"


def test_cli_reproduce_makes_the_notebook_figures_from_the_same_runs(shared, tmp_path):
    """`layerlab reproduce` runs the notebooks' library calls: on the notebooks' run root it trains nothing
    and writes the same tables."""
    from typer.testing import CliRunner

    from layerlab.cli import app

    root = shared["runs"]
    before = summaries(root)
    result = CliRunner().invoke(app, ["reproduce", "--profile", "tiny", "--runs", str(root), "--figures",
                                      str(tmp_path), "--only", "tradeoff,gradients"])
    assert result.exit_code == 0, result.output
    assert summaries(root) == before
    table = "04_tradeoff/cure_table1_tradeoff.csv"
    if (shared["figures"] / table).exists():  # the notebook ran in this session
        assert (tmp_path / table).read_text() == (shared["figures"] / table).read_text()
    assert (tmp_path / "06_gradients" / "cure_fig6a_grads_per_block.png").exists()
    assert str(tmp_path / table) in result.output
    # provenance: a manifest per group, the runs' result files beside the figures, the README built from them
    manifest = json.loads((tmp_path / "04_tradeoff" / "manifest.json").read_text())
    assert manifest["command"].endswith("--runs RUN_ROOT --figures FIGURES --only tradeoff")  # outside the cwd
    assert str(root) not in (tmp_path / "04_tradeoff" / "manifest.json").read_text()  # no machine path
    assert not (tmp_path / "04_tradeoff" / "data").exists()  # no copies of run files: the manifest names them
    read = {(r["run"], r["file"]): r for r in manifest["reads"]}
    assert manifest["store"] is None and read["CURE-code", "eval.json"]["path"] == "RUN_ROOT/CURE-code/eval.json"
    assert {r["run"] for r in manifest["runs"]} == {"ST", "AT", "TRADES", "AWP", "RWP", "CURE-code"}
    assert not any(r["trained_in_call"] for r in manifest["runs"]) and manifest["calls"][-1]["training_seconds"] == 0
    assert {run for run, name in read if name == "eval.json"} == {"AT", "TRADES", "AWP", "RWP", "CURE-code"}
    # every evaluation the tradeoff read was timed when it was made (in the notebook session), once per run
    assert all(r["analysis_costs"].get("eval", 0) > 0 and r["uncosted"] == [] for r in manifest["runs"]
               if r["run"] != "ST")
    assert all(name.endswith((".json", ".jsonl", ".csv")) for _, name in read)
    readme = (tmp_path / "README.md").read_text()
    assert "## 04_tradeoff" in readme and "## 06_gradients" in readme and manifest["command"] in readme
    assert "epochs: 3 (paper: 200)" in readme


def test_reproduce_settings_per_profile():
    from layerlab.config import PROFILES, make_config
    from layerlab.gallery import SETTINGS, base_config, settings
    from layerlab.layerwise import paper_specs, parse_specs

    assert set(SETTINGS) == set(PROFILES)
    for profile, s in SETTINGS.items():
        for specs in (s.specs, s.noreinit_specs):
            assert parse_specs(",".join(specs)) == list(specs)
        assert base_config(profile) == make_config(profile)  # one profile, one config, under every command
    assert set(SETTINGS["tiny"].specs) < set(paper_specs(4))
    for profile in ("cpu", "paper"):  # the papers' full sets
        assert list(SETTINGS[profile].specs) == list(SETTINGS[profile].noreinit_specs) == paper_specs(4)
        assert "aa" in SETTINGS[profile].attacks and base_config(profile).dataset == "cifar10"
    assert base_config("tiny").dataset == base_config("smoke").dataset == "digits"
    with pytest.raises(ValueError, match="choose one of"):
        settings("laptop")


def test_reproduce_rejects_unknown_figures_before_training(tmp_path):
    from layerlab.gallery import reproduce

    with pytest.raises(ValueError, match="freeze_study"):
        reproduce("tiny", tmp_path / "runs", tmp_path / "figs", only=["nope"])
    assert not (tmp_path / "runs").exists()


def test_spread_keeps_the_ends():
    from layerlab.gallery.results import spread

    assert spread(list(range(9)), 3) == [0, 4, 8]
    assert spread(list(range(7)), 4) == [0, 2, 4, 6]
    assert spread([1, 2], 4) == [1, 2]
    assert spread([1, 2, 3], 1) == [3]


def test_method_runs_refuse_a_run_trained_otherwise(tmp_path):
    from layerlab.gallery import context
    from layerlab.gallery.runs import method_runs

    ctx = context("tiny", tmp_path / "runs", tmp_path / "figures")
    run = ctx.root / "AT"
    run.mkdir()
    other = ctx.cfg.replace(method="at", method_args={}, epochs=7)
    (run / "config.json").write_text(json.dumps({"config": other.to_dict()}))
    with pytest.raises(FileExistsError, match="other settings"):
        method_runs(ctx, ["at"])
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


def gallery_numbers(root: Path, figures: Path) -> dict[str, object]:
    """The numbers a gallery reports: its tables (without run directories, which are machine paths), each run's
    final and best accuracies, and each attack-suite result."""
    import pandas as pd

    out: dict[str, object] = {}
    for csv in sorted(c for c in figures.glob("*/**/*.csv") if c.parent.name != "data" and "data" not in c.parts[-3:-1]):
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False).drop(columns=["dir"], errors="ignore")
        out[csv.relative_to(figures).as_posix()] = [list(frame.columns)] + frame.values.tolist()
    for path in sorted(root.glob("*/summary.json")):
        s = json.loads(path.read_text())
        out[f"{path.parent.name}/summary.json"] = {k: (s[k] if k != "best" else {m: s[k][m] for m in ("natural_acc", "robust_acc")})
                                                   for k in ("natural_acc", "robust_acc", "nrr", "best_epoch", "best")}
    for path in sorted(root.glob("*/eval.json")):
        e = json.loads(path.read_text())
        out[f"{path.parent.name}/eval.json"] = {
            **{name: r["accuracy"] for name, r in e["results"].items()},
            **{f"eps {p['eps_255']:g}/255": p["accuracy"] for p in e.get("eps_sweep", {}).get("points", [])}}
    return out


def test_tiny_gallery_reports_the_numbers_recorded_before_the_refactor(shared):
    """Runs after the notebooks: every table, run summary and attack result they produced equals the one the
    same tiny gallery produced at 7bd14fd (the last commit before layerlab.gallery), on this machine's setup."""
    import torch

    recorded = json.loads(RECORDED.read_text())
    if not (shared["figures"] / "01_freeze_study").exists():
        pytest.skip("the notebooks did not run in this session")
    if recorded["torch"] != torch.__version__:
        pytest.skip(f"recorded with torch {recorded['torch']}, this is {torch.__version__}: floats may differ")
    made = gallery_numbers(shared["runs"], shared["figures"])
    common = sorted(set(made) & set(recorded["numbers"]))
    assert len(common) >= 20 and {"AT/eval.json", "CURE-code/eval.json", "U-23/summary.json"} <= set(common)
    assert {k: made[k] for k in common} == {k: recorded["numbers"][k] for k in common}
