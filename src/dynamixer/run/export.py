"""Weights out: a training checkpoint as the folder timm and the Hugging Face Hub use."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from timm.models import save_for_hf

from dynamixer.run.checkpoints import load_model

log = logging.getLogger(__name__)

# the model arguments that define the architecture beyond the variant's name (training-only ones stay out)
ARCHITECTURE_ARGS = ("img_size", "segments", "reduced_dim", "fusion")


def export(cfg: DictConfig) -> Path:
    """Write `cfg.out_dir/model.safetensors` and `config.json` (architecture, class count and names, model
    arguments, the data config: input size, mean, std, crop_pct, interpolation) with timm's own writer;
    `timm.create_model("local-dir:<out_dir>", pretrained=True)` rebuilds the model from them."""
    model, hparams = load_model(cfg.ckpt_path, cfg.weights)
    info, model_cfg = hparams["data_info"], hparams["run_config"]["model"]
    model_args: dict[str, Any] = {k: model_cfg[k] for k in ARCHITECTURE_ARGS if model_cfg.get(k) is not None}
    model_args["num_classes"] = hparams["num_classes"]
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
    log.info("exported the %s weights of %s to %s", cfg.weights, cfg.ckpt_path, out_dir)
    print(f"written: {out_dir / 'model.safetensors'}, {out_dir / 'config.json'}")
    return out_dir
