"""The package's module-level import graph has no cycle (data flows one way: config -> data/models/attacks ->
methods -> train -> runs -> analysis -> plots -> gallery)."""

from __future__ import annotations

import ast
from pathlib import Path

import layerlab

PACKAGE = Path(layerlab.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Modules imported when ``module`` is executed: top-level statements (and their ``if``/``try`` bodies), not
    function bodies and not ``if TYPE_CHECKING:`` blocks."""
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                found.add(prefix)
                found.update(f"{prefix}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: layerlab modules it imports at module level}`` (a parent package counts as imported too)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        imported = _top_level_imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        edges = set()
        for target in imported:
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle_and_its_absence():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_relative_and_type_checking_imports_are_resolved(tmp_path):
    tree = ast.parse("from . import runs\nfrom .x import y\nif TYPE_CHECKING:\n    import z\n"
                     "def f():\n    import w\n")
    assert _top_level_imports(tree, "layerlab.gallery.figures", False) == {
        "layerlab.gallery", "layerlab.gallery.runs", "layerlab.gallery.x", "layerlab.gallery.x.y"}


def test_the_package_has_no_module_level_import_cycle():
    graph = import_graph()
    assert "layerlab.train" in graph and "layerlab.config" in graph["layerlab.train"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
