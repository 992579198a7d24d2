"""The import structure: layers point one way and no module imports itself back through others.

``reduction/`` (the science) imports nothing of ``observer/`` or ``tui/``;
``observer/`` imports ``tui/`` only in its entry points (the command line and
the demo); ``tui/`` reads only what observer publishes (``observer.state``).
Every import counts, also those inside functions; only ``if TYPE_CHECKING:``
blocks are left out. ``reduction/`` writes no files.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reduction", "observer", "tui")
ENTRY_POINTS = {"observer.cli", "observer.demo"}


def _modules() -> dict[str, Path]:
    return {f"{pkg}.{p.stem}": p for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))
            if p.stem != "__init__"}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules imported anywhere in ``path`` (outside TYPE_CHECKING blocks)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in known}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) for name, path in modules.items()}


def test_layers_point_one_way():
    wrong = []
    for module, imports in _graph().items():
        for target in imports:
            if module.startswith("reduction.") and not target.startswith("reduction."):
                wrong.append((module, target))
            if module.startswith("observer.") and target.startswith("tui.") and module not in ENTRY_POINTS:
                wrong.append((module, target))
            if module.startswith("tui.") and target.startswith("observer.") and target != "observer.state":
                wrong.append((module, target))
    assert wrong == []


def test_no_import_cycles():
    graph = _graph()
    cycles = []

    def walk(node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                walk(nxt, path + [nxt])
        done.add(node)

    done: set[str] = set()
    for module in graph:
        if module not in done:
            walk(module, [module])
    assert cycles == []


def test_reduction_writes_no_files():
    writes = re.compile(r"""open\([^)]*["'][wax]|\.write_(text|bytes)\(|savefig\(|writeto\(|np\.save|"""
                        r"""os\.replace\(|tempfile\.|\.mkdir\(""")
    offenders = [(p.name, m.group(0)) for p in sorted((ROOT / "reduction").glob("*.py"))
                 for m in writes.finditer(p.read_text())]
    assert offenders == []
