"""CI: every requirement of layerlab[dev] is installed at a version its pyproject.toml specifier allows.

`pip check` ignores a package's extras, so this walks them: ``dev`` pulls in ``eval``, ``notebooks`` and
``loggers``, whose lower bounds (JupyterLab 4, Notebook 7, ipywidgets 8, Voila 0.5, a current requests) keep the
notebook stack off end-of-life releases. Prints the versions that matter and exits 1 naming any violation.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
SHOWN = ("torch", "jupyterlab", "notebook", "ipywidgets", "voila", "requests", "tensorboard", "foolbox",
         "pyautoattack")


def requirements(extras: set[str]) -> list[Requirement]:
    """pyproject.toml's dependencies plus those of ``extras`` (and of the extras those name)."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    reqs = [Requirement(line) for line in project["dependencies"]]
    todo, done = set(extras), set()
    while todo:
        extra = todo.pop()
        done.add(extra)
        for line in project["optional-dependencies"][extra]:
            req = Requirement(line)
            if canonicalize_name(req.name) == canonicalize_name(project["name"]):
                todo |= set(req.extras) - done
            elif all(str(r) != str(req) for r in reqs):
                reqs.append(req)
    return reqs


def main() -> int:
    bad = []
    for req in requirements({"dev"}):
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            bad.append(f"{req.name} is not installed (layerlab needs {req})")
            continue
        if not req.specifier.contains(version, prereleases=True):
            bad.append(f"{req.name} {version} is installed, layerlab needs {req}")
    print("resolved: " + ", ".join(f"{name} {md.version(name)}" for name in SHOWN if _installed(name)))
    for line in bad:
        print(f"error: {line}", file=sys.stderr)
    return 1 if bad else 0


def _installed(name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
