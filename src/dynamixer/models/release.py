"""Checkpoints and constructor arguments of the authors' release, loaded into our model.

The key mapping itself lives with the model (`checkpoint_filter_fn`, `release_key_map`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from dynamixer.errors import CheckpointError

from .dynamixer import checkpoint_filter_fn, release_key_map, stage_resolutions
from .weights import read_weights

__all__ = ["load_release_checkpoint", "model_kwargs_from_release"]


def load_release_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any]) -> nn.Module:
    """Load a checkpoint of the authors' release (a path or a state dict) into `model`, strictly.

    Raises `ValueError` naming the missing, unexpected and mis-shaped keys when the checkpoint does not
    belong to this model's variant (layers, widths, segments, reduced dims, image size or classes).
    """
    if not isinstance(checkpoint, Mapping):
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"release checkpoint {os.fspath(checkpoint)!r} does not exist")
        checkpoint = read_weights(checkpoint)  # as data only: refuses files that would run code
    state_dict = checkpoint_filter_fn(checkpoint, model)
    expected = model.state_dict()
    release_name = release_key_map(model)
    missing = [release_name[k] for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f"{release_name[k]}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mis_shaped:
        lines = [f"the checkpoint does not fit this {type(model).__name__} (release key names shown):"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + "; ".join(keys[:5]) + (" ..." if len(keys) > 5 else ""))
        lines.append("Build the model with the variant, image size and num_classes the checkpoint was trained with.")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)
    return model


def model_kwargs_from_release(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our `DynaMixer` keyword arguments for the release's constructor arguments.

    The release's hard-coded `resolutions` are checked against the ones we derive from the image size.
    """
    kwargs = {
        "img_size": config.get("img_size", 224),
        "patch_size": config.get("patch_size", 7),
        "num_classes": config.get("num_classes", 1000),
        "layers": list(config["layers"]),
        "embed_dims": list(config["embed_dims"]),
        "transitions": list(config["transitions"]),
        "segments": list(config["num_heads"]),
        "reduced_dim": list(config.get("reduced_dims", [2] * len(config["layers"]))),
        "mlp_ratio": list(config.get("mlp_ratios", [3] * len(config["layers"]))),
    }
    if "resolutions" in config:
        derived = [r[0] for r in stage_resolutions(kwargs["img_size"], kwargs["patch_size"], kwargs["transitions"])]
        if derived != list(config["resolutions"]):
            raise CheckpointError(
                f"the release's resolutions {list(config['resolutions'])} disagree with {derived}, derived from "
                f"img_size={kwargs['img_size']}, patch_size={kwargs['patch_size']} and the transitions"
            )
    return kwargs
