"""The package's shape: no import circles (function-level imports included) and no function
longer than 80 lines. Both are read from the source with `ast`, so they hold for code never run."""

from __future__ import annotations

import ast
from pathlib import Path

import gptlab

PKG = Path(gptlab.__file__).parent
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in sorted(PKG.rglob("*.py"))}


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the gptlab modules it imports anywhere in its body (functions included)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, tree in modules.items():
        package = name if name in ("gptlab", "gptlab.data") and tree is not None else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from gptlab import dist` imports the module gptlab.dist
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != name and t.startswith("gptlab"):
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycles():
    graph = import_graph(_modules())
    # the package root may import nothing that imports it back; treat it as a plain module
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_sees_function_level_imports():
    tree = {"gptlab.x": ast.parse("def f():\n    from gptlab import y\n"), "gptlab.y": ast.parse("")}
    assert import_graph(tree)["gptlab.x"] == {"gptlab.y"}


def test_no_function_over_80_lines():
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, "functions over 80 lines: " + "; ".join(long)
