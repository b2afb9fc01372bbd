"""CI's version check (.ci/versions.py): the bounds pyproject.toml declares, and a too-old package refused."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "versions.py"


@pytest.fixture
def versions():
    spec = importlib.util.spec_from_file_location("ci_versions", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dev_extra_pulls_in_the_jupyterlab_4_stack_and_no_torchattacks(versions):
    reqs = {r.name: r.specifier for r in versions.requirements({"dev"})}
    for name, old, current in (("jupyterlab", "3.5.3", "4.0.0"), ("notebook", "6.5.4", "7.0.0"),
                               ("requests", "2.25.1", "2.32.0"), ("ipywidgets", "7.8.0", "8.0.0"),
                               ("voila", "0.4.0", "0.5.0")):
        assert not reqs[name].contains(old) and reqs[name].contains(current), name
    assert {"torch", "pytest", "foolbox", "tensorboard"} <= set(reqs) and "torchattacks" not in reqs
    assert "layerlab" not in reqs  # the self-reference of dev is expanded into its extras


def test_an_end_of_life_install_fails_the_check(versions, monkeypatch, capsys):
    real = versions.md.version
    monkeypatch.setattr(versions.md, "version", lambda name: "3.5.3" if name == "jupyterlab" else real(name))
    assert versions.main() == 1
    err = capsys.readouterr().err
    assert "error: jupyterlab 3.5.3 is installed, layerlab needs jupyterlab>=4" in err
