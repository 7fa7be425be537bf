"""Floors that only look down: no import cycle inside ``compressor`` and no import up the declared layers.

The layers are declared once, in ``pyproject.toml`` (``[tool.importlinter]``), and
listed for people in docs/development.md. import-linter checks them (its graph,
grimp's, counts every import statement, function-local ones included); the
cycle check below walks the same graph module by module, so a cycle cannot hide
inside one package either.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")
pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]


def module_cycles(graph, package: str) -> list[list[str]]:
    """The import cycles among the modules of ``package`` (strongly connected components of more than one
    module, and modules importing themselves), each sorted; empty when the imports form a DAG."""
    modules = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def edges(m: str) -> list[str]:
        return sorted(t for t in graph.find_modules_directly_imported_by(m) if t in index or t in modules_set)

    modules_set = set(modules)

    def visit(root: str) -> None:  # iterative Tarjan: the package graph is deep enough to matter
        work = [(root, iter(edges(root)))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            child = next(it, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges(child))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1 or node in graph.find_modules_directly_imported_by(node):
                    found.append(sorted(component))

    for m in modules:
        if m not in index:
            visit(m)
    return found


def test_no_import_cycle_inside_compressor():
    graph = grimp.build_graph("compressor")
    assert module_cycles(graph, "compressor") == []


def test_layer_contracts_hold():
    """import-linter's layers (no upward import) and acyclic contracts from pyproject.toml.

    In a subprocess: import-linter configures logging with ``disable_existing_loggers``, which would
    silence every logger of ours for the rest of the test session.
    """
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True, no_logo=True))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]


def test_a_planted_cycle_is_found(tmp_path, monkeypatch):
    """The checker itself: a function-local import that closes a loop is a cycle."""
    pkg = tmp_path / "plantpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text(textwrap.dedent("""
        def helper():
            from plantpkg import high  # hidden in a function: still an import
            return high
    """))
    (pkg / "high.py").write_text("from plantpkg import low\n")
    (pkg / "leaf.py").write_text("import plantpkg.low\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("plantpkg", cache_dir=None)
    assert module_cycles(graph, "plantpkg") == [["plantpkg.high", "plantpkg.low"]]
    sys.modules.pop("plantpkg", None)
