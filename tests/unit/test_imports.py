"""The package's import structure: no kdseg import hidden in a function, no import cycle.

A function-level import is how a cycle hides (``a`` imports ``b`` at the top, ``b`` imports
``a`` inside a function), so both are checked on the source: the module-level import graph of
``kdseg/`` is built from the AST (``from kdseg.x import y``, where ``y`` is a submodule, is an
edge to ``kdseg.x.y``; importing ``kdseg.x.y`` runs ``kdseg/x/__init__.py`` first, so it is an
edge to the package ``kdseg.x`` too, unless the importer is inside that package) and must be
acyclic.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ..conftest import ROOT


def modules_of(package_dir: Path) -> dict[str, Path]:
    """Module name -> file of every module of the package at ``package_dir`` (``kdseg/data/__init__.py`` -> ``kdseg.data``)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = modules_of(ROOT / "kdseg")


def imported(node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> list[str]:
    """The package's modules an import statement names (absolute imports: kdseg uses no relative ones)."""
    package = next(iter(modules)).split(".")[0]
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == package]
    assert node.level == 0, f"relative import: {ast.unparse(node)}"
    if not node.module or node.module.split(".")[0] != package:
        return []
    return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]


def module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: outside any function (also inside if/try at the top)."""
    found = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules importing it runs (with the packages whose ``__init__`` runs first)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in module_level_imports(ast.parse(path.read_text())):
            for target in imported(node, modules):
                edges.add(target)
                parts = target.split(".")
                for i in range(2, len(parts)):  # the top package's __init__ runs before anything: no edge
                    package = ".".join(parts[:i])
                    if not (name == package or name.startswith(package + ".")):
                        edges.add(package)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None (iterative DFS, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_no_kdseg_import_inside_a_function():
    hidden = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)) and imported(inner, MODULES):
                        hidden.append(f"{path.relative_to(ROOT)}:{inner.lineno} ({ast.unparse(inner)})")
    assert not hidden, "kdseg imports inside functions (move them to the top; a cycle is the usual reason): " + "; ".join(hidden)


def test_module_level_import_graph_has_no_cycle():
    graph = import_graph(MODULES)
    assert set(graph) == set(MODULES) and len(graph) > 30
    assert "kdseg.runtime" in graph["kdseg.train"] and "kdseg.data" in graph["kdseg.figure"]  # a submodule's package is an edge
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "graph, cycle",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b", "c"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
        ({"a": {"a"}}, ["a", "a"]),
    ],
)
def test_find_cycle_finds_each_kind_of_cycle(graph, cycle):
    assert find_cycle(graph) == cycle


def write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return modules_of(root / "pkg")


def test_graph_edges_of_from_imports_submodules_and_packages(tmp_path):
    modules = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\nfrom pkg import b\nfrom pkg.sub.c import thing\n\ndef f():\n    from pkg import d\n",
        "pkg/b.py": "",
        "pkg/d.py": "",
        "pkg/sub/__init__.py": "from pkg.sub import c\n",
        "pkg/sub/c.py": "from pkg.sub import e\n",
        "pkg/sub/e.py": "",
    })
    graph = import_graph(modules)
    assert graph["pkg.a"] == {"pkg.b", "pkg.sub.c", "pkg.sub"}  # not pkg.d: inside a function
    assert graph["pkg.sub"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.sub.e"}  # a package's own submodules
    assert find_cycle(graph) is None


def test_a_cycle_through_a_package_init_is_found(tmp_path):
    """What a hidden import would have made of kdseg.teacher using kdseg.tasks.common: importing a
    submodule of kdseg.tasks runs kdseg/tasks/__init__.py, which imports the task that imports kdseg.teacher."""
    modules = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/teacher.py": "from pkg.tasks.common import fit\n",
        "pkg/tasks/__init__.py": "from pkg.tasks.distill import run_distill\n",
        "pkg/tasks/common.py": "",
        "pkg/tasks/distill.py": "from pkg.teacher import get_teacher\n",
    })
    assert find_cycle(import_graph(modules)) == ["pkg.tasks", "pkg.tasks.distill", "pkg.teacher", "pkg.tasks"]
