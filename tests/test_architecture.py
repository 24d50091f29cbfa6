"""The layers of the package, checked on the source (ast, nothing is executed).

flowdistill/ (application) -> nfm/, f2d2/ (methods) -> shared/ (mechanism): arrows only point down,
and no two modules import each other, directly or through others.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flowdistill", "nfm", "f2d2", "shared")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the four packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules imported anywhere in a file (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] not in PACKAGES:
                continue
            while name and name not in modules:  # `from shared.run import x` -> shared.run
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def layer(module: str) -> str:
    return module.split(".")[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (package __init__ files that only document are leaves)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_walker_sees_real_imports():
    graph = import_graph()
    assert "shared.config" in graph["shared.run"]
    assert "nfm.couplings" in graph["flowdistill.components"]
    assert "flowdistill.api" in graph["flowdistill.cli"]  # imports inside functions count too


@pytest.mark.parametrize("lower,forbidden", [("shared", {"nfm", "f2d2", "flowdistill"}),
                                             ("nfm", {"flowdistill"}), ("f2d2", {"flowdistill"})])
def test_arrows_point_down(lower, forbidden):
    bad = sorted(f"{m} -> {d}" for m, deps in import_graph().items() if layer(m) == lower
                 for d in deps if layer(d) in forbidden)
    assert not bad, "imports against the layering: " + ", ".join(bad)


def test_no_import_cycles():
    graph = import_graph()
    graph = {m: {d for d in deps if project_modules()[d].name != "__init__.py" or d == m} for m, deps in graph.items()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


IMPORTS_BY_PATH = {"nfm/user_flow.py"}  # imports the one class a run's config names (model.flow), registers nothing


def test_nothing_registers_itself_through_importlib():
    offenders = [str(p.relative_to(ROOT)) for p in project_modules().values() if "importlib" in p.read_text()
                 and str(p.relative_to(ROOT)) not in IMPORTS_BY_PATH]
    assert not offenders, f"modules importing by name: {offenders}"
