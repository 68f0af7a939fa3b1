"""Layering checks: the package's module-level imports form no cycle, and the benchmarks reach
the runtime only through sparse_infer.bench helpers."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sparse_infer"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module):
    """Import statements that run when the module is imported.

    Imports inside functions are left out: they run when the function is called, after every
    module has finished loading, so they cannot make an import-time cycle (the package uses them
    to defer heavy optional imports, never to hide a cycle). `if TYPE_CHECKING:` blocks never run.
    """
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if not _is_type_checking(node):
                stack += node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            stack += node.body


def _targets(node, module: str, is_package: bool) -> set[str]:
    """The sparse_infer modules an import statement loads (the most specific module named).

    A submodule's parent package is not counted as a dependency: Python initialises it first
    anyway, and a package's __init__ importing its own submodules is how a package face works."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    return {name for name in names if name in MODULES}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        deps = set()
        for node in _module_level_imports(tree):
            deps |= _targets(node, name, path.name == "__init__.py")
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}          # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_module_imports():
    for name in MODULES:
        if name.endswith("__main__"):
            continue
        importlib.import_module(name)


def test_no_import_cycles_among_package_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("low, high", [
    ("sparse_infer.runtime", "sparse_infer.patches.attention"),
    ("sparse_infer.decode.dispatch", "sparse_infer.patches.attention"),
    ("sparse_infer.prefill.dispatch", "sparse_infer.patches.attention"),
    ("sparse_infer.methods", "sparse_infer.plan"),
])
def test_lower_layers_do_not_import_higher_ones(low, high):
    graph = import_graph()
    seen, stack = set(), [low]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack += graph[node]
    assert high not in seen, f"{low} reaches {high}"


def test_benchmarks_do_not_construct_layer_runtime():
    offenders = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if name == "LayerRuntime":
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"benchmarks build LayerRuntime directly (use sparse_infer.bench.layer): {offenders}"
