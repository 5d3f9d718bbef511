"""The `results.json` of a run folder: what scripts and sweeps read instead of parsing logs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"


def write_file(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` to `path`, complete or not at all and never through a link: a new temporary file in the same
    folder (created exclusively, not following links), flushed to disk, renamed into place (a link at `path` is
    replaced, its target untouched); the temporary file is removed if anything fails before."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover of a killed write (or a planted link): never written through
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_results(folder: str | os.PathLike, results: dict[str, Any], name: str = RESULTS_FILE) -> Path:
    """Write `results` as JSON into `folder` (`write_file`: whole, never through a link)."""
    return write_file(Path(folder) / name, json.dumps(results, indent=2, sort_keys=True, default=str) + "\n")
