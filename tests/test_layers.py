"""The package's layers (docs/development.md, Layout): a module imports only modules of the layers below its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dynamixer"
# top-level module or sub-package -> its layer; a module may import its own sub-package and lower layers
LAYERS = {
    "errors": 0,
    "machinery": 0.5,  # stop, save, resume, requeue: under every layer that saves or restores state
    **dict.fromkeys(["utils", "loggers", "schedules", "schema", "bounded"], 1),
    **dict.fromkeys(["models", "data", "visualize"], 2),
    **dict.fromkeys(["lit_module", "callbacks", "sweep"], 3),
    "checkpoint_reader": 3.5,  # the door of checkpoints: below the run layer, above what it validates against
    "machinery.run_folder": 3.75,  # the claim names the run a folder holds, read through the door
    "run": 4,
}
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def imported(path: Path) -> set[str]:
    """The `dynamixer.<part>` this file imports (relative imports inside a sub-package are its own)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in ("dynamixer", "dynamixer.machinery"):
            names = [f"{node.module}.{a.name}" for a in node.names]  # from dynamixer.machinery import run_folder
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        assert not (isinstance(node, ast.ImportFrom) and node.level > 1), f"{path}: import from above its package"
        found |= {part(n.split(".")[1:]) for n in names if n.startswith("dynamixer.")}
    return found


def part(names: list[str] | tuple[str, ...]) -> str:
    """The entry of `LAYERS` of a module (its path under `dynamixer`, without `.py`)."""
    names = [n.removesuffix(".py") for n in names]
    return ".".join(names[:2]) if ".".join(names[:2]) in LAYERS else names[0]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_only_lower_layers(path: Path) -> None:
    own = part(path.relative_to(PACKAGE).parts)
    assert own in LAYERS, f"{own} has no layer: add it to LAYERS and to docs/development.md's Layout"
    upward = sorted(m for m in imported(path) if m != own and LAYERS[m] >= LAYERS[own])
    assert upward == [], f"{path.relative_to(PACKAGE)} (layer {LAYERS[own]}) imports {upward} of its layer or above"
