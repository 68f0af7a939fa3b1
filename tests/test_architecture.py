"""Layering checks: the package's module-level imports form no cycle, the kernels (Python and C)
hold no method's choosing, and the benchmarks reach the runtime only through sparse_infer.bench
helpers."""
from __future__ import annotations

import ast
import importlib
import re
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


def test_kernels_never_import_decode_or_methods():
    # the executors compute attention over rows they are given; choosing lives above them
    offenders = []
    for name, path in MODULES.items():
        if not name.startswith("sparse_infer.kernels"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):     # function bodies too
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, name, path.name == "__init__.py"):
                    if target.startswith(("sparse_infer.decode", "sparse_infer.prefill", "sparse_infer.methods")):
                        offenders.append(f"{name} imports {target}")
    assert not offenders, offenders


def _c_code(path: Path) -> str:
    """C source without its comments (they may name the methods that use it)."""
    return re.sub(r"/\*.*?\*/|//[^\n]*", "", path.read_text(encoding="utf-8"), flags=re.S)


def test_the_c_executor_holds_no_method_code():
    """kernels/cpu_decode.c exports the executor alone, and neither it nor the machinery it
    shares (cpu_attend.h) names a method's selection: that C lives beside its selector."""
    defined = re.findall(r"^(?:int|void)\s+(\w+)\s*\(", _c_code(PACKAGE / "kernels" / "cpu_decode.c"), flags=re.M)
    hidden = re.findall(r'visibility\("hidden"\)+\s*(?:int|void)\s+(\w+)',
                        _c_code(PACKAGE / "kernels" / "cpu_attend.h"))
    assert [name for name in defined if name not in hidden] == ["sparse_decode_rows"]
    for path in (PACKAGE / "kernels").glob("*.[ch]"):
        names = set(re.findall(r"\b[A-Za-z_]\w*\b", _c_code(path)))
        method_names = {n for n in names if re.search(r"quest|ds_|double|fingerprint|page|label|vote|top_k", n)}
        assert not method_names, f"{path.name} names method code: {sorted(method_names)}"
    method_files = {p.name for p in (PACKAGE / "decode").glob("*.c")}
    assert {"quest.c", "double_sparsity.c", "fingerprint.c"} <= method_files
