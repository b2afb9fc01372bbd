"""The figure notebooks: committed without outputs, one papermill parameters cell, and every notebook runs top
to bottom at smoke scale, in order, on one shared run root (later notebooks re-use earlier runs)."""

from __future__ import annotations

import ast
import json
import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

from layerlab.gallery import GROUPS  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
# The numbers the tiny gallery reported at 7bd14fd, before the gallery became a package (gallery_numbers); the
# tables that since report seeds (mean and std at both checkpoints) are left out, their runs' numbers are kept.
RECORDED = Path(__file__).resolve().parent / "data" / "tiny_gallery_numbers.json"
ORDER = [g.notebook for g in GROUPS.values()]
KEY = {g.notebook: g.key for g in GROUPS.values()}
SLOW = {"10_rwp_ablations.ipynb", "11_cure_ablation.ipynb"}  # the most training: several extra runs each
PARAMETERS = ("PROFILE", "RUN_ROOT", "DATA_DIR", "FIGURES")


def read(name: str):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def test_notebooks_match_the_figure_registry():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(ORDER)
    assert ORDER == sorted(ORDER)  # numbered in the order they run


@pytest.mark.parametrize("name", ORDER)
def test_committed_notebook_has_no_outputs(name):
    nb = read(name)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs before committing"
    assert "widgets" not in nb.metadata, f"{name}: saved widget state"


@pytest.mark.parametrize("name", ORDER)
def test_notebook_starts_with_one_parameters_cell_and_calls_its_figure(name):
    nb = read(name)
    first = nb.cells[0]
    assert first.cell_type == "code" and "parameters" in first.metadata.get("tags", [])
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1
    assigned = {t.id: node.value for node in ast.parse(first.source).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    assert set(assigned) == set(PARAMETERS)
    assert ast.literal_eval(assigned["PROFILE"]) == "tiny"
    code = "\n".join(c.source for c in nb.cells[1:] if c.cell_type == "code")
    assert f'gallery.make("{KEY[name]}", PROFILE, RUN_ROOT, FIGURES, DATA_DIR)' in code


@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    """One run root and figure folder for every notebook of the session; one thread per kernel."""
    base = tmp_path_factory.mktemp("notebooks")
    old = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MPLBACKEND")}
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
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
