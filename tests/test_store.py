"""One results store: figure groups name the record files they read (path and content hash), are drawn again from
the records alone with the same figures, and ``verify`` catches a record re-made after its figures were drawn."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from layerlab import runs
from layerlab.cli import app
from layerlab.gallery import make, redraw, verify, write_readme
from layerlab.gallery.manifest import reading
from layerlab.records import NotRecorded, record_bytes, record_hash

from committed_gallery import COMMITTED, REPO, STALE

STORE = "results/runs-tiny"
GROUP = "06_gradients"


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """The gradients group made at tiny scale into ``repo/figures`` with its records in ``repo/results/runs-tiny``;
    the run root (every checkpoint) is deleted afterwards. Returns the scratch repository."""
    base = tmp_path_factory.mktemp("store")
    repo = base / "repo"
    make("gradients", "tiny", base / "runs", repo / "figures", records=repo / STORE)
    shutil.rmtree(base / "runs")
    return repo


def _pixels(group: Path) -> dict[str, np.ndarray]:
    return {p.name: imread(p) for p in sorted(group.glob("*.png"))}


def _manifest(repo: Path) -> dict:
    return runs.read_json(repo / "figures" / GROUP / "manifest.json")


def test_reading_notes_result_files_read_under_the_run_root_only(tmp_path):
    root = tmp_path / "root"
    (root / "AT-s1").mkdir(parents=True)  # a seed-1 run: its own folder, like any run
    with reading(root) as read:
        runs.write_json(root / "AT-s1" / "eval.json", {"n": 1})  # written, not read
        (root / "AT-s1" / "best.pt").write_bytes(b"weights")
        (tmp_path / "elsewhere.csv").write_text("a\n1\n")
    assert read == set()
    with reading(root) as read:
        runs.read_json(root / "AT-s1" / "eval.json")
        (root / "AT-s1" / "best.pt").read_bytes()  # not a result file
        pd.read_csv(tmp_path / "elsewhere.csv")  # outside the run root
        (root / "AT-s1" / "lsc.csv").write_text("mu\n0\n")
        pd.read_csv(root / "AT-s1" / "lsc.csv")
        np.savez(root / "AT-s1" / "minpert.npz", x=np.zeros(2))
        np.load(root / "AT-s1" / "minpert.npz")
    assert read == {("AT-s1", "eval.json"), ("AT-s1", "lsc.csv"), ("AT-s1", "minpert.npz")}


def test_records_rewrite_the_run_root_in_text_files_only(tmp_path):
    root = str(tmp_path / "root")
    (tmp_path / "config.json").write_text(f'{{"init": "{root}/ST/checkpoints/best.pt"}}')
    (tmp_path / "arrays.npz").write_bytes(b"PK" + root.encode() + b"\x00")  # binary: never rewritten
    assert record_bytes(tmp_path / "config.json", (root, "RUN_ROOT")) == b'{"init": "RUN_ROOT/ST/checkpoints/best.pt"}'
    assert record_bytes(tmp_path / "arrays.npz", (root, "RUN_ROOT")) == (tmp_path / "arrays.npz").read_bytes()


def test_manifest_names_the_records_it_read_and_copies_none(drawn):
    manifest = _manifest(drawn)
    assert manifest["store"] == STORE
    read = {(r["run"], r["file"]) for r in manifest["reads"]}
    # the figures are drawn from each run's layer_stats.jsonl (CURE Fig. 6, 10); CURE's ST is only looked up
    assert {("AT", "layer_stats.jsonl"), ("TRADES", "layer_stats.jsonl"), ("CURE-code", "layer_stats.jsonl")} <= read
    assert ("ST", "layer_stats.jsonl") not in read
    for r in manifest["reads"]:
        assert r["path"] == f"{STORE}/{r['run']}/{r['file']}"
        assert record_hash((drawn / r["path"]).read_bytes()) == r["sha256"]
    group = drawn / "figures" / GROUP
    assert sorted(p.name for p in group.iterdir() if not p.suffix == ".png") == ["manifest.json"]
    assert verify(drawn / "figures") == []


def test_redraw_from_the_records_alone_gives_the_same_figures(drawn, tmp_path, snapshot_files):
    repo = tmp_path / "repo"
    shutil.copytree(drawn, repo)
    group = repo / "figures" / GROUP
    before, records = _pixels(group), snapshot_files(repo / STORE)
    first = _manifest(repo)
    for png in group.glob("*.png"):
        png.unlink()
    paths = redraw("gradients", repo / "figures")
    assert sorted(Path(p).name for p in paths.values()) == sorted(before)
    after = _pixels(group)
    for name, pixels in before.items():  # PNG bytes may differ in metadata: compare the drawn pixels
        assert np.array_equal(after[name], pixels), name
    manifest = _manifest(repo)
    assert manifest["reads"] == first["reads"]  # drawn from the same files, with the same content
    assert not any(r["trained_in_call"] for r in manifest["runs"]) and manifest["calls"][-1]["training_seconds"] == 0
    assert snapshot_files(repo / STORE) == records  # the records are read, never rewritten
    assert verify(repo / "figures") == []


def test_redrawing_an_up_to_date_group_changes_no_file(drawn, tmp_path, snapshot_files):
    """A redraw from the same records draws the same bytes, so it leaves the group (manifest included) as it was."""
    repo = tmp_path / "repo"
    shutil.copytree(drawn, repo)
    def contents() -> dict[str, bytes]:
        return {name: data for name, (data, _) in snapshot_files(repo / "figures").items()}

    redraw("gradients", repo / "figures")  # the first redraw records its call (drawn here, not from a run root)
    before = contents()
    redraw("gradients", repo / "figures")  # the files are written again ...
    assert contents() == before  # ... with the same bytes (a PNG names only the matplotlib version), manifest too


def test_redraw_refuses_to_train_what_the_records_lack(drawn, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(drawn, repo)
    shutil.rmtree(repo / STORE / "CURE-code")
    with pytest.raises(NotRecorded, match="run CURE-code is not in the records"):
        redraw("gradients", repo / "figures")
    assert not (repo / STORE / "CURE-code").exists()


def test_verify_catches_a_re_made_record_and_a_copied_one(drawn, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(drawn, repo)
    invoke = CliRunner().invoke
    ok = invoke(app, ["records", "verify", "--figures", str(repo / "figures")])
    assert ok.exit_code == 0, ok.output
    summary = repo / STORE / "AT" / "summary.json"
    runs.write_json(summary, {**runs.read_json(summary), "natural_acc": 0.0})  # AT re-made with other numbers
    shutil.copy(repo / STORE / "CURE-code" / "layer_stats.jsonl", repo / "figures" / GROUP / "layer_stats.jsonl")
    problems = verify(repo / "figures")
    assert problems == [f"{GROUP}: {STORE}/AT/summary.json changed since the group was drawn; "
                        f"draw it again (layerlab records redraw --only gradients)",
                        f"{GROUP}/layer_stats.jsonl is a copy of {STORE}/CURE-code/layer_stats.jsonl; "
                        f"delete it (the manifest names the record)"]
    assert "**not matching its records**: 1 problem(s)" in write_readme(repo / "figures").read_text()
    failed = invoke(app, ["records", "verify", "--figures", str(repo / "figures")])
    assert failed.exit_code == 1 and f"{STORE}/AT/summary.json changed" in failed.output
    (repo / "figures" / GROUP / "layer_stats.jsonl").unlink()
    redrawn = invoke(app, ["records", "redraw", "--only", "gradients", "--figures", str(repo / "figures")])
    assert redrawn.exit_code == 0, redrawn.output
    assert verify(repo / "figures") == []  # drawn again from the re-made record
    assert f"[AT](../{STORE}/AT/)" in (repo / "figures" / "README.md").read_text()


def test_redraw_names_a_missing_manifest(tmp_path):
    result = CliRunner().invoke(app, ["records", "redraw", "--only", "gradients", "--figures", str(tmp_path)])
    assert result.exit_code == 2 and "make the group first" in result.output


@pytest.fixture(scope="module")
def committed_problems() -> list[str]:
    return verify(REPO / "figures")


@pytest.mark.parametrize("group", [pytest.param(g, marks=pytest.mark.xfail(strict=True, reason="drawn from a replaced "
                                                                         "record")) if g in STALE else g
                                   for g in COMMITTED])
def test_committed_figures_match_the_records(group, committed_problems):
    """CI's check: every committed group's manifest hashes match ``results/`` and nothing under it copies a record."""
    assert [p for p in committed_problems if p.startswith((f"{group}:", f"{group}/"))] == []


def test_committed_readme_links_each_group_to_its_records():
    readme = (REPO / "figures" / "README.md").read_text()
    for group in COMMITTED:
        manifest = json.loads((REPO / "figures" / group / "manifest.json").read_text())
        section = readme.split(f"## {group}\n", 1)[1].split("\n## ", 1)[0]
        for run in {r["run"] for r in manifest["reads"]}:
            assert f"[{run}](../{manifest['store']}/{run}/)" in section, (group, run)


def test_every_group_drawn_by_an_earlier_definition_is_listed_as_pending_or_stale() -> None:
    from committed_gallery import PENDING

    from layerlab.experiments import OVERFIT_TAG, group_of
    from layerlab.gallery.settings import CURE_RUN, group_of as figure_group

    regime_groups = {"overfitting", "lsc", "rwp_ablations"}

    def current(folder: str) -> bool:
        read = {r["run"] for r in json.loads((REPO / "figures" / folder / "manifest.json").read_text())["reads"]}
        cure = {group_of(r) for r in read if r.startswith("CURE")}
        if cure and not cure <= {CURE_RUN + suffix for suffix in ("", "-p0", "-gamma0", "-p0-gamma0")}:
            return False  # a paper-text CURE run, where the gallery now reads CURE-code
        return figure_group(folder).key not in regime_groups or any(OVERFIT_TAG in r for r in read)

    assert {g for g in COMMITTED if not current(g)} <= PENDING | STALE


def test_verify_ignores_the_cost_ledger_a_group_read(tmp_path):
    from layerlab.gallery.manifest import _group_problems
    from layerlab.records import record_hash

    (tmp_path / "AT").mkdir()
    reads = []
    for name in ("summary.json", "costs.jsonl"):
        (tmp_path / "AT" / name).write_text("{}\n")
        reads.append({"path": f"AT/{name}", "sha256": record_hash(b"{}\n")})
    manifest = {"group": "01_x", "key": "x", "store": ".", "reads": reads}
    assert _group_problems(manifest, tmp_path) == []
    (tmp_path / "AT" / "costs.jsonl").write_text('{}\n{"what": "cka"}\n')  # another analysis ran: no figure changed
    assert _group_problems(manifest, tmp_path) == []
    (tmp_path / "AT" / "summary.json").write_text('{"natural_acc": 1}\n')
    assert len(_group_problems(manifest, tmp_path)) == 1
