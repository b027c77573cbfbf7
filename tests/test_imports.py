"""The code's dependencies point one way, read from the source with `ast` (nothing is imported):

    api/, scripts/ ──> app/ ──> infrastructure/        (api/ and app/ may import each other's modules
                                                        only without cycles; infrastructure/ imports
                                                        neither)

and no module of the project imports itself back through others (no cycle), counting every import,
including those inside functions and under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "api", "infrastructure", "scripts")
TOP_MODULES = ("main", "runpod_worker")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    found = {name: ROOT / f"{name}.py" for name in TOP_MODULES}
    for package in PACKAGES:
        found |= {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}
    return found


def imported(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports (`from a.b import c` counts a.b.c when c is a module, else a.b)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [n if n in modules else node.module for n in names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # a.b.Thing -> a.b
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported(path, modules) - {name} for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_the_project(graph):
    assert {"app.factory", "api.routes.generate", "infrastructure.engine.engine", "scripts.bench_serving"} <= set(graph)
    assert "infrastructure.engine.engine" in graph["app.runtime"]


def test_infrastructure_imports_neither_app_nor_api(graph):
    upward = {
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith("infrastructure")
        for target in targets
        if target.split(".")[0] in ("app", "api", "scripts", *TOP_MODULES)
    }
    assert upward == set()


def test_api_services_take_a_narrow_interface_not_the_runtime(graph):
    """Services see the engine and the data they use through api/services/ports.py, not app.runtime."""
    offenders = {m for m, targets in graph.items() if m.startswith("api.services") and "app.runtime" in targets}
    assert offenders == set()


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
