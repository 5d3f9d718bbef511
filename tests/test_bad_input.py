"""Every bad input a user can give to train.py, and the clear error it gets (one test each).

Each case composes the config as `python train.py <overrides>` would and runs `dynamixer.run.train`
in-process; the error must come before any training step and name the value and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from PIL import Image

from conftest import compose_job_config
from dynamixer.data import DataError
from dynamixer.run import train

QUIET = ["callbacks.progress_bar=null", "callbacks.model_summary=null", "logger=csv", "debug=fast"]


def run_train(tmp_path: Path, *overrides: str) -> dict:
    return train(compose_job_config([*QUIET, *overrides], tmp_path / "run"))


def image_tree(root: Path, splits: dict[str, list[str]], per_class: int = 2) -> Path:
    for split, classes in splits.items():
        for wnid in classes:
            (root / split / wnid).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (40, 36), (40 * i, 90, 200)).save(root / split / wnid / f"{i}.JPEG")
    return root


def tiny_checkpoint(tmp_path: Path) -> Path:
    """A real training checkpoint of the default dynamixer_tiny (10 classes)."""
    run_train(tmp_path / "ckpt", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1")
    return tmp_path / "ckpt" / "run" / "checkpoints" / "last.ckpt"


def corrupt_tree(tmp_path: Path) -> Path:
    root = image_tree(tmp_path / "data", {"train": ["n01", "n02"], "val": ["n01", "n02"]}, per_class=4)
    bad = root / "train" / "n02" / "0.JPEG"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 3])
    return root


IMAGENET = ["data=imagenet", "data.num_workers=0", "data.batch_size=2"]

# (name, overrides given the tmp path, expected error, fragments the message must hold)
CASES: list[tuple[str, Callable[[Path], list[str]], type[BaseException], list[str]]] = [
    ("missing data folder", lambda t: [*IMAGENET, f"data.data_dir={t / 'nowhere'}"], DataError,
     ["nowhere", "does not exist"]),
    ("empty data folder", lambda t: [*IMAGENET, f"data.data_dir={(t / 'empty').mkdir() or t / 'empty'}"], DataError,
     ["train"]),
    ("train/val classes differ",
     lambda t: [*IMAGENET, f"data.data_dir={image_tree(t / 'd', {'train': ['n01', 'n02'], 'val': ['n01', 'n03']})}"],
     DataError, ["n02", "n03"]),
    ("corrupt JPEG", lambda t: [*IMAGENET, f"data.data_dir={corrupt_tree(t)}"], DataError,
     ["0.JPEG", "skip_corrupt"]),
    ("unknown group option", lambda t: ["model=dynamixer_xxl"], ConfigCompositionException,
     ["dynamixer_xxl", "dynamixer_tiny"]),
    ("unknown key", lambda t: ["trainer.max_epoch=3"], ConfigCompositionException, ["max_epoch"]),
    ("ckpt_path that does not exist", lambda t: [f"ckpt_path={t / 'gone.ckpt'}"], FileNotFoundError,
     ["gone.ckpt", "ckpt_path=auto"]),
    ("checkpoint of another variant", lambda t: [f"ckpt_path={tiny_checkpoint(t)}", "model.segments=2"], ValueError,
     ["does not fit", "'segments': [4, 8, 8, 8]", "'segments': 2", "10 classes"]),
    ("checkpoint of another class count",
     lambda t: [f"ckpt_path={tiny_checkpoint(t)}", *IMAGENET,
                f"data.data_dir={image_tree(t / 'three', {'train': ['a', 'b', 'c'], 'val': ['a', 'b', 'c']})}"],
     ValueError, ["does not fit", "with 10 classes", "with 3 classes"]),
    ("segments that do not divide a width", lambda t: ["model.segments=6"], ValueError,
     ["segments=6", "not divisible", "one of"]),
    ("reduced_dim that is not positive", lambda t: ["model.reduced_dim=0"], ValueError,
     ["reduced_dim", "positive integer"]),
    ("per-stage list of the wrong length", lambda t: ["model.segments=[4,8]"], ValueError,
     ["4 stages"]),
    ("image size the model is not built for", lambda t: ["data.img_size=64"], ValueError,
     ["data.img_size=64", "32x32", "model.img_size"]),
    ("image size the patch cannot divide", lambda t: ["model.img_size=30"], ValueError,
     ["img_size=(30, 30)", "patch_size=4"]),
    ("GPUs this machine does not have", lambda t: ["trainer.devices=8"], RuntimeError,
     ["8 GPU(s)", "hardware=cpu"]),
]


@pytest.mark.parametrize("name,overrides,error,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error(name, overrides, error, fragments, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    args = overrides(tmp_path)
    with pytest.raises(error) as err:
        run_train(tmp_path, *args)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{name}: {fragment!r} not in {message!r}"
    assert not (tmp_path / "run" / "results.json").exists()  # failed before it trained


def test_corrupt_jpeg_is_skipped_and_counted_when_asked(tmp_path: Path) -> None:
    results = run_train(tmp_path, *IMAGENET, f"data.data_dir={corrupt_tree(tmp_path)}", "data.skip_corrupt=true",
                        "trainer.limit_train_batches=4")
    assert results["status"] == "finished"
    assert results["data"]["corrupt_files"] == [str(tmp_path / "data" / "train" / "n02" / "0.JPEG")]
