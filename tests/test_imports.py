"""The package's import graph, read from the source with `ast`: no cycles, and the layering of
ARCHITECTURE.md where a test can hold it (models/ used by the cli and the sweep only; tasks without torch).

Every import counts, also one inside a function: a lazy import does not fail at import time, but it still
ties two modules together both ways (presets.py and pretrain.py, before models/, were such a pair). An
import of a name that is not a module counts as an import of the module that defines it; the parent
packages that Python imports implicitly before a submodule are not edges. A relative or absolute import
inside the package that names no module is an error here too (a stale path after a move).
"""
from __future__ import annotations

import ast
import importlib.util
import pkgutil
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = "onelayer_fast"


@lru_cache(maxsize=None)
def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # e.g. the parent is a module, not a package
        return False


def _imports(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:  # `from package import module` imports the module
                inside = base == ROOT or base.startswith(ROOT + ".")
                submodule = f"{base}.{alias.name}"
                found.append((node.lineno, submodule if inside and _is_module(submodule) else base))
    return found


@lru_cache(maxsize=None)
def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]], list[str]]:
    """-> (internal edges, external top-level packages, unresolved imports), per module of the package.

    Modules are found from the root package down (pkgutil over each package's search path) and by following
    imports, so a subpackage mapped from elsewhere (`onelayer_fast.kernels` from kernels/) is included.
    """
    internal: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    unresolved: list[str] = []
    todo = [ROOT]
    while todo:
        name = todo.pop()
        if name in internal:
            continue
        spec = importlib.util.find_spec(name)
        internal[name], external[name] = set(), set()
        if spec.submodule_search_locations:  # a package: its modules, whoever imports them
            todo += [f"{name}.{m.name}" for m in pkgutil.iter_modules(spec.submodule_search_locations)]
        if name != ROOT:
            todo.append(name.rpartition(".")[0])  # and the package of each module
        if not (spec.origin or "").endswith(".py"):  # the compiled planner: no source to read
            continue
        for line, target in _imports(name, Path(spec.origin)):
            if target != ROOT and not target.startswith(ROOT + "."):
                external[name].add(target.partition(".")[0])
            elif not _is_module(target):
                unresolved.append(f"{spec.origin}:{line}: {target}")
            elif target != name:
                internal[name].add(target)
                todo.append(target)
    return internal, external, unresolved


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None for an acyclic graph (depth-first, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for succ in sorted(edges.get(node, ())):
            if state.get(succ) == 1:
                return path[path.index(succ):] + [succ]
            if succ not in state and (cycle := visit(succ)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"b"}}) == ["b", "b"]


def test_graph_covers_the_package():
    edges, _, _ = import_graph()
    for module in ("onelayer_fast.cli", "onelayer_fast.tasks.rewards", "onelayer_fast.models.toy_arith",
                   "onelayer_fast.models.smollm2", "onelayer_fast.kernels", "onelayer_fast.kernels.grpo_loss"):
        assert module in edges, module
    assert "onelayer_fast.tasks.rewards" in edges["onelayer_fast.evaluate"]  # an import of a module's name
    assert "onelayer_fast.models.presets" in edges["onelayer_fast.models.toy_arith"]


def test_every_internal_import_names_a_module():
    _, _, unresolved = import_graph()
    assert unresolved == [], "imports of modules that do not exist:\n" + "\n".join(unresolved)


def test_no_import_cycle():
    edges, _, _ = import_graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_models_used_by_cli_and_sweep_only():
    """Model provisioning sits beside the engine: the engine takes a model and a tokenizer."""
    edges, _, _ = import_graph()
    models = f"{ROOT}.models"
    users = {m for m, targets in edges.items() if not m.startswith(models)
             and any(t == models or t.startswith(models + ".") for t in targets)}
    assert users <= {ROOT, f"{ROOT}.cli", f"{ROOT}.sweep"}, users  # ROOT: the public load_model
    # and models/ uses of the engine only the evaluator and the tasks, to score the toy-arith build
    used = {t for m, targets in edges.items() if m.startswith(models) for t in targets if not t.startswith(models)}
    assert used <= {f"{ROOT}.evaluate", f"{ROOT}.tasks", f"{ROOT}.tasks.arithmetic"}, used


@pytest.mark.parametrize("heavy", ["torch", "transformers"])
def test_tasks_know_nothing_of_torch(heavy):
    edges, external, _ = import_graph()
    tasks = [m for m in edges if m == f"{ROOT}.tasks" or m.startswith(f"{ROOT}.tasks.")]
    assert tasks and not [m for m in tasks if heavy in external[m]]
