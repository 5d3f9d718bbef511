"""A run's folder belongs to that run: a fresh start claims an empty folder (atomically: two starts at once
cannot share one) and refuses one that holds a run; the composed config is recorded once it is ours."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dynamixer.errors import UserError

CLAIM = ".dynamixer-run"  # created exclusively by the fresh start that owns the folder
# what a run leaves in its folder (besides the claim): a folder with one of these holds a run
RUN_FILES = ("checkpoints", "csv", "tensorboard", "wandb", "results.json")


class RunFolderError(UserError):
    """A fresh start in a folder that holds (or is starting) another run."""


def _what_it_holds(folder: Path) -> str:
    from dynamixer.checkpoint_reader import read_checkpoint

    last = folder / "checkpoints" / "last.ckpt"
    try:
        return f"a run saved at step {read_checkpoint(last, mmap=True)['global_step']} ({last})"
    except Exception:  # no readable last.ckpt: name what is there instead
        found = [name for name in (CLAIM, *RUN_FILES) if (folder / name).exists()]
        return f"a run ({', '.join(found)})"


def claim_run_folder(cfg: DictConfig, resuming: bool) -> None:
    """Make `cfg.paths.output_dir` this run's. A fresh start (`resuming` false) claims the folder or, when it
    holds a run, refuses naming what it holds and the ways out; a resume takes the folder as it is."""
    folder = Path(cfg.paths.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    held = any((folder / name).exists() for name in RUN_FILES)
    try:
        fd = os.open(folder / CLAIM, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        held = True
    else:
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}, f)
    if held and not resuming:
        raise RunFolderError(
            f"{folder} holds {_what_it_holds(folder)}; a fresh start would overwrite it. Resume it with "
            f"ckpt_path=auto (the same run_name), or start a new run with another run_name=..."
        )


def record_config(cfg: DictConfig) -> None:
    """Write the composed config into `<run folder>/.hydra/` as Hydra would (config.yaml, hydra.yaml,
    overrides.yaml), after the folder is this run's; a resume keeps the ones of the run's start."""
    if not HydraConfig.initialized():
        return
    folder = Path(cfg.paths.output_dir) / ".hydra"
    if (folder / "config.yaml").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    hydra_cfg = HydraConfig.get()
    OmegaConf.save(cfg, folder / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hydra_cfg.overrides.task)), folder / "overrides.yaml")
