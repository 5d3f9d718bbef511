"""Weights out: `export.py` writes timm's layout, and timm (and our fine-tuning) rebuild the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

import dynamixer  # noqa: F401  (registers the models with timm)
from dynamixer.models import create_model
from dynamixer.run import load_model, train
from helpers import QUIET_FAST, compose_job_config, compose_train_config, files_state

IMG = compose_train_config().model.img_size  # the default run's image size


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """A trained dynamixer_tiny with an ablation's architecture (segments=2), and its export folder."""
    from omegaconf import OmegaConf

    from dynamixer.run.export import export

    root = tmp_path_factory.mktemp("export")
    train(compose_job_config([*QUIET_FAST, "model.segments=2"], root / "run"))
    ckpt = root / "run" / "checkpoints" / "last.ckpt"
    export(OmegaConf.create({"ckpt_path": str(ckpt), "weights": "ema", "out_dir": str(root / "out"), "onnx": True}))
    return ckpt, root / "out"


def test_the_folder_holds_the_weights_and_everything_to_rebuild_and_feed_the_model(exported) -> None:
    _, folder = exported
    config = json.loads((folder / "config.json").read_text())
    assert (folder / "model.safetensors").is_file()
    assert config["architecture"] == "dynamixer_tiny" and config["num_classes"] == 10
    assert config["label_names"] == [str(d) for d in range(10)]
    assert config["model_args"]["segments"] == 2 and config["model_args"]["img_size"] == [IMG, IMG]
    cfg = config["pretrained_cfg"]
    assert (cfg["input_size"], cfg["crop_pct"], cfg["mean"], cfg["std"]) == ([3, IMG, IMG], 1.0, [0.5] * 3, [0.5] * 3)
    assert cfg["fixed_input_size"] is True


def test_the_model_card_states_the_model_the_runs_own_results_and_how_to_load_it(exported) -> None:
    from dynamixer.utils.complexity import count_gmacs, count_params

    ckpt, folder = exported
    card = (folder / "README.md").read_text()
    model, stored = load_model(str(ckpt), "ema")
    assert card.startswith("---\nlibrary_name: timm\n")
    assert f"| parameters | {count_params(model):,} |" in card
    assert f"| GMACs | {count_gmacs(model, (3, IMG, IMG)):.3f} at {IMG}x{IMG} |" in card
    assert f"| trained | {stored.global_step} optimizer steps, to epoch {stored.epoch} (from 0) |" in card
    last = stored.metrics[-1]  # the run's own last validation, as its checkpoint recorded it
    assert f"| {last['epoch']} | {last['step']} | " in card and f"{last['val/acc1']:.4f}" in card
    assert f'timm.create_model("local-dir:{folder.name}", pretrained=True)' in card
    assert "arXiv 2201.12083" in card and "wang2022dynamixer" in card


def test_timm_local_dir_gives_the_checkpoints_logits(exported) -> None:
    ckpt, folder = exported
    ours, _ = load_model(str(ckpt), "ema")
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    images = torch.randn(4, 3, IMG, IMG)
    with torch.no_grad():
        assert torch.equal(theirs(images), ours(images))
    fine_tuned_start = create_model("dynamixer_tiny", pretrained_file=str(folder), segments=2, img_size=IMG).eval()
    with torch.no_grad():
        assert torch.equal(fine_tuned_start(images), ours(images))


def test_the_onnx_file_gives_the_checkpoints_logits_for_any_batch_size(exported) -> None:
    import onnxruntime

    ckpt, folder = exported
    ours, _ = load_model(str(ckpt), "ema")
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    for batch in (1, 5):
        images = torch.randn(batch, 3, IMG, IMG)
        (logits,) = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            assert abs(torch.from_numpy(logits) - ours(images)).max() < 1e-4


def test_an_export_never_replaces_another_nor_writes_through_a_link(exported, tmp_path: Path, user_error) -> None:
    ckpt, folder = exported
    before = files_state(folder)
    message = user_error("export.py", [f"ckpt_path={ckpt}", f"out_dir={folder}", "onnx=false"], tmp_path)
    assert "never replaces another" in message
    assert files_state(folder) == before

    outside = tmp_path / "outside.json"
    outside.write_text("someone's file")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "config.json").symlink_to(outside)
    user_error("export.py", [f"ckpt_path={ckpt}", f"out_dir={linked}", "onnx=false"], tmp_path)
    (tmp_path / "to_empty").symlink_to(tmp_path / "empty", target_is_directory=True)
    (tmp_path / "empty").mkdir()
    user_error("export.py", [f"ckpt_path={ckpt}", f"out_dir={tmp_path / 'to_empty'}", "onnx=false"], tmp_path)
    assert outside.read_text() == "someone's file" and not any((tmp_path / "empty").iterdir())
