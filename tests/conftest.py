"""Shared helpers for the tests: running train.py/test.py as scripts, tiny image-folder trees, configs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

# CPU, no progress bar or model summary: quiet, deterministic device choice in every script run
# (`++`: set the key whether or not the trainer config lists it)
QUIET_TEST = ["hardware=cpu", "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false"]
QUIET_TRAIN = [*QUIET_TEST, "callbacks.progress_bar=null", "callbacks.model_summary=null"]

WNIDS = ("n01440764", "n01443537", "n01484850")


def script_env() -> dict[str, str]:
    """The environment of a script run: this one, without anything that changes Hydra's error output."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("DYNAMIXER_ROOT", None)  # logs go under the script's working folder
    env["PYTHONUNBUFFERED"] = "1"
    return env


def script_command(script: str, args: Sequence[str]) -> list[str]:
    return [sys.executable, str(REPO / script), *map(str, args)]


def run_script(
    script: str, args: Sequence[str], cwd: str | os.PathLike, check: bool = True, timeout: float = 1800
) -> subprocess.CompletedProcess:
    """Run `python <repo>/<script> *args` in `cwd` (so its `logs/` land there) and return the finished process.

    With `check`, a non-zero exit fails the test and shows the end of the script's output.
    """
    proc = subprocess.run(
        script_command(script, args),
        cwd=cwd,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{script} {' '.join(map(str, args))} exited with {proc.returncode}\n"
            f"--- stdout (end) ---\n{proc.stdout[-3000:]}\n--- stderr (end) ---\n{proc.stderr[-6000:]}",
            pytrace=False,
        )
    return proc


def run_dir(cwd: str | os.PathLike, run_name: str, task: str = "train") -> Path:
    """The run folder of a script started in `cwd` with `run_name=...`."""
    return Path(cwd) / "logs" / task / "runs" / run_name


def write_image_tree(
    root: str | os.PathLike,
    classes: Sequence[str] = WNIDS,
    train_per_class: int = 4,
    val_per_class: int = 2,
    size: tuple[int, int] = (48, 40),
    seed: int = 0,
) -> Path:
    """An ImageNet-layout tree `root/{train,val}/<wnid>/*.JPEG` of small random-noise JPEGs.

    Each class gets its own mean colour, so the classes are (weakly) learnable.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(classes):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([80 * c, 255 - 80 * c, 128], dtype=np.float64)
            for i in range(per_class):
                pixels = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i:04d}.JPEG", quality=90)
    return root


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """3 classes, 4 train and 2 val JPEGs each."""
    return write_image_tree(tmp_path / "imagenet")


def compose_train_config(overrides: Sequence[str] = (), output_dir: str | os.PathLike | None = None):
    """`conf/train.yaml` composed with `overrides`, outside a Hydra run (so `paths` are set explicitly)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides))
    if output_dir is not None:
        from omegaconf import open_dict

        with open_dict(cfg):
            cfg.paths.root_dir = str(output_dir)
            cfg.paths.output_dir = str(output_dir)
    return cfg


def compose_job_config(overrides: Sequence[str], output_dir: str | os.PathLike):
    """The config a `python train.py <overrides>` job sees under `@hydra.main`: `HydraConfig` set, no
    `hydra` node, its output folder `output_dir`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        del cfg["hydra"]
    return cfg
