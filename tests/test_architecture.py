"""The layout the folders promise (docs/architecture.md), checked from the source: which package may
import which, no import circle, and the size limits that keep files readable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("prime_scale", "data_prep", "tools")
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80
# the method's core: it must not know about commands, the trainer, the engine or checkpoints
CORE = ("prime", "model", "data", "sampling", "evaluation", "conditional")
CORE_MUST_NOT_IMPORT = ("cli", "train", "engine", "checkpoint")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str, modules: frozenset = frozenset()) -> set[str]:
    """Every module imported anywhere in the file (inside functions too), made absolute.
    `from pkg import submodule` counts as importing the submodule, not pkg's __init__."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            subs = {f"{base}.{alias.name}" for alias in node.names}
            found.update(subs if subs & modules else {base})
    return found


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (names that are not modules are dropped)."""
    files = {_module_name(p): p for p in source_files()}
    names = frozenset(files)
    return {mod: {m for m in _imports(path, mod, names) if m in files and m != mod} for mod, path in files.items()}


def unit(module: str) -> str:
    """The layer a module belongs to: prime_scale.<name>'s first part below the package, or the package."""
    parts = module.split(".")
    if parts[0] != "prime_scale":
        return parts[0]
    return parts[1] if len(parts) > 1 else "prime_scale"


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every breach of the allowed import directions, as readable lines."""
    out = []
    for name, g in (("module", graph), ("layer", _unit_graph(graph))):
        cycle = _cycle(g)
        if cycle:
            out.append(f"{name} import circle: {' -> '.join(cycle)}")
    for mod, targets in graph.items():
        for target in targets:
            src, dst = unit(mod), unit(target)
            inside = mod.startswith("prime_scale")
            if inside and src in CORE and dst in CORE_MUST_NOT_IMPORT:
                out.append(f"{mod} imports {target}: the core ({', '.join(CORE)}) must not import {dst}")
            if inside and src != "cli" and dst in ("data_prep", "tools"):
                out.append(f"{mod} imports {target}: only prime_scale.cli may use {dst}")
            if inside and src != "cli" and dst == "cli":
                out.append(f"{mod} imports {target}: only cli imports cli")
    return out


def _unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for mod, targets in graph.items():
        if unit(mod) == "cli" or mod.startswith("tools"):
            continue  # entry points: they may import anything, nothing imports them
        units.setdefault(unit(mod), set()).update(unit(t) for t in targets if unit(t) != unit(mod))
    return units


def test_imports_follow_the_layers():
    assert violations(import_graph()) == []


@pytest.mark.parametrize("planted", [("prime_scale.prime", "prime_scale.train"),
                                     ("prime_scale.data.loader", "data_prep.demo"),
                                     ("prime_scale.model.naming", "prime_scale.checkpoint.store"),
                                     ("prime_scale.engine", "prime_scale.cli.train"),
                                     ("prime_scale.data.format", "prime_scale.data.loader")])
def test_a_planted_back_import_is_caught(planted):
    graph = import_graph()
    src, dst = planted
    graph[src] = graph[src] | {dst}
    assert violations(graph), f"{src} -> {dst} went unnoticed"


def test_tools_are_thin_entries():
    for path in (REPO / "tools").glob("*.py"):
        tree = ast.parse(path.read_text())
        defs = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert defs == [], f"{path.name} defines {defs}: logic belongs in the library, tools only call it"
        assert any(m.startswith("prime_scale") for m in _imports(path, "tools")), path


def test_files_and_functions_stay_readable():
    too_long = []
    for path in source_files() + sorted((REPO / "tests").rglob("*.py")) + sorted((REPO / "bench").glob("*.py")):
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}(): {length} lines")
    assert too_long == []
