"""The package's layers (docs/development.md, Layout): a module imports only modules of the layers below its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dynamixer"
# top-level module or sub-package -> its layer; a module may import its own sub-package and lower layers
LAYERS = {
    **dict.fromkeys(["errors", "lightning_internals"], 0),
    **dict.fromkeys(["utils", "signals", "checkpoint_io", "loggers", "schedules", "schema", "bounded"], 1),
    **dict.fromkeys(["models", "data", "visualize"], 2),
    **dict.fromkeys(["lit_module", "callbacks", "sweep"], 3),
    "checkpoint_reader": 3.5,  # the door of checkpoints: below the run layer, above what it validates against
    "run": 4,
}
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def imported(path: Path) -> set[str]:
    """The `dynamixer.<part>` this file imports (relative imports inside a sub-package are its own)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "dynamixer":
            names = [f"dynamixer.{a.name}" for a in node.names]  # from dynamixer import signals
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        assert not (isinstance(node, ast.ImportFrom) and node.level > 1), f"{path}: import from above its package"
        found |= {n.split(".")[1] for n in names if n.startswith("dynamixer.")}
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_only_lower_layers(path: Path) -> None:
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    assert own in LAYERS, f"{own} has no layer: add it to LAYERS and to docs/development.md's Layout"
    upward = sorted(m for m in imported(path) if m != own and LAYERS[m] >= LAYERS[own])
    assert upward == [], f"{path.relative_to(PACKAGE)} (layer {LAYERS[own]}) imports {upward} of its layer or above"
