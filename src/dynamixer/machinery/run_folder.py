"""A run's folder belongs to that run: a fresh start claims an empty folder (atomically: two starts at once
cannot share one) under a new run id and refuses one that holds a run; a resume continues only the run its
checkpoint was saved by (the id every checkpoint carries); a folder that holds links is refused (writes would
go where they point); the composed config is recorded once the folder is ours."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import time
import uuid
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dynamixer.errors import UserError
from dynamixer.machinery.files import write_file

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


def links_in(folder: Path, limit: int = 1_000_000) -> list[str]:
    """The entries of `folder` a write would follow out of it: symbolic links to anywhere else, and files with
    other names elsewhere (hard links) outside `checkpoints/` (whose writes replace names, never write in
    place). `wandb/` is W&B's own: it links its latest run there and its logs to the user's cache, and makes
    each run's files anew."""
    found, seen, inside = [], 0, Path(os.path.realpath(folder))
    for root, dirs, files in os.walk(folder, followlinks=False):
        if Path(root) == folder:
            dirs[:] = [d for d in dirs if d != "wandb"]
        for name in dirs + files:
            seen += 1
            path = Path(root) / name
            mode = os.lstat(path)
            in_checkpoints = path.relative_to(folder).parts[0] == "checkpoints"
            outward = stat.S_ISLNK(mode.st_mode) and not Path(os.path.realpath(path)).is_relative_to(inside)
            if outward or (stat.S_ISREG(mode.st_mode) and mode.st_nlink > 1 and not in_checkpoints):
                found.append(str(path.relative_to(folder)))
        if seen > limit:
            raise RunFolderError(f"{folder} holds more than {limit} files: it is no run folder of ours")
    return found


def check_no_links(folder: Path) -> None:
    """Refuse a run folder in which a write would follow a link out of it."""
    links = links_in(folder) if folder.is_dir() else []
    if folder.is_symlink() or links:
        named = str(folder) if folder.is_symlink() else ", ".join(links[:5])
        raise RunFolderError(
            f"{folder} holds links ({named}): a run would write where they point. A run folder holds the files of "
            "its run only: copy the run without links (cp -rL), or remove them"
        )


def _claim(folder: Path) -> dict[str, Any]:
    try:
        found = json.loads((folder / CLAIM).read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def claim_run_folder(cfg: DictConfig, resuming: bool, resumed: tuple[str, dict[str, Any]] | None = None) -> str:
    """Make `cfg.paths.output_dir` this run's and return the run's id (every checkpoint it saves carries it).

    A fresh start (`resuming` false) claims the folder under a new id or, when it holds a run, refuses naming
    what it holds and the ways out. A resume of the checkpoint `resumed` (path, content) continues the run that
    saved it: a folder that holds another run is refused, naming both; an empty one is claimed for it."""
    folder = Path(cfg.paths.output_dir)
    check_no_links(folder)
    folder.mkdir(parents=True, exist_ok=True)
    held = any((folder / name).exists() for name in RUN_FILES)
    run_id = (resumed[1].get("run_id") if resumed else None) or uuid.uuid4().hex
    try:
        fd = os.open(folder / CLAIM, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except FileExistsError:
        held = True
    else:
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "run_id": run_id}, f)
        if not held:
            return run_id
    if held and not resuming:
        raise RunFolderError(
            f"{folder} holds {_what_it_holds(folder)}; a fresh start would overwrite it. Resume it with "
            f"ckpt_path=auto (the same run_name), or start a new run with another run_name=..."
        )
    if resumed is None:
        return _claim(folder).get("run_id") or run_id
    ckpt_path, checkpoint = resumed
    ours, theirs = _claim(folder).get("run_id"), checkpoint.get("run_id")
    # without both ids (a run of an older dynamixer), a checkpoint of this folder is this run's
    same = ours == theirs if ours and theirs else Path(ckpt_path).resolve().parent == (folder / "checkpoints").resolve()
    if not same:
        raise RunFolderError(
            f"{folder} holds {_what_it_holds(folder)} (run {ours or 'of an older dynamixer'}), and ckpt_path="
            f"{ckpt_path} was saved by another run ({theirs or 'of an older dynamixer'}): a resume "
            "continues the run of its checkpoint in that run's folder. Resume it with its own run_name, or start a "
            "new run from its weights: run_name=<new> model.pretrained_file=<checkpoint>"
        )
    return ours or run_id


def record_config(cfg: DictConfig) -> None:
    """Write the composed config into `<run folder>/.hydra/` as Hydra would (config.yaml, hydra.yaml,
    overrides.yaml), after the folder is this run's; a resume keeps the ones of the run's start."""
    if not HydraConfig.initialized():
        return
    folder = Path(cfg.paths.output_dir) / ".hydra"
    if os.path.lexists(folder / "config.yaml"):
        return
    hydra_cfg = HydraConfig.get()
    # never through a link (write_file): a job that failed before its folder was checked records it too
    write_file(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    write_file(folder / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    write_file(folder / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(hydra_cfg.overrides.task))))


class RunLogHandler(logging.FileHandler):
    """The job's log file (`train.log`, Hydra's job logging) opened without following a link: where the run
    folder holds a link or another name of a file in its place, nothing is written (the run then refuses the
    folder, naming it: `check_no_links`)."""

    def _open(self):
        try:
            fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError:  # a link (ELOOP) or a folder that cannot hold the log: no log file
            return open(os.devnull, "w", encoding=self.encoding)
        if os.fstat(fd).st_nlink > 1:
            os.close(fd)
            return open(os.devnull, "w", encoding=self.encoding)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)
