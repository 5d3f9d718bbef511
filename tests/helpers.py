"""Helpers of the tests, in one place: paths of the repository, running the entry points as scripts,
small image-folder trees, composed configs. Fixtures are in conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
REFERENCE_DIR = REPO / "tests" / "data" / "reference"  # the authors' release: key names and shapes, parity model

# CPU, no progress bar or model summary: quiet, deterministic device choice in every script run
# (`++`: set the key whether or not the trainer config lists it)
QUIET_TEST = ["hardware=cpu", "++trainer.enable_progress_bar=false", "++trainer.enable_model_summary=false"]
QUIET = ["callbacks.progress_bar=null", "callbacks.model_summary=null"]  # train.py's own callbacks
QUIET_TRAIN = [*QUIET_TEST, *QUIET]
QUIET_FAST = [*QUIET, "debug=fast"]  # a few small steps (conf/debug/fast.yaml)

WNIDS = ("n01440764", "n01443537", "n01484850")
DIGITS_TRAIN = 1437  # digits: 1,797 images, 20% held out for validation
IMAGENET = ["data=imagenet", "data.num_workers=0", "data.batch_size=2"]  # a tiny folder data set, in process


def script_env() -> dict[str, str]:
    """The environment of a script run: this one, without anything that changes Hydra's error output."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("DYNAMIXER_TRACES_ASKED", None)
    env.pop("DYNAMIXER_ROOT", None)  # logs go under the script's working folder
    env["PYTHONUNBUFFERED"] = "1"
    # test-only callbacks (`+callbacks.<name>._target_=helpers.<Callback>`) are importable in a script run
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "tests"), env.get("PYTHONPATH")) if p)
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


def start_script(
    script: str, args: Sequence[str], cwd: str | os.PathLike, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start `python <repo>/<script> *args` in `cwd` (with `env` added to the environment), its stdout and
    stderr together in one text pipe."""
    return subprocess.Popen(
        script_command(script, args),
        cwd=cwd,
        env={**script_env(), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, expect: int = 0, timeout: float = 900) -> str:
    """Wait for a started script; its exit status must be `expect`. Returns its output."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == expect, out[-4000:]
    return out


def wait_for(predicate: Callable[[], Any], proc: subprocess.Popen, timeout: float = 600) -> None:
    """Poll `predicate` until it holds; fails if the script ends first, or after `timeout` s (a hang guard)."""
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def entry_point(script: str) -> Any:
    """The module of an entry point (`train.py`, `test.py`, `predict.py`), imported without running it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"entry_{Path(script).stem}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # as in a script run, Hydra then looks for `conf/` next to the file (it goes by the task's module)
    module.main.__wrapped__.__module__ = "__main__"
    return module


def read_checkpoint(path: str | os.PathLike) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def training_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Raw weights, EMA weights and optimizer state of a checkpoint, flattened to named tensors."""
    ckpt = read_checkpoint(path)
    tensors = {f"state_dict/{k}": v for k, v in ckpt["state_dict"].items()}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensors[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    walk("optimizer_states", ckpt["optimizer_states"])
    return tensors


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The names whose tensors are not bit-identical (or are in one only); [] for two equal states."""
    return sorted(set(a) ^ set(b)) + [k for k in a if k in b and not torch.equal(a[k], b[k])]


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
    val_classes: Sequence[str] | None = None,
) -> Path:
    """An ImageNet-layout tree `root/{train,val}/<wnid>/*.JPEG` of small random-noise JPEGs.

    Each class gets its own mean colour, so the classes are (weakly) learnable. `val_classes` (default:
    `classes`) gives val/ other class folders than train/.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, per_class, names in (
        ("train", train_per_class, classes),
        ("val", val_per_class, val_classes or classes),
    ):
        for c, wnid in enumerate(names):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([80 * c, 255 - 80 * c, 128], dtype=np.float64)
            for i in range(per_class):
                pixels = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i:04d}.JPEG", quality=90)
    return root


def write_photo_tree(
    root: str | os.PathLike, classes: Sequence[str] = WNIDS, train_per_class: int = 4, val_per_class: int = 2
) -> Path:
    """An ImageNet-layout tree `root/{train,val}/<wnid>/*.JPEG` of real images: class `c` holds
    scikit-learn's handwritten digit `c` (upscaled to 40x48), every third image a crop of one of its sample
    photos instead (`load_sample_images`); file names are unique across the tree."""
    from sklearn.datasets import load_digits, load_sample_images

    root = Path(root)
    digits, photos = load_digits(), load_sample_images().images
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(classes):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            of_class = digits.images[digits.target == c % 10]
            for i in range(per_class):
                if i % 3 == 2:
                    photo = photos[(c + i) % 2]
                    y, x = 37 * (c * 7 + i) % (photo.shape[0] - 48), 53 * (c * 5 + i) % (photo.shape[1] - 40)
                    img = Image.fromarray(photo[y : y + 48, x : x + 40])
                else:
                    pixels = (of_class[(i + (split == "val") * 50) % len(of_class)] * 255 / 16).astype(np.uint8)
                    img = Image.fromarray(pixels).resize((40, 48), Image.Resampling.BICUBIC).convert("RGB")
                img.save(folder / f"{wnid}_{split}_{i:04d}.JPEG", quality=90)
    return root


def flatten_val(root: Path) -> list[tuple[str, str]]:
    """Turn val/<wnid>/* into ImageNet's flat val/ILSVRC2012_val_<n>.JPEG; returns (file, wnid) in order."""
    found = sorted((p, p.parent.name) for p in (root / "val").glob("*/*.JPEG"))
    flat = []
    for n, (path, wnid) in enumerate(found, start=1):
        name = f"ILSVRC2012_val_{n:08d}.JPEG"
        path.rename(root / "val" / name)
        flat.append((name, wnid))
    for wnid in WNIDS:
        (root / "val" / wnid).rmdir()
    return flat


def write_shard_sets(root: str | os.PathLike, train_per_class: int = 10) -> dict[str, Path]:
    """One real-image data set (`write_photo_tree`) in every format we read: `folder`, `parquet` and `wds`
    (written by `python -m dynamixer.data.convert`, two or three images a tar shard) and `saved`
    (`DatasetDict.save_to_disk` of the same rows)."""
    import datasets

    from dynamixer.data.convert import as_dataset, convert
    from dynamixer.data.imagefolder import ImageFolderDataModule

    root = Path(root)
    sets = {"folder": write_photo_tree(root / "folder", train_per_class=train_per_class)}
    for to, shard_bytes in (("parquet", 20_000), ("wds", 4_000)):
        sets[to] = root / to
        convert(sets["folder"], sets[to], to, shard_bytes)
    classes, samples = ImageFolderDataModule(str(sets["folder"]), num_workers=0).listing()
    splits = {"train": as_dataset(samples["train"], classes, sets["folder"])}
    splits["validation"] = as_dataset(samples["val"], classes, sets["folder"])
    sets["saved"] = root / "saved"
    datasets.DatasetDict(splits).save_to_disk(str(sets["saved"]))
    return sets


def compose_train_config(
    overrides: Sequence[str] = (), output_dir: str | os.PathLike | None = None, with_hydra: bool = False
):
    """`conf/train.yaml` composed with `overrides`, outside a Hydra run (so `paths` are set explicitly);
    `with_hydra`: with its `hydra` node (launcher, sweeper)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=with_hydra)
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


def fetch_timm_model_tests(dest: Path) -> Path:
    """timm's own model tests (`tests/` of the installed timm version's source release, from the package
    index) extracted into `dest`; returns that `tests` folder. Skips the test when the index is unreachable,
    except in CI (`CI=true`), where the index is reachable by definition and a skip would hide the test."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", f"timm=={timm.__version__}", "--no-binary", ":all:"]
        + ["--no-deps", "--quiet", "--dest", str(dest)],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        reason = f"timm's test suite needs the package index (pip download timm=={timm.__version__}): {proc.stderr}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    (archive,) = dest.glob("timm-*.tar.gz")
    with tarfile.open(archive) as tar:
        # only the tests: the checkout's `timm/` folder would shadow the installed package
        tests = [m for m in tar.getmembers() if m.name.split("/")[1:2] == ["tests"]]
        tar.extractall(dest, members=tests, filter="data")
    return dest / archive.name.removesuffix(".tar.gz") / "tests"


def files_state(root: str | os.PathLike, skip: str | os.PathLike | None = None) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `root` (but those under `skip`) with its size, modification time and first bytes: what
    an attack that writes, truncates or creates files would change."""
    root, found = Path(root), {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not (skip is not None and path.is_relative_to(skip)):
            stat = path.stat()
            with open(path, "rb") as f:
                found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns, f.read(64))
    return found


def tiny_module():
    """A LightningModule of one linear layer on `(B, 4)` inputs and 2 classes: Lightning's loops, nothing else."""
    import lightning as L
    import torch
    import torch.nn as nn

    class TinyModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return TinyModule()


def cpu_trainer(root: str | os.PathLike, callbacks: Sequence[Any] = (), **kwargs: Any):
    """A quiet one-process CPU `Trainer` writing under `root` (no logger, no progress bar or summary)."""
    import lightning as L

    kwargs = {"max_epochs": 1, "logger": False, "enable_progress_bar": False, "enable_model_summary": False, **kwargs}
    return L.Trainer(accelerator="cpu", devices=1, default_root_dir=root, callbacks=list(callbacks), **kwargs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """`|a - b| / |b|` in Frobenius norms."""
    return ((a - b).norm() / b.norm()).item()


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Non-trivial weights (the default init gives near-uniform mixing matrices and zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_norm_weight = p.ndim == 1 and name.endswith("weight")
            p.copy_(1 + noise if is_norm_weight else noise)
    return model


EPOCH_END_MOMENTS = ("last_training_step", "last_validation_batch", "validation_end", "train_epoch_end")


def signal_at(moment: str, step: int = 0, signum: str = "SIGTERM"):
    """A test-only callback: `signum` from rank 0 to its own process (as a user's `kill` reaches rank 0) at one
    moment, made to happen there instead of in a window of time: `training_step` as optimizer step `step` starts,
    or one of `EPOCH_END_MOMENTS` of the first training epoch (after its last optimizer step, as its last
    validation batch starts, as its validation ends, as the epoch ends after the checkpoint callbacks)."""
    import signal as signals

    import lightning as L

    class SignalAt(L.Callback):
        sent = False

        def send(self, trainer) -> None:
            if not self.sent and not trainer.sanity_checking and trainer.global_rank == 0:
                self.sent = True
                os.kill(os.getpid(), getattr(signals, signum))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if moment == "training_step" and trainer.global_step + 1 == step:
                self.send(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if moment == "last_training_step" and batch_idx + 1 == trainer.num_training_batches:
                self.send(trainer)

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if moment == "last_validation_batch" and batch_idx + 1 == trainer.num_val_batches[dataloader_idx]:
                self.send(trainer)

        def on_validation_end(self, trainer, pl_module):
            if moment == "validation_end":
                self.send(trainer)

        def on_train_epoch_end(self, trainer, pl_module):
            if moment == "train_epoch_end":
                self.send(trainer)

    return SignalAt()


def scontrol_stand_in(folder: Path, script: str) -> dict[str, str]:
    """An `scontrol` of `script` (a shell script's body) in `folder`, and the environment of a SLURM job's rank 0
    that finds it first on PATH: a requeue's real command without a cluster."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scontrol").write_text(f"#!/bin/sh\n{script}\n")
    (folder / "scontrol").chmod(0o755)
    return {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "PATH": f"{folder}:{os.environ['PATH']}"}


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a run's `csv/metrics.csv`, in the order they were written ([] before it exists)."""
    import csv

    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def step_losses(run_dir: Path) -> dict[int, float]:
    """Step -> training loss, as the run logged them."""
    return {int(r["step"]): float(r["train/loss_step"]) for r in metrics_rows(run_dir) if r.get("train/loss_step")}


def logged_steps(run_dir: Path) -> list[int]:
    """The steps whose training loss metrics.csv holds, in the order they were written."""
    return [int(r["step"]) for r in metrics_rows(run_dir) if r.get("train/loss_step")]


def validated_steps(run_dir: Path) -> list[str]:
    """The steps at which the run logged a validation."""
    return [r["step"] for r in metrics_rows(run_dir) if r.get("val/loss")]
