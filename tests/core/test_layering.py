"""The package's import graph: no circles, and nothing reaches up a floor.

Every import statement counts, those inside functions too (a lazy import is still a dependency);
imports under ``if TYPE_CHECKING:`` do not run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "cfdeploy"
# The deploy core both editors stand on: it may import only itself and the floor below it.
CORE = (
    "cfdeploy.errors",
    "cfdeploy.files",
    "cfdeploy.torchfiles",
    "cfdeploy.bundle_files",
    "cfdeploy.sessions",
    "cfdeploy.graph_cache",
    "cfdeploy.openvino_graphs",
    "cfdeploy.devices",
    "cfdeploy.environment",
    "cfdeploy.contracts",
    "cfdeploy.outputs",
    "cfdeploy.trt.engine",
    "cfdeploy.trt.cuda",
    "cfdeploy.trt.log",
    "cfdeploy.trt.plan",
)


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """Each module → the package's modules it imports (a name imported from a package counts as its module, if it
    is one)."""
    modules = module_names()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        unrun = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for node in ast.walk(block)
        }
        found = set()
        for node in ast.walk(tree):
            if id(node) in unrun:
                continue
            if isinstance(node, ast.Import):
                found.update(owner(alias.name) for alias in node.names if alias.name.startswith("cfdeploy"))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("cfdeploy"):
                found.update(owner(f"{node.module}.{alias.name}") for alias in node.names)
        graph[module] = {name for name in found if name and name != module and not module.startswith(f"{name}.")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_the_import_graph_has_no_circles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle_through_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_deploy_core_imports_nothing_above_it():
    graph = import_graph()
    upward = {
        module: sorted(imported for imported in graph[module] if imported not in CORE)
        for module in CORE
        if module in graph
    }
    assert {module: found for module, found in upward.items() if found} == {}
    assert set(CORE) <= set(graph), sorted(set(CORE) - set(graph))


def test_dac_imports_nothing_from_cf_clips_backends_or_bundle():
    graph = import_graph()
    reached = {
        module: sorted(
            imported
            for imported in graph[module]
            if imported.startswith("cfdeploy.backends") or imported == "cfdeploy.bundle"
        )
        for module in graph
        if module.startswith("cfdeploy.dac")
    }
    assert {module: found for module, found in reached.items() if found} == {}
