"""Weights out: a training checkpoint as the folder timm and the Hugging Face Hub use."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from timm.models import save_for_hf

from dynamixer.run.checkpoints import load_model

log = logging.getLogger(__name__)

# the model arguments that define the architecture beyond the variant's name (training-only ones stay out)
ARCHITECTURE_ARGS = ("img_size", "segments", "reduced_dim", "fusion", "mixing")


def export(cfg: DictConfig) -> Path:
    """Write `cfg.out_dir/model.safetensors` and `config.json` (architecture, class count and names, model
    arguments, the data config: input size, mean, std, crop_pct, interpolation) with timm's own writer;
    `timm.create_model("local-dir:<out_dir>", pretrained=True)` rebuilds the model from them. With `cfg.onnx`,
    also `model.onnx`, checked against PyTorch with onnxruntime."""
    model, stored = load_model(cfg.ckpt_path, cfg.weights)
    info = stored.data_info
    model_args: dict[str, Any] = {k: stored.model[k] for k in ARCHITECTURE_ARGS if stored.model.get(k) is not None}
    model_args["num_classes"] = stored.num_classes
    out_dir = Path(cfg.out_dir)
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
    written = [out_dir / "model.safetensors", out_dir / "config.json"]
    if cfg.onnx:
        difference = export_onnx(model, out_dir / "model.onnx")
        written.append(out_dir / "model.onnx")
        log.info("model.onnx checked with onnxruntime: max abs difference %.2e from PyTorch", difference)
    log.info("exported the %s weights of %s to %s", cfg.weights, cfg.ckpt_path, out_dir)
    print("written: " + ", ".join(map(str, written)))
    return out_dir


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
