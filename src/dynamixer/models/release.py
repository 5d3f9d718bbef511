"""Checkpoints and constructor arguments of the authors' release, mapped onto our model.

The release keeps stages and downsampling convs in one flat list (`network.<k>...`), names the token
mixer `attn` and the stem `patch_embed.proj`; we use `stages.<i>.blocks.<j>.token_mixer`,
`stages.<i>.downsample` and `stem`. The tensors themselves are identical.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

__all__ = ["checkpoint_filter_fn", "load_release_checkpoint", "model_kwargs_from_release", "release_key_map"]


def release_key_map(model: nn.Module) -> dict[str, str]:
    """Our state-dict key -> the release's key, for every tensor of `model` (a `DynaMixer`)."""
    prefixes = {"stem.": "patch_embed.proj.", "norm.": "norm.", "head.": "head."}
    k = 0
    for i, stage in enumerate(model.stages):
        if stage.downsample is not None:
            prefixes[f"stages.{i}.downsample."] = f"network.{k}.proj."
            k += 1
        for j in range(len(stage.blocks)):
            ours = f"stages.{i}.blocks.{j}."
            prefixes[ours + "token_mixer."] = f"network.{k}.{j}.attn."
            for part in ("norm1.", "norm2.", "mlp."):
                prefixes[ours + part] = f"network.{k}.{j}.{part}"
        k += 1
    mapping = {}
    for key in model.state_dict():
        prefix = max((p for p in prefixes if key.startswith(p)), key=len)
        mapping[key] = prefixes[prefix] + key[len(prefix):]
    return mapping


def _unwrap(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The bare state dict of a release or timm training checkpoint (`model`, `state_dict_ema`, ...)."""
    for name in ("state_dict_ema", "model_ema", "model", "state_dict"):
        if name in checkpoint and isinstance(checkpoint[name], Mapping):
            checkpoint = checkpoint[name]
            break
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in checkpoint.items()}


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, torch.Tensor]:
    """A release (or our own) state dict renamed to `model`'s keys; used by timm's `pretrained` loading."""
    state_dict = _unwrap(state_dict)
    if "patch_embed.proj.weight" not in state_dict:
        return state_dict  # already in our names
    ours_of = {release: ours for ours, release in release_key_map(model).items()}
    return {ours_of.get(k, k): v for k, v in state_dict.items()}


def load_release_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any]) -> nn.Module:
    """Load a checkpoint of the authors' release (a path or a state dict) into `model`, strictly.

    Raises `ValueError` naming the missing, unexpected and mis-shaped keys when the checkpoint does not
    belong to this model's variant (layers, widths, segments, reduced dims, image size or classes).
    """
    if not isinstance(checkpoint, Mapping):
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"release checkpoint {os.fspath(checkpoint)!r} does not exist")
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
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
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)
    return model


def model_kwargs_from_release(config: Mapping[str, Any]) -> dict[str, Any]:
    """Our `DynaMixer` keyword arguments for the release's constructor arguments.

    The release's hard-coded `resolutions` are checked against the ones we derive from the image size.
    """
    from .dynamixer import stage_resolutions

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
            raise ValueError(
                f"the release's resolutions {list(config['resolutions'])} disagree with {derived}, derived from "
                f"img_size={kwargs['img_size']}, patch_size={kwargs['patch_size']} and the transitions"
            )
    return kwargs
