"""What the benchmark scripts share: writing their report."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, path: Path | None) -> None:
    """Write `report` as indented JSON to `path` (folders created), when a path is given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
