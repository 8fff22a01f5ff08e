"""The package's layout: its modules import one another without a cycle, and every import is at module level.

A cycle makes the order of initialisation matter and hides which module depends on which; an import
inside a function hides a dependency from a reader. The one allowed exception is documented where it is:
``SyncBatchNorm.convert_sync_batchnorm``, torch's alias, imports ``convert`` (which imports ``batchnorm``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import syncnorm

PACKAGE = Path(syncnorm.__file__).parent
# (importing module, imported module): the lazy imports the package allows, each commented where it is.
ALLOWED_LAZY = {("batchnorm", "convert")}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """The package modules ``path`` imports at module level, and those it imports inside functions."""
    top, lazy = set(), set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level != 1:
            continue
        names = [node.module] if node.module else [alias.name for alias in node.names]
        (top if node in tree.body else lazy).update(name.split(".")[0] for name in names)
    return top, lazy


def _graph() -> dict[str, tuple[set[str], set[str]]]:
    return {path.stem: _imports(path) for path in sorted(PACKAGE.glob("*.py"))}


def test_no_import_cycle_inside_the_package() -> None:
    # Imports inside functions count too: a cycle closed lazily is still a cycle (the allowed one aside).
    graph = {module: top | {m for m in lazy if (module, m) not in ALLOWED_LAZY}
             for module, (top, lazy) in _graph().items()}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            assert state.get(imported) != "open", f"import cycle: {' -> '.join([*path, module, imported])}"
            if imported not in state:
                visit(imported, [*path, module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


def test_imports_inside_functions_are_only_the_documented_ones() -> None:
    lazy = {(module, imported) for module, (_, inner) in _graph().items() for imported in inner}
    assert lazy <= ALLOWED_LAZY, sorted(lazy - ALLOWED_LAZY)
