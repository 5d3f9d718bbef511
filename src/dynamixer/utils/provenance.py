"""What a run was made with: the versions of the packages that decide its numbers and the code's git commit."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("dynamixer", "torch", "torchvision", "lightning", "timm", "hydra-core", "omegaconf", "torchmetrics")
PACKAGES += ("numpy", "pillow", "safetensors")


@functools.cache
def provenance() -> dict[str, Any]:
    """`{"versions": {package: version}, "torch_build": {...}, "git": {"commit": sha, "dirty": bool} or None}`:
    `torch_build` is torch's own build (`2.14.1+cu130`, its CUDA and cuDNN); `git` is None where the package is
    not run from a git checkout (an installed wheel) or git is missing."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    build = {"version": str(torch.__version__), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return {"versions": versions, "torch_build": build, "git": _git_state(Path(__file__).resolve().parents[3])}


def _git_state(root: Path) -> dict[str, Any] | None:
    """The commit checked out in `root` and whether tracked files differ from it."""
    if not (root / ".git").exists() or not (root / "src" / "dynamixer").is_dir():
        return None
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
