"""The layer rule: each ktray module has a level and may import own modules of a strictly lower level only.

One exception: inside the pure subpackages (ktray.data, ktray.algos, ktray.models) a module may import a sibling;
stages never import stages, nor methods methods. Own imports sit at module top level, except in the entry points,
which import the pipeline lazily so that ``ktray --help`` stays fast. ``if TYPE_CHECKING:`` imports never run and
are exempt. Why: a newcomer sees the layers in LEVELS, and the import graph stays a DAG, so the pure parts stay
testable without Ray. A new module must be placed in LEVELS consciously.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path
from typing import NamedTuple

import pytest

LEVELS: dict[int, list[str]] = {
    0: ["ktray", "ktray.config", "ktray.schema", "ktray.rundir", "ktray.metrics"],  # base contracts
    1: ["ktray.plots"],  # plots
    2: ["ktray.data.*", "ktray.algos.*", "ktray.models.*", "ktray.artifacts", "ktray.fetch"],  # pure parts (no Ray)
    3: ["ktray.runtime", "ktray.export", "ktray.preflight"],  # Ray runtime; trunks out; checks before any stage
    4: ["ktray.training", "ktray.tracking", "ktray.lifecycle"],  # harnesses
    5: ["ktray.methods.*"],  # training methods
    6: ["ktray.stages.*"],  # stages
    7: ["ktray.pipeline"],  # pipeline
    8: ["ktray.compare", "ktray.sweep", "ktray.submit"],  # orchestration
    9: ["ktray.cli"],  # CLI
    10: ["ktray.jobs", "ktray.__main__"],  # entry points
}
PURE = ("ktray.data", "ktray.algos", "ktray.models")  # siblings inside one of these may import each other
ENTRY_POINTS = ("ktray.cli", "ktray.jobs", "ktray.__main__")  # the only modules that may import own modules lazily
ROOT = Path(__file__).resolve().parents[1]


class Import(NamedTuple):
    target: str  # the own module imported, e.g. ktray.data.shards
    line: int
    top_level: bool  # False inside a function
    type_checking: bool  # under `if TYPE_CHECKING:`, so never run


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def is_package(module: str) -> bool:
    return (ROOT / module.replace(".", "/") / "__init__.py").is_file()


def is_module(module: str) -> bool:
    return is_package(module) or (ROOT / f"{module.replace('.', '/')}.py").is_file()


def module_name(path: Path) -> str:
    parts = path.resolve().relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def bound_names(package: str) -> frozenset[str]:
    """Names bound anywhere in a package's __init__ (leniently), or {"*"} if it has a module __getattr__."""
    nodes = list(ast.walk(ast.parse((ROOT / package.replace(".", "/") / "__init__.py").read_text())))
    names = {n.name for n in nodes if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    names |= {n.asname or n.name for n in nodes if isinstance(n, ast.alias)}
    names |= {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return frozenset({"*"} if "__getattr__" in names else names)


def from_target(base: str, name: str) -> str:
    """`from base import name` imports the submodule base.name if there is one, or if base binds no such name."""
    sub, bound = f"{base}.{name}", bound_names(base) if is_package(base) else frozenset({"*"})
    return sub if within(base, "ktray") and name != "*" and (is_module(sub) or not {"*", name} & bound) else base


def imports_from_source(module: str, source: str) -> list[Import]:
    found: list[Import] = []

    def visit(node: ast.AST, top: bool, checking: bool) -> None:
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the module's own package
                package = module if is_package(module) else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            targets = [from_target(base, a.name) for a in node.names]
        found.extend(Import(t, node.lineno, top, checking) for t in dict.fromkeys(targets) if within(t, "ktray"))
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            for stmt in node.body:
                visit(stmt, top, True)
            for stmt in node.orelse:
                visit(stmt, top, checking)
            return
        inner = top and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner, checking)

    visit(ast.parse(source), True, False)
    return found


def own_imports(path: Path) -> list[Import]:
    return imports_from_source(module_name(path), path.read_text())


def placed(module: str) -> int | None:
    """The module's level, or None if LEVELS does not place it (`pkg.*` places pkg and all in it)."""
    for n, patterns in LEVELS.items():
        if any(p == module or (p.endswith(".*") and within(module, p[:-2])) for p in patterns):
            return n
    return None


def level(module: str) -> int:
    if (n := placed(module)) is None:
        raise KeyError(f"{module} is not placed in LEVELS")
    return n


def violations(graph: dict[str, list[Import]]) -> list[str]:
    out: list[str] = []
    for src, imports in sorted(graph.items()):
        for t, line, top, checking in imports:
            at = f"{src.replace('.', '/')}{'/__init__' if is_package(src) else ''}.py:{line}: {src}"
            if checking or t == src:
                continue
            if not top and src not in ENTRY_POINTS:
                out.append(f"{at} imports {t} inside a function: only {', '.join(ENTRY_POINTS)} may import lazily")
            if not is_module(t):
                out.append(f"{at} imports {t}: no such module")
            elif placed(src) is None or placed(t) is None:
                out.append(f"{at} imports {t}: {src if placed(src) is None else t} is not placed in LEVELS")
            elif level(t) >= level(src) and not any(within(src, p) and within(t, p) for p in PURE):
                kind = "sideways" if level(t) == level(src) else "upward"
                out.append(f"{at} (level {level(src)}) imports {t} (level {level(t)}): {kind}")
    return out


def find_cycle(graph: dict[str, list[Import]]) -> list[str] | None:
    """A cycle of run-time own imports, as [a, b, ..., a], or None."""
    done: set[str] = set()
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        stack.append(m)
        for t in dict.fromkeys(i.target for i in graph.get(m, []) if not i.type_checking and i.target != m):
            if t in stack:
                return [*stack[stack.index(t) :], t]
            if t in graph and t not in done and (cycle := dfs(t)):
                return cycle
        done.add(stack.pop())
        return None

    return next((c for m in sorted(graph) if m not in done and (c := dfs(m))), None)


@cache
def real_graph() -> dict[str, list[Import]]:
    return {module_name(p): own_imports(p) for p in sorted((ROOT / "ktray").rglob("*.py"))}


def test_every_module_has_a_level() -> None:
    assert [m for m in real_graph() if placed(m) is None] == []


def test_no_upward_or_sideways_imports() -> None:
    found = violations(real_graph())
    assert found == [], "\n" + "\n".join(found)


def test_no_import_cycle() -> None:
    assert find_cycle({"ktray.a": [Import("ktray.b", 1, True, False)], "ktray.b": [Import("ktray.a", 1, False, False)]})
    assert find_cycle(real_graph()) is None


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("ktray.stages.embed", "from ktray.stages.pretext import run", "ktray/stages/embed.py:1: ktray.stages.embed"
         " (level 6) imports ktray.stages.pretext (level 6): sideways"),
        ("ktray.algos.kmeans", "from ..stages import cluster", "ktray/algos/kmeans.py:1: ktray.algos.kmeans"
         " (level 2) imports ktray.stages.cluster (level 6): upward"),
        ("ktray.stages.embed", "def f():\n    from ktray import metrics", "ktray/stages/embed.py:2: ktray.stages.embed"
         f" imports ktray.metrics inside a function: only {', '.join(ENTRY_POINTS)} may import lazily"),
        ("ktray.algos.kmeans", "from . import hog\nimport ktray.models.heads", "ktray/algos/kmeans.py:2: ktray.algos"
         ".kmeans (level 2) imports ktray.models.heads (level 2): sideways"),  # siblings pass, other pure parts not
        ("ktray.algos.kmeans", "if TYPE_CHECKING:\n    from ktray import pipeline\nelse:\n    from ktray import cli",
         "ktray/algos/kmeans.py:4: ktray.algos.kmeans (level 2) imports ktray.cli (level 9): upward"),  # not pipeline
    ],
)
def test_a_sideways_import_is_caught(module: str, source: str, expected: str) -> None:
    real = real_graph()
    graph = {**real, module: real[module] + imports_from_source(module, source)}  # the real code path, one edge more
    assert set(violations(graph)) - set(violations(real)) == {expected}
