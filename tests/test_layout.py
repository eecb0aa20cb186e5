"""The package's imports form no cycle and point down only: each folder is one layer.

Imports are read from the source (module level, not under ``TYPE_CHECKING``, not inside functions):
those are the ones that decide import order and what a module drags in.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeschedule"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in tree.body:  # module level only
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        nodes = [node] + (list(ast.walk(node)) if isinstance(node, (ast.If, ast.Try)) else [])
        for inner in nodes:
            if isinstance(inner, ast.Import):
                found |= {alias.name for alias in inner.names}
            elif isinstance(inner, ast.ImportFrom) and inner.module and inner.level == 0:
                found.add(inner.module)
                found |= {f"{inner.module}.{alias.name}" for alias in inner.names}
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, modules) - {name} for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "pipeschedule.runtime.executor" in graph and graph["pipeschedule.runtime.executor"], "the walk found no imports"
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_walk_finds_a_cycle_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# What each layer may import (besides itself), by module-name prefix.
ALLOWED = {
    "pipeschedule.plan": {"pipeschedule.plan"},
    "pipeschedule.wire": {"pipeschedule.wire", "pipeschedule.errors"},
    "pipeschedule.runtime": {"pipeschedule.runtime", "pipeschedule.wire", "pipeschedule.plan", "pipeschedule.config", "pipeschedule.errors"},
    "pipeschedule.tools": {"pipeschedule.tools", "pipeschedule.plan", "pipeschedule.config", "pipeschedule.errors"},
    # The training kit is built on the public API only: the package itself, its config and errors.
    "pipeschedule.training": {"pipeschedule.training", "pipeschedule", "pipeschedule.config", "pipeschedule.errors"},
    "pipeschedule.config": {"pipeschedule.plan"},
    "pipeschedule.errors": set(),
    "pipeschedule.schedules": {"pipeschedule.config", "pipeschedule.errors", "pipeschedule.plan", "pipeschedule.runtime", "pipeschedule.wire"},
}


def _layer(module: str) -> str | None:
    matches = [layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")]
    return max(matches, key=len) if matches else None


def _within(module: str, prefixes: set[str]) -> bool:
    return any(module == q or module.startswith(q + ".") for q in prefixes - {"pipeschedule"}) or module == "pipeschedule" and "pipeschedule" in prefixes


def test_every_import_points_down_to_an_allowed_layer():
    graph = import_graph()
    assert {_layer(m) for m in graph} >= set(ALLOWED), "a layer has no module"
    for module, imported in graph.items():
        layer = _layer(module)
        if layer is None:  # the package's own __init__ and the module-path aliases
            assert module in ("pipeschedule", "pipeschedule._moved"), f"{module} belongs to no layer"
            continue
        wrong = {name for name in imported if not _within(name, ALLOWED[layer])}
        assert not wrong, f"{module} ({layer}) imports {sorted(wrong)}"


def test_the_public_package_imports_neither_tools_nor_training():
    graph = import_graph()
    for name in graph["pipeschedule"]:
        assert not name.startswith(("pipeschedule.tools", "pipeschedule.training")), name


def test_the_layer_check_finds_an_import_pointing_up():
    assert not _within("pipeschedule.runtime.executor", ALLOWED["pipeschedule.wire"])
    assert not _within("pipeschedule", ALLOWED["pipeschedule.runtime"])
    assert _within("pipeschedule.wire.p2p", ALLOWED["pipeschedule.runtime"])


def test_every_folder_says_what_it_is_for():
    for folder in ("plan", "wire", "runtime", "tools", "training", "training/models"):
        init = PACKAGE / folder / "__init__.py"
        assert init.exists(), init
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc) > 60, f"{init} has no docstring saying what the layer is"


def test_old_module_paths_are_the_same_modules():
    import importlib
    import subprocess
    import sys

    from pipeschedule._moved import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(f"pipeschedule.{old}") is importlib.import_module(f"pipeschedule.{new}"), old
    import pipeschedule.models.gpt as old_gpt
    import pipeschedule.training.models.gpt as gpt

    assert old_gpt is gpt
    from pipeschedule.tied import make_finalize_model_grads
    from pipeschedule.training.tied import make_finalize_model_grads as new

    assert make_finalize_model_grads is new
    out = subprocess.run([sys.executable, "-m", "pipeschedule.show", "--p", "2", "--m", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "rank 1" in out.stdout, out.stderr
