"""The packages' import graph is acyclic, and no module reaches into another's private names: data
flows one way (CLI -> data -> model -> engine -> outputs; kernels below the model), so any module
can be read, changed and tested without the ones above it.

Every ``import`` counts — at module level, inside functions (lazy imports) and under
``TYPE_CHECKING`` — because a cycle hidden in a function is still two modules that must change
together. ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("e2pa", "e2pa_kernels")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports (edges inside e2pa / e2pa_kernels only)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                ]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a name inside a.b
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first = last), or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_packages_have_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph["e2pa.model.layers"]  # the walk found the modules and their imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "graph, acyclic",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, True),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, False),
        ({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"d"}}, True),  # self-edges are dropped when built
        ({"a": set(), "b": {"c"}, "c": {"b"}}, False),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, acyclic):
    graph = {k: {t for t in v if t != k} for k, v in graph.items()}
    assert (find_cycle(graph) is None) == acyclic


def private_uses() -> list[str]:
    """``file:line name`` for every private name (``_x``) of one package module used by another:
    ``from m import _x`` or ``m._x`` where ``m`` is bound to a package module. Private *modules*
    (``e2pa_kernels._runtime``) may be imported; their public names are the package's internals."""
    modules = _modules()
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        bound: set[str] = set()  # local names of package modules
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bound |= {
                    alias.asname or alias.name.split(".")[0]
                    for alias in node.names
                    if alias.name.split(".")[0] in PACKAGES
                }
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                base = _resolve(module, path, node)
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        bound.add(alias.asname or alias.name)
                    elif base in modules and alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {base}.{alias.name}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names():
    assert private_uses() == []


def test_the_private_use_finder_finds_them(tmp_path, monkeypatch):
    package = tmp_path / "e2pa"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def _hidden(): pass\n")
    (package / "b.py").write_text("from .a import _hidden\nfrom . import a\na._hidden()\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("e2pa",))
    assert private_uses() == ["e2pa/b.py:1 e2pa.a._hidden", "e2pa/b.py:3 a._hidden"]


def test_the_graph_sees_relative_lazy_and_type_checking_imports():
    graph = import_graph()
    assert "e2pa.model.targets" in graph["e2pa.model.network"]  # from .targets import ...
    assert "e2pa.data.labels" in graph["e2pa.model.targets"]  # from ..data.labels import ...
    assert "e2pa.model.network" in graph["e2pa.model.losses"]  # under TYPE_CHECKING
    assert "e2pa.engine.evaluation" in graph["e2pa.engine.training"]  # inside a function
