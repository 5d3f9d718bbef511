"""The `results.json` of a run folder: what scripts and sweeps read instead of parsing logs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"


def write_results(folder: str | os.PathLike, results: dict[str, Any], name: str = RESULTS_FILE) -> Path:
    """Write `results` as JSON into `folder`, complete or not at all: a temporary file in the same folder,
    flushed to disk, renamed into place (and removed if anything fails before)."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_results(folder: str | os.PathLike, name: str = RESULTS_FILE) -> dict[str, Any]:
    return json.loads((Path(folder) / name).read_text())
