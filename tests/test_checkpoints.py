"""Opening a checkpoint never runs code from it: pickled objects and stored configs that would build
anything but our own classes are refused wherever a checkpoint is opened; formats and classes are checked."""

from __future__ import annotations

import pathlib
from pathlib import Path

import pytest
import torch

from dynamixer import load_release_checkpoint
from dynamixer.run import train
from helpers import compose_job_config, read_checkpoint, write_image_tree

QUIET = ["callbacks.progress_bar=null", "callbacks.model_summary=null", "debug=fast"]
IMAGENET = ["data=imagenet", "data.num_workers=0", "data.batch_size=2"]


class Marker:
    """Unpickling this creates the file `path` (a stand-in for any code a checkpoint could run)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (self.path,)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A real training checkpoint of dynamixer_tiny on a 3-class image tree, and that tree."""
    root = tmp_path_factory.mktemp("trained")
    tree = write_image_tree(root / "data")
    train(compose_job_config([*QUIET, *IMAGENET, f"data.data_dir={tree}"], root / "run"))
    return root / "run" / "checkpoints" / "last.ckpt", tree


def crafted(trained: tuple[Path, Path], tmp_path: Path, change) -> Path:
    checkpoint = read_checkpoint(trained[0])
    change(checkpoint)
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path


def with_pickled_object(trained, tmp_path: Path, marker: Path) -> Path:
    return crafted(trained, tmp_path, lambda c: c.__setitem__("extra", Marker(marker)))


def test_a_pickled_object_is_refused_by_test_predict_resume_and_pretrained_file(
    trained, tmp_path: Path, user_error
) -> None:
    marker = tmp_path / "pwned"
    evil = with_pickled_object(trained, tmp_path, marker)
    data = f"data.data_dir={trained[1]}"
    for script, args in (
        ("test.py", [f"ckpt_path={evil}", data, "hardware=cpu"]),
        ("predict.py", [f"ckpt_path={evil}", f"inputs={trained[1] / 'val'}"]),
        ("train.py", [*QUIET, *IMAGENET, data, f"ckpt_path={evil}"]),
        ("train.py", [*QUIET, *IMAGENET, data, f"model.pretrained_file={evil}"]),
    ):
        message = user_error(script, args, tmp_path)
        assert "refused to open" in message and "run code" in message, (script, message)
    assert not marker.exists()


def test_the_release_loader_refuses_a_pickled_object(tmp_path: Path) -> None:
    import timm

    marker = tmp_path / "pwned"
    model = timm.create_model("dynamixer_tiny")
    torch.save({"model": model.state_dict(), "extra": Marker(marker)}, tmp_path / "release.pth")
    with pytest.raises(ValueError, match="refused to open"):
        load_release_checkpoint(model, tmp_path / "release.pth")
    assert not marker.exists()


@pytest.mark.parametrize("section", ["data", "model", "module", "optimizer"])
def test_a_stored_config_that_would_build_anything_else_is_refused(
    section: str, trained, tmp_path: Path, user_error
) -> None:
    marker = tmp_path / "emptied"
    marker.write_text("precious")

    def inject(checkpoint):
        node = checkpoint["hyper_parameters"]["run_config"][section]
        node.clear()
        node.update({"_target_": "builtins.open", "_args_": [str(marker), "w"]})

    evil = crafted(trained, tmp_path, inject)
    for script, args in (
        ("test.py", [f"ckpt_path={evil}", "hardware=cpu"]),
        ("predict.py", [f"ckpt_path={evil}", f"inputs={trained[1] / 'val'}"]),
    ):
        message = user_error(script, args, tmp_path)
        assert f"{section}: 'builtins.open'" in message and "refused to build" in message, message
    assert marker.read_text() == "precious"


def test_a_checkpoint_without_our_format_version_gets_a_clear_error(trained, tmp_path: Path, user_error) -> None:
    old = crafted(trained, tmp_path, lambda c: c.pop("dynamixer_format"))
    message = user_error("test.py", [f"ckpt_path={old}", "hardware=cpu"], tmp_path)
    assert "no format version" in message and "format 1" in message
    newer = crafted(trained, tmp_path, lambda c: c.__setitem__("dynamixer_format", 99))
    assert "format 99" in user_error("test.py", [f"ckpt_path={newer}", "hardware=cpu"], tmp_path)


def test_test_py_refuses_data_whose_classes_are_not_the_checkpoints(trained, tmp_path: Path, user_error) -> None:
    """Same number of classes, other folder names: every label would mean another class."""
    renamed = write_image_tree(tmp_path / "renamed", ["a", "b", "c"])
    message = user_error("test.py", [f"ckpt_path={trained[0]}", f"data.data_dir={renamed}", "hardware=cpu"], tmp_path)
    assert "label 0: 'n01440764' vs 'a'" in message and "data.data_dir" in message
