"""Nothing of ours shadows an installed package or a standard-library module.

A folder lands at the front of ``sys.path`` when a script in it is run by path
(``python examples/smollm2_rtn.py``), when pytest inserts a test folder, or when
``python -m`` runs from the repository root; every file and folder name in it
then wins over site-packages. transformers 5.25 imports Hugging Face's
``kernels``, and our old ``benchmarks/kernels.py`` hid it, which broke every
model load in the test suite and the benchmarks on a fresh install. So: no
folder of ours that holds Python may contain a module or package named like a
top-level module of an installed distribution or of the standard library.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OWN_DISTRIBUTION = "compressor"
SKIP_DIRS = {"__pycache__", "out", "build", "dist", "node_modules"}


def _skipped(name: str) -> bool:
    return name.startswith(".") or name in SKIP_DIRS or name.endswith(".egg-info")


def _holds_python(folder: Path) -> bool:
    return any(not any(_skipped(part) for part in p.relative_to(folder).parts) for p in folder.rglob("*.py"))


def importable_names(root: Path) -> dict[str, list[str]]:
    """Top-level module names each folder of the tree would add, were it on ``sys.path``.

    Returns ``{name: [relative paths]}`` over the root and every folder outside the
    ``compressor`` package that holds Python files (at any depth): the stems of its ``.py`` files and
    the names of its sub-folders that hold Python (packages or namespace packages).
    """
    found: dict[str, list[str]] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _skipped(d))
        here = Path(folder)
        inside_package = here != root and here.relative_to(root).parts[0] == OWN_DISTRIBUTION
        if inside_package or not (here == root or _holds_python(here)):
            continue
        entries = [(f[:-3], here / f) for f in files if f.endswith(".py")]
        entries += [(d, here / d) for d in dirs if _holds_python(here / d)]
        for name, path in entries:
            if not name.startswith("__"):
                found.setdefault(name, []).append(str(path.relative_to(root)))
    return found


def installed_names() -> dict[str, str]:
    """``{top-level module: where it comes from}`` for installed distributions (but ours) and the standard library."""
    names = {name: "the standard library" for name in sys.stdlib_module_names}
    for name, dists in importlib.metadata.packages_distributions().items():
        others = [d for d in dists if d.lower() != OWN_DISTRIBUTION]
        if others:
            names[name] = "the installed distribution " + ", ".join(sorted(set(others)))
    return names


def clashes(root: Path, installed: dict[str, str] | None = None) -> list[str]:
    """One message per file or folder under ``root`` whose importable name is taken by ``installed`` (default: this venv)."""
    installed = installed_names() if installed is None else installed
    return [f"{path} is importable as {name!r}, the name of a top-level module of {installed[name]}: rename it"
            for name, paths in sorted(importable_names(root).items()) if name in installed for path in paths]


def test_no_module_of_ours_shadows_an_installed_one():
    assert clashes(ROOT) == []


def test_a_planted_kernels_module_is_caught(tmp_path):
    """The check fails on the file that once broke the suite, and on a folder-level twin of a stdlib module."""
    installed = {"kernels": "the installed distribution kernels", "random": "the standard library"}
    assert "random" in installed_names()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "kernel_speed.py").write_text("")
    assert clashes(tmp_path, installed) == []
    (tmp_path / "benchmarks" / "kernels.py").write_text("")
    (tmp_path / "tests" / "random").mkdir(parents=True)
    (tmp_path / "tests" / "random" / "test_seed.py").write_text("")
    (tmp_path / "compressor" / "kernels").mkdir(parents=True)  # inside our package: never on sys.path
    (tmp_path / "compressor" / "kernels" / "__init__.py").write_text("")
    assert clashes(tmp_path, installed) == [
        "benchmarks/kernels.py is importable as 'kernels', the name of a top-level module of the installed "
        "distribution kernels: rename it",
        "tests/random is importable as 'random', the name of a top-level module of the standard library: rename it",
    ]
