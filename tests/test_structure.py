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


# ----------------------------------------------------------------------------- one of each

def _definitions(modules: dict[str, ast.Module]) -> dict[str, list[str]]:
    """name -> the modules that define a function or class of that name (any depth)."""
    found: dict[str, list[str]] = {}
    for mod, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.setdefault(node.name, []).append(mod)
    return found


def _sources() -> dict[str, str]:
    return {_module_name(p): p.read_text(encoding="utf-8") for p in sorted(PKG.rglob("*.py"))}


# each helper that once had a twin, and the one module that defines it now
ONE_HOME = {
    "parse_size": "gptlab.units",
    "as_list": "gptlab.optim",
    "model_config_from_hf": "gptlab.hf_config",
    "require_extra": "gptlab.errors",
    "with_retries": "gptlab.net",
    "find_hellaswag": "gptlab.hellaswag",
    "evaluate_val_loss": "gptlab.evaluate",
    "eval_mode": "gptlab.scoring",
}


def test_each_former_twin_is_defined_once():
    defs = _definitions(_modules())
    wrong = {name: defs.get(name, []) for name, home in ONE_HOME.items() if defs.get(name, []) != [home]}
    assert not wrong, f"defined elsewhere or more than once: {wrong}"
    for gone in ("_as_list", "_model_config_from_hf", "_describe", "_open"):  # the twins' old names
        assert gone not in defs, f"{gone} is back in {defs[gone]}"


def test_twin_expressions_are_written_once():
    """The snippets that were spelt out in several modules now live in one helper each."""
    src = _sources()

    def where(text: str) -> list[str]:
        return [m for m, s in src.items() if text in s]
    assert where('torch.device("cuda", ') == ["gptlab.dist"]  # DistEnv.device
    assert where("is missing): pip install") == ["gptlab.errors"]  # require_extra
    assert where("_DTYPE_NAMES") == []  # runtime.DTYPES reads the Hugging Face names too
    assert where("urllib.request") == ["gptlab.net"]  # one HTTP client
    assert where('"n_positions", ') == ["gptlab.hf_config"]  # reading a Hugging Face config
    assert where("_OPEN:") == []  # no module-global registry of streams to read the val split through


def test_the_helpers_do_what_the_twins_did(monkeypatch):
    import pytest
    import torch

    from gptlab.dist import DistEnv
    from gptlab.errors import UserError, require_extra
    from gptlab.runtime import DTYPES

    with pytest.raises(UserError, match=r"^X needs Y \(gptlab_no_such_module is missing\): pip install 'gptlab\[eval\]'$"):
        require_extra("gptlab_no_such_module", "eval", "X needs Y")
    assert require_extra("json", "eval", "-").dumps([]) == "[]"
    two = DistEnv(rank=1, local_rank=1, world_size=2)
    assert two.device(torch.device("cuda")) == torch.device("cuda", 1)
    assert two.device(torch.device("cpu")) == torch.device("cpu") == DistEnv().device(torch.device("cpu"))
    assert DistEnv().device(torch.device("cuda")) == torch.device("cuda")
    assert {DTYPES[n] for n in ("float32", "bfloat16", "float16")} == {torch.float32, torch.bfloat16, torch.float16}
