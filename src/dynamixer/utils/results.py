"""The `results.json` of a run folder: what scripts and sweeps read instead of parsing logs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dynamixer.machinery.files import write_file

RESULTS_FILE = "results.json"


def write_results(folder: str | os.PathLike, results: dict[str, Any], name: str = RESULTS_FILE) -> Path:
    """Write `results` as JSON into `folder` (`write_file`: whole, never through a link)."""
    return write_file(Path(folder) / name, json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
