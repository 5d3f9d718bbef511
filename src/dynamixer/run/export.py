"""Weights out: a training checkpoint as the folder timm and the Hugging Face Hub use."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from timm.models import save_for_hf

from dynamixer.errors import ConfigError
from dynamixer.run.checkpoints import load_model

log = logging.getLogger(__name__)

# the model arguments that define the architecture beyond the variant's name (training-only ones stay out)
ARCHITECTURE_ARGS = ("img_size", "segments", "reduced_dim", "fusion", "mixing")


def export(cfg: DictConfig) -> Path:
    """Write `cfg.out_dir/model.safetensors` and `config.json` (architecture, class count and names, model
    arguments, the data config: input size, mean, std, crop_pct, interpolation) with timm's own writer;
    `timm.create_model("local-dir:<out_dir>", pretrained=True)` rebuilds the model from them. With `cfg.onnx`,
    also `model.onnx`, checked against PyTorch with onnxruntime. `out_dir` is new: an export never replaces
    another (nor writes through a link): it is written into a fresh folder beside it and renamed into place."""
    out_dir = Path(cfg.out_dir).expanduser().absolute()
    if out_dir.is_symlink() or (out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))):
        raise ConfigError(
            f"out_dir={out_dir} exists and is not an empty folder: an export never replaces another. Give a new "
            "out_dir, or remove that one first"
        )
    model, stored = load_model(cfg.ckpt_path, cfg.weights)
    model_args: dict[str, Any] = {k: stored.model[k] for k in ARCHITECTURE_ARGS if stored.model.get(k) is not None}
    model_args["num_classes"] = stored.num_classes
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))  # new, ours alone
    fresh.chmod(out_dir.parent.stat().st_mode & 0o777)  # as readable as the folder it goes into
    try:
        _write(model, stored, model_args, fresh, cfg.onnx)
        os.rename(fresh, out_dir)  # onto an empty folder or none; fails if one appeared meanwhile
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    written = [out_dir / "model.safetensors", out_dir / "config.json"] + ([out_dir / "model.onnx"] if cfg.onnx else [])
    log.info("exported the %s weights of %s to %s", cfg.weights, cfg.ckpt_path, out_dir)
    print("written: " + ", ".join(map(str, written)))
    return out_dir


def _write(model: torch.nn.Module, stored: Any, model_args: dict[str, Any], out_dir: Path, onnx: bool) -> None:
    info = stored.data_info
    save_for_hf(
        model,
        str(out_dir),
        model_config={"label_names": list(info["class_names"])},
        model_args=model_args,
        safe_serialization=True,
        data_config={
            "input_size": (3, info["img_size"], info["img_size"]),
            "crop_pct": info["crop_pct"],
            "interpolation": info["interpolation"],
            "mean": tuple(info["mean"]),
            "std": tuple(info["std"]),
        },
    )
    if onnx:
        difference = export_onnx(model, out_dir / "model.onnx")
        log.info("model.onnx checked with onnxruntime: max abs difference %.2e from PyTorch", difference)


def export_onnx(model: torch.nn.Module, path: Path, tolerance: float = 1e-4) -> float:
    """`model` as ONNX (torch's dynamo exporter; input `images` `(B, 3, H, W)` with any batch size, output
    `logits`), checked with onnxruntime on a random batch: returns the max abs difference from PyTorch."""
    import onnxruntime

    example = torch.randn(2, 3, *model.img_size)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    images = torch.randn(3, 3, *model.img_size)
    with torch.no_grad():
        expected = model(images).numpy()
    got = onnxruntime.InferenceSession(str(path)).run(None, {"images": images.numpy()})[0]
    difference = float(abs(got - expected).max())
    if difference > tolerance:
        raise RuntimeError(f"{path}: onnxruntime's logits differ from PyTorch's by {difference:.2e} (> {tolerance})")
    return difference
