"""Opening a checkpoint never runs code from it, reaches the network or writes a file: pickled objects are
refused wherever a checkpoint is opened, and a stored config is plain data read through our own conf
options (crafted ones are refused, sections never built are never read); formats and classes are checked."""

from __future__ import annotations

import pathlib
from pathlib import Path

import pytest
import torch

from dynamixer import load_release_checkpoint
from dynamixer.run import train
from helpers import IMAGENET, QUIET_FAST, compose_job_config, files_state, read_checkpoint, write_image_tree


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
    train(compose_job_config([*QUIET_FAST, *IMAGENET, f"data.data_dir={tree}"], root / "run"))
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
        ("train.py", [*QUIET_FAST, *IMAGENET, data, f"ckpt_path={evil}"]),
        ("train.py", [*QUIET_FAST, *IMAGENET, data, f"model.pretrained_file={evil}"]),
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


def open_for_writing(path: Path) -> dict:
    """A config node that Hydra would build into `open(path, "w")`: it truncates the file."""
    return {"_target_": "builtins.open", "_args_": [str(path), "w"]}


# crafted run configs that test.py, predict.py and export.py must refuse: (marker, listener url) -> change
REFUSED = {
    "data_target": lambda m, url: {"data": open_for_writing(m)},
    "model_target": lambda m, url: {"model": open_for_writing(m)},
    # interpolations would be resolved before a check of the stored names could see them
    "interpolation_into_an_unchecked_key": lambda m, url: {
        "model.img_size": "${zz.p}",
        "zz": {"p": open_for_writing(m)},
    },
    "resolver_oc_create": lambda m, url: {
        "model.segments": f"${{oc.create:{{_target_: builtins.open, _args_: [{m}, w]}}}}",
    },
    "nested_target": lambda m, url: {"data.train_aug": open_for_writing(m)},
    # timm would download weights from the file's url, with a secret of the environment in it
    "pretrained_url_with_a_secret": lambda m, url: {
        "model.pretrained": True,
        "model.pretrained_cfg_overlay": {"url": f"{url}/${{oc.env:DYNAMIXER_TEST_SECRET}}"},
    },
    "pretrained_url": lambda m, url: {"model.pretrained": True, "model.pretrained_cfg_overlay": {"url": f"{url}/w"}},
    "another_kind_of_value": lambda m, url: {"model.img_size": [open_for_writing(m)]},
}
# hostile values in what test/predict/export never build or never take from a file: they work as usual
IGNORED = lambda m, url: {  # noqa: E731
    **{section: open_for_writing(m) for section in ("module", "optimizer", "scheduler", "callbacks", "logger")},
    "trainer": {**open_for_writing(m), "plugins": [open_for_writing(m)]},
    "model.pretrained_file": f"{url}/weights.pth",
}


def craft_config(trained, tmp_path: Path, changes: dict) -> Path:
    def change(checkpoint):
        run_config = checkpoint["hyper_parameters"]["run_config"]
        for key, value in changes.items():
            *parents, last = key.split(".")
            node = run_config
            for parent in parents:
                node = node[parent]
            node[last] = value

    return crafted(trained, tmp_path, change)


def commands(evil: Path, trained) -> list[tuple[str, list[str]]]:
    out = evil.parent / "exported"
    return [
        ("test.py", [f"ckpt_path={evil}", "hardware=cpu", f"data.data_dir={trained[1]}"]),
        ("predict.py", [f"ckpt_path={evil}", f"inputs={trained[1] / 'val'}"]),
        ("export.py", [f"ckpt_path={evil}", f"out_dir={out}", "onnx=false"]),
    ]


@pytest.mark.parametrize("attack", sorted(REFUSED))
def test_a_crafted_stored_config_runs_nothing_reaches_nothing_and_is_refused(
    attack: str, trained, tmp_path: Path, user_error, connections, monkeypatch
) -> None:
    monkeypatch.setenv("DYNAMIXER_TEST_SECRET", "api-token-123")
    marker = tmp_path / "precious.txt"
    marker.write_text("precious")
    evil = craft_config(trained, tmp_path, REFUSED[attack](marker, connections.url))
    before = files_state(tmp_path, skip=tmp_path / "logs")
    for script, args in commands(evil, trained):
        message = user_error(script, args, tmp_path)
        assert "refused to use the run config stored in" in message, (script, message)
        assert "api-token-123" not in message
    assert files_state(tmp_path, skip=tmp_path / "logs") == before  # nothing written, truncated or created
    assert connections.connections == 0


def test_what_is_never_built_from_a_checkpoint_cannot_stop_it_being_used(
    trained, tmp_path: Path, entry, connections
) -> None:
    """Sections test/predict/export do not build (the optimizer a new conf/optimizer/*.yaml adds, the
    module, callbacks, loggers) are never built from a file, whatever they name; `pretrained_file` is never
    taken from one (the checkpoint's own weights are loaded)."""
    marker = tmp_path / "precious.txt"
    marker.write_text("precious")
    evil = craft_config(trained, tmp_path, IGNORED(marker, connections.url))
    for script, args in commands(evil, trained):
        code, out, err = entry(script, args, tmp_path)
        assert code == 0, (script, err[-3000:])
    assert (evil.parent / "exported" / "model.safetensors").is_file()
    assert marker.read_text() == "precious" and connections.connections == 0


def test_a_checkpoint_cannot_choose_the_fused_kernel(trained, tmp_path: Path) -> None:
    """Test/predict/export compute a checkpoint with the PyTorch ops whatever its config says: the Triton kernel
    needs Triton and a GPU, which is the command's choice (and untested code is not a file's to pick)."""
    from dynamixer.models.dynamixer import DynaMixerOp
    from dynamixer.run.checkpoints import load_model

    evil = craft_config(trained, tmp_path, {"model.fused_mix": True})
    model, stored = load_model(str(evil))
    assert "fused_mix" not in stored.model and stored.model["model_name"] == "dynamixer_tiny"
    mixes = [m for m in model.modules() if isinstance(m, DynaMixerOp)]
    assert mixes and not any(m.fused for m in mixes)


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


def test_where_data_is_read_and_files_are_written_never_comes_from_a_checkpoint(trained, tmp_path: Path, entry) -> None:
    """A stored data_dir with other classes, an index file and a corrupt-file log outside: test.py reads the
    command's data, writes only into its own run folder, and leaves the training run's folder as it was."""
    outside = tmp_path / "outside"
    write_image_tree(outside / "ds", classes=("a", "b", "c"))
    evil = craft_config(
        trained,
        tmp_path,
        {
            "data.data_dir": str(outside / "ds"),
            "data.index_file": str(outside / ".planted" / "index.json.gz"),
            "data.corrupt_log": str(outside / "log.txt"),
            "data.skip_corrupt": True,
        },
    )
    training_run = trained[0].parent.parent
    before, run_before = files_state(outside), files_state(training_run)
    code, _, err = entry("test.py", [f"ckpt_path={evil}", "hardware=cpu", f"data.data_dir={trained[1]}"], tmp_path)
    assert code == 0, err
    assert files_state(outside) == before and not (outside / ".planted").exists()
    assert files_state(training_run) == run_before
    (own,) = (tmp_path / "logs" / "test" / "runs").iterdir()
    assert (own / "data_index.json.gz").is_file() and (own / "eval.json").is_file()
