"""The `results.json` of a run folder: what scripts and sweeps read instead of parsing logs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"


def write_results(folder: str | os.PathLike, results: dict[str, Any], name: str = RESULTS_FILE) -> Path:
    """Write `results` as JSON into `folder` atomically (a temp file renamed into place)."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_results(folder: str | os.PathLike, name: str = RESULTS_FILE) -> dict[str, Any]:
    return json.loads((Path(folder) / name).read_text())
