"""The explorer app, headless: widgets build, callbacks redraw from the run files, the what-if run trains."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("ipywidgets")

from layerlab import runs  # noqa: E402
from layerlab.explore import (  # noqa: E402
    APP_CLASS,
    Explorer,
    block_gradients_at,
    discover_runs,
    nearest_checkpoint,
    read_run_files,
    spec_of,
    summary_table,
    updated_percent,
)
from layerlab.plots.cka import cka_view  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def root(analysis_run_root) -> Path:
    """The shared analysis run root plus a directory that is not a run."""
    (analysis_run_root / "not-a-run").mkdir(exist_ok=True)
    return analysis_run_root


@pytest.fixture()
def app(root) -> Explorer:
    return Explorer(root, select=["AT", "ST"])


def png(panel) -> bytes:
    """What a figure panel shows, as PNG bytes."""
    return panel.png


def metrics(run_dir: Path) -> dict[int, dict]:
    return {r["epoch"]: r for r in runs.read_jsonl(run_dir / "metrics.jsonl")}


def test_import_layerlab_stays_light_and_explore_is_callable():
    code = ("import sys, layerlab\n"
            "assert 'torch' not in sys.modules and 'ipywidgets' not in sys.modules\n"
            "f = layerlab.explore\n"
            "assert callable(f) and f is sys.modules['layerlab.explore']\n"
            "from layerlab import explore\n"
            "assert explore is f and callable(explore.explore)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_discover_runs_finds_run_directories_only(root, tmp_path):
    assert list(discover_runs(root)) == ["AT", "ST"]
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    (nested / "metrics.jsonl").write_text("")
    (tmp_path / "a" / "b" / "c").mkdir()
    assert discover_runs(tmp_path) == {"a/b": nested}
    assert discover_runs(tmp_path, depth=1) == {}


def test_app_builds_every_panel(app, root):
    assert APP_CLASS in app._dom_classes
    assert app.run_select.options == ("AT", "ST")
    assert app.run_select.value == ("AT", "ST")
    assert app.block_select.options == ("stem", "block1", "block2", "block3", "block4", "head")
    assert app.epoch.max == 3 and app.epoch.value == 3 and app.play.value == 3
    for image in (app.curves_panel, app.cka_panel, app.grads_panel, app.lsc_panel):
        assert png(image).startswith(PNG) and len(png(image)) > 5000
    assert app.whatif_base.options == ("ST",)
    assert app.whatif_blocks.options == ("block1", "block2", "block3", "block4", "head")
    assert "AT" in app.table.value and "ST" in app.table.value


def test_panels_are_interactive_canvases(app):
    """Each figure is an ipympl canvas with a zoom/pan toolbar; after a redraw the canvas still turns a mouse
    move over the data into the coordinates in its footer, and a zoom drag into new axis limits."""
    from ipympl.backend_nbagg import Canvas

    for panel in (app.curves_panel, app.cka_panel, app.grads_panel, app.lsc_panel):
        assert panel.children == (panel.canvas,) and isinstance(panel.canvas, Canvas)
        assert panel.canvas.figure is panel.figure and panel.canvas.footer_visible
        assert {"zoom", "pan", "home"} <= {item[3] for item in panel.canvas.toolbar.toolitems}
    app.epoch.value = 2  # a redraw
    canvas, ax = app.curves_panel.canvas, app.curves_panel.figure.axes[0]
    canvas.draw()
    height = canvas.get_renderer().height

    def mouse(kind: str, x: float, y: float, buttons: int = 0) -> None:  # what the browser sends, y from the top
        canvas._handle_message(canvas, {"type": kind, "x": x, "y": height - y, "button": 0, "buttons": buttons,
                                        "modifiers": []}, [])

    x, y = ax.transData.transform((2, 1))
    mouse("motion_notify", x, y)
    assert "2.0" in canvas._message and "1.0" in canvas._message, canvas._message
    xlim = ax.get_xlim()
    canvas.toolbar.zoom()
    (x0, y0), (x1, y1) = ax.transData.transform([(1.5, 0.5), (2.5, 2)])
    mouse("button_press", x0, y0, 1)
    mouse("motion_notify", x1, y1, 1)
    mouse("button_release", x1, y1, 0)
    assert ax.get_xlim() == pytest.approx((1.5, 2.5), abs=0.05) and ax.get_xlim() != xlim


def test_epoch_scrub_redraws_curves_table_grads_and_lsc(app, root):
    before = {k: png(getattr(app, k)) for k in ("curves_panel", "grads_panel", "lsc_panel", "cka_panel")}
    app.epoch.value = 1  # the observer runs on_epoch
    for key in ("curves_panel", "grads_panel", "lsc_panel"):
        assert png(getattr(app, key)) != before[key], key
    after = png(app.curves_panel)
    assert png(app.cka_panel) == before["cka_panel"]  # the CKA of the best checkpoint does not depend on it
    row = metrics(root / "AT")[1]
    assert f"<b>{row['robust_acc']:.1f}</b>" in app.table.value
    # calling the callback directly redraws from the files again, in the same canvas
    app.curves_panel.figure.clear()
    app.on_epoch()
    assert app.curves_panel.children == (app.curves_panel.canvas,) and app.curves_panel.figure.axes
    assert png(app.curves_panel) == after


def test_mode_toggle_switches_natural_and_adversarial(app, root):
    adversarial = png(app.curves_panel)
    app.mode.value = "natural"
    assert png(app.curves_panel) != adversarial
    row = metrics(root / "AT")[3]
    assert f"<b>{row['natural_acc']:.1f}</b>" in app.table.value
    assert f"<b>{row['robust_acc']:.1f}</b>" not in app.table.value or row["robust_acc"] == row["natural_acc"]


def test_block_choice_restricts_cka_and_gradients(app, root):
    cka, grads = png(app.cka_panel), png(app.grads_panel)
    app.block_select.value = ("block2", "block3")
    assert png(app.cka_panel) != cka and png(app.grads_panel) != grads
    data = runs.read_json(root / "AT" / "cka.json")
    rows, cols, matrix = cka_view(data, ["block2", "block3"])
    assert rows == cols == ["block2", "block3"]
    i, j = data["rows"].index("block2"), data["cols"].index("block3")
    assert matrix[0, 1] == pytest.approx(data["matrix"][i][j])
    assert cka_view(data, [])[2].shape == (len(data["rows"]), len(data["cols"]))


def test_focus_run_switches_cka_and_lsc(app):
    cka, lsc = png(app.cka_panel), png(app.lsc_panel)
    app.focus.value = "ST"  # ST has neither cka.json nor lsc.csv: the panels say so
    assert png(app.cka_panel) != cka and png(app.lsc_panel) != lsc
    assert png(app.cka_panel).startswith(PNG)


def test_block_gradients_match_an_independent_average(root):
    rows = runs.read_jsonl(root / "AT" / "layer_stats.jsonl")
    run = read_run_files("AT", root / "AT")
    got = block_gradients_at(run.stats, 2, ["block1", "head"])
    assert list(got) == ["block1", "head"]
    for block in got:
        mine = [r for r in rows if r["epoch"] == 2 and r["block"] == block]
        want = sum(r["grad_mean_abs"] * r["numel"] for r in mine) / sum(r["numel"] for r in mine)
        assert got[block] == pytest.approx(want)
    assert block_gradients_at(run.stats, 99) == block_gradients_at(run.stats, 3)  # last epoch before 99


@pytest.fixture(scope="module")
def frozen_run(root, tmp_path_factory, tiny_cfg, digits_splits) -> Path:
    """A U-3 run (only block3 trained) started from the ST run."""
    from layerlab.train import train

    out = tmp_path_factory.mktemp("frozen") / "U-3"
    cfg = tiny_cfg(method="at", epochs=1, update="3", init=str(root / "ST" / "checkpoints" / "best.pt"))
    train(cfg, out, progress=False, splits=digits_splits)
    return out


def test_frozen_layers_count_as_not_updated(frozen_run, root):
    from layerlab.models import block_of_param, build_model

    run = read_run_files("U-3", frozen_run)
    assert run.frozen and not read_run_files("AT", root / "AT").frozen
    cfg = run.config
    model = build_model(cfg["model"], width=cfg["width"])
    weights = [n for n, p in model.named_parameters() if p.dim() > 1]
    got = updated_percent(run, 1, [])
    assert list(got.index) == weights  # every conv/linear weight, in forward order
    recorded = {r["param"]: 100 * r["updated_fraction"] for r in runs.read_jsonl(frozen_run / "layer_stats.jsonl")}
    for name in weights:
        assert got[name] == pytest.approx(recorded[name] if block_of_param(name) == "block3" else 0.0), name
    assert (got[[block_of_param(n) == "block3" for n in weights]] > 0).all()
    chosen = updated_percent(run, 1, ["block1", "block3"])
    assert list(chosen.index) == [n for n in weights if block_of_param(n) in ("block1", "block3")]
    at = read_run_files("AT", root / "AT")  # a run without frozen layers: its recorded rows as they are
    assert list(updated_percent(at, 2, [])) == pytest.approx(
        [100 * r["updated_fraction"] for r in runs.read_jsonl(root / "AT" / "layer_stats.jsonl")
         if r["epoch"] == 2 and len(r["shape"]) > 1])


def test_summary_table_is_padded(root):
    html = summary_table([read_run_files("AT", root / "AT")], "adversarial", 2)
    assert "<style>" in html and "padding" in html and "class='layerlab-summary'" in html


def test_app_says_runs_can_be_multi_selected(app):
    assert "several runs" in app.hint.value and app.hint in app.children[1].children[0].children


def test_nearest_checkpoint_and_summary_table(root):
    run = read_run_files("AT", root / "AT")
    assert set(run.lsc["checkpoint"]) == {"epoch-1", "epoch-2", "epoch-3"}
    assert nearest_checkpoint(run.lsc, 2) == "epoch-2"
    assert nearest_checkpoint(run.lsc, 10) == "epoch-3"
    html = summary_table([run], "adversarial", 2)
    assert f"<b>{metrics(root / 'AT')[2]['val_robust_acc']:.1f}</b>" in html


def test_spec_of():
    assert spec_of(["block3", "block2"], 4) == "23"
    assert spec_of(["head"], 4) == "5"
    with pytest.raises(ValueError, match="block1..block4"):
        spec_of(["stem"], 4)
    with pytest.raises(ValueError, match="at least one"):
        spec_of([], 4)


def test_save_writes_the_panels(app, tmp_path):
    paths = app.save(tmp_path)
    assert sorted(paths) == ["cka", "curves", "grads", "lsc", "table"]
    assert paths["curves"].read_bytes() == png(app.curves_panel)


def test_whatif_run_freezes_blocks_and_joins_the_selection(app, root):
    app.whatif_blocks.value = ("block3",)
    app.whatif_reinit.value = False
    app.whatif_epochs.value = 1
    thread = app.launch_whatif()  # the button's path: a background thread
    thread.join(timeout=300)
    assert not thread.is_alive()
    out = root / "whatif" / "U-3-noreinit"
    saved = runs.read_json(out / "config.json")["config"]
    assert saved["update"] == "3" and saved["reinit"] is False and saved["epochs"] == 1 and saved["method"] == "at"
    assert saved["init"] == str(root / "ST" / "checkpoints" / "best.pt")
    assert app.whatif_progress.value == app.whatif_progress.max > 0
    assert "whatif/U-3-noreinit" in app.run_select.value and "done" in app.whatif_log.value
    st = runs.load_checkpoint(root / "ST" / "checkpoints" / "best.pt")["model"]
    new = runs.load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    frozen = [k for k in st if k.startswith("block1.") and st[k].is_floating_point()]
    updated = [k for k in st if k.startswith("block3.") and k.endswith("weight") and st[k].dim() > 1]
    assert frozen and all(torch.equal(st[k], new[k]) for k in frozen)
    assert any(not torch.equal(st[k], new[k]) for k in updated)
    rows = [json.loads(line) for line in (out / "layer_stats.jsonl").read_text().splitlines()]
    assert {r["block"] for r in rows} == {"block3"}  # only the updated block has trainable tensors


def test_whatif_without_blocks_reports_instead_of_training(app, root):
    app.whatif_blocks.value = ()
    assert app.launch_whatif(background=False) is None
    assert "at least one" in app.whatif_log.value
    assert not (root / "whatif" / "U-").exists()


def test_empty_root_builds(tmp_path):
    app = Explorer(tmp_path)
    assert app.run_select.options == ()
    assert "no runs" in app.status.value
    assert app.whatif_button.disabled
    assert png(app.curves_panel).startswith(PNG)
    assert app.table.value == "<p>no runs selected</p>"


def test_app_notebook_and_voila_command(root, tmp_path):
    from layerlab.explore import KERNEL_CULL_IDLE, KERNEL_CULL_INTERVAL, app_notebook, voila_command

    path = app_notebook(root, tmp_path / "app.ipynb")
    nb = json.loads(path.read_text())
    assert [c["cell_type"] for c in nb["cells"]] == ["markdown", "code"]  # the message needs no kernel
    assert "Loading the layerlab explorer" in "".join(nb["cells"][0]["source"])
    assert f"layerlab.explore({str(root)!r})" in "".join(nb["cells"][1]["source"])
    cmd = voila_command(path, port=9999)
    assert cmd[:3] == [sys.executable, "-m", "voila"] and str(path) in cmd
    assert "--port=9999" in cmd and "--Voila.ip=127.0.0.1" in cmd and "--no-browser" in cmd
    assert "--VoilaConfiguration.progressive_rendering=True" in cmd
    assert f"--MappingKernelManager.cull_idle_timeout={KERNEL_CULL_IDLE}" in cmd
    assert f"--MappingKernelManager.cull_interval={KERNEL_CULL_INTERVAL}" in cmd
    assert "--MappingKernelManager.cull_idle_timeout=5" in voila_command(path, cull_idle=5)
    assert "--no-browser" not in voila_command(path, open_browser=True)


def test_cli_explore_serves_with_kernel_culling(root, monkeypatch):
    """``layerlab explore`` execs the Voilà command line, culling flags included."""
    from typer.testing import CliRunner

    from layerlab import cli

    seen = []
    monkeypatch.setattr(cli.os, "execv", lambda path, argv: seen.append(argv))
    result = CliRunner().invoke(cli.app, ["explore", "--runs", str(root), "--no-browser", "--port", "9998"])
    assert result.exit_code == 0, result.output
    (argv,) = seen
    assert "--port=9998" in argv and any(a.startswith("--MappingKernelManager.cull_idle_timeout=") for a in argv)
    assert Path(argv[3]).name == "explorer.ipynb" and "markdown" in Path(argv[3]).read_text()


def test_cli_explore_rejects_a_missing_run_root(tmp_path):
    from typer.testing import CliRunner

    from layerlab.cli import app

    result = CliRunner().invoke(app, ["explore", "--runs", str(tmp_path / "missing"), "--no-browser"])
    assert result.exit_code == 2 and "not a directory" in result.output


def test_without_a_selection_the_first_at_and_cure_runs_are_shown(root, tmp_path):
    import shutil

    for name, method in (("AT-s1", "at"), ("AT", "at"), ("CURE-code", "cure"), ("ST", "st")):
        shutil.copytree(root / ("ST" if method == "st" else "AT"), tmp_path / name,
                        ignore=shutil.ignore_patterns("checkpoints"))
        config = json.loads((tmp_path / name / "config.json").read_text())
        config["config"]["method"] = method
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    assert Explorer(tmp_path).run_select.value == ("AT", "CURE-code")
    only = Explorer(tmp_path, runs=["AT", "ST"])  # a snapshot of some runs reads no other
    assert list(only.run_select.options) == ["AT", "ST"] and only.run_select.value == ("AT",)
