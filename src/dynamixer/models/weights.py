"""Initialising a model from weight files: our training checkpoints (raw or EMA weights), the authors'
release, an exported `model.safetensors`, or an exported folder (`model.safetensors` + `config.json`).

Files are read as data only (`weights_only=True`, safetensors). As timm's `load_pretrained` does, a head
for another class count is left freshly initialised; weights built for another image size or another
variant are refused, naming the difference.
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn
from safetensors.torch import load_file

from dynamixer.errors import CheckpointError, MissingPathError
from dynamixer.schema import Init, Speed

from .dynamixer import DynaMixer, checkpoint_filter_fn

__all__ = [
    "create_model",
    "differences",
    "listed",
    "load_pretrained_file",
    "read_file",
    "read_weights",
    "training_weights",
]


def _line(err: BaseException, index: int) -> str:
    """One line of an error's message (its type where it has none), for a message of ours."""
    return (str(err).splitlines() or [type(err).__name__])[index].strip()[:200]


def read_file(path: str | os.PathLike, mmap: bool = False) -> Any:
    """The content of a PyTorch file (`torch.save`), on the CPU, read as data only: the one reader of weight and
    checkpoint files. A file holding Python objects beyond tensors and plain values (which unpickling would
    run as code) is refused; a truncated or foreign file is one clear error."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # the release's training arguments
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to open {path}: it holds Python objects beyond tensors and plain values, and opening "
            f"it would run code from the file ({_line(err, -1)}). Use checkpoints written "
            "by dynamixer's train.py, or load this one only if you trust where it came from."
        ) from None
    except (RuntimeError, EOFError, ValueError) as err:  # torch's readers: a cut zip, another format
        raise CheckpointError(
            f"{path} cannot be read ({_line(err, 0)}): it is truncated (a kill or a full disk "
            "during a write or copy) or not a PyTorch file. Copy it again, or use the run's last.prev.ckpt"
        ) from None


def read_weights(path: str | os.PathLike, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The backbone state dict in `path` (a file or an exported folder); for our training checkpoints the
    EMA (`weights="ema"`) or raw (`"raw"`) weights."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise MissingPathError(
            f"model.pretrained_file={path} does not exist: give a .ckpt, .pth or .safetensors "
            "file, or a folder written by export.py"
        )
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as err:  # safetensors' own error types: a cut or foreign file
            raise CheckpointError(f"{path} cannot be read as safetensors ({err}): copy it again") from None
    checkpoint = read_file(path)
    state = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    if any(k.startswith(("model.", "ema.module.")) for k in state):  # one of our training checkpoints
        return training_weights(state, weights, path, option="model.pretrained_weights")
    return checkpoint


def training_weights(
    state_dict: dict[str, torch.Tensor], weights: str, path: str | os.PathLike, option: str
) -> dict[str, torch.Tensor]:
    """The backbone in the state dict of one of our training checkpoints: its raw (`model.`) or EMA
    (`ema.module.`) weights; `option` is the setting that chose `weights`, named in the errors."""
    if weights not in ("ema", "raw"):
        raise CheckpointError(f"{option}={weights} is not known: use {option}=ema or {option}=raw")
    prefix = "ema.module." if weights == "ema" else "model."
    found = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not found:
        raise CheckpointError(f"{path} has no EMA weights (trained with module.ema_decay=null): use {option}=raw")
    return found


def differences(
    state: dict[str, Any], expected: dict[str, Any], optional: Iterable[str] = ()
) -> tuple[list[str], list[str], list[str]]:
    """The keys of weights `state` of another shape than in `expected` (a model's state dict), those of
    `expected` it lacks (but `optional` ones), and those `expected` has not."""
    mis_shaped = [k for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    missing = [k for k in expected if k not in state and k not in set(optional)]
    return mis_shaped, missing, [k for k in state if k not in expected]


def listed(mis_shaped: list[str], missing: list[str], unexpected: list[str]) -> str:
    """`differences` in a message: counts and the first keys of each."""
    return (
        f"{len(mis_shaped)} of another shape (e.g. {mis_shaped[:2]}), {len(missing)} missing (e.g. {missing[:2]}), "
        f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
    )


def load_pretrained_file(model: DynaMixer, path: str | os.PathLike, weights: str = "ema") -> list[str]:
    """Load the weights in `path` into `model`; returns the keys left as initialised (a head for another
    class count). Raises `CheckpointError` naming what does not fit."""
    state = checkpoint_filter_fn(read_weights(path, weights), model)
    expected = model.state_dict()
    head = [k for k in expected if k.startswith("head.")]
    if any(k in state and state[k].shape != expected[k].shape for k in head):
        state = {k: v for k, v in state.items() if not k.startswith("head.")}  # another class count
    mis_shaped, missing, unexpected = differences(state, expected, optional=head)
    if any(".generate." in k for k in mis_shaped):
        raise CheckpointError(
            f"the weights in {path} were built for another image size than this model's "
            f"{model.img_size[0]}x{model.img_size[1]} (their token-mixing layers are sized by it): "
            "set model.img_size to the size they were trained at"
        )
    if mis_shaped or missing or unexpected:
        raise CheckpointError(
            f"the weights in {path} are not this model's: {listed(mis_shaped, missing, unexpected)}. Use the "
            "model (variant, segments, reduced_dim) the weights were trained with"
        )
    model.load_state_dict(state, strict=False)
    return [k for k in expected if k not in state]


def create_model(
    model_name: str,
    pretrained_file: Init[str | None] = None,
    pretrained_weights: Init[str] = "ema",
    grad_checkpointing: Speed[bool] = False,
    fused_mix: Speed[bool] = False,
    **kwargs: Any,
) -> nn.Module:
    """`timm.create_model(model_name, **kwargs)` of a DynaMixer variant, initialised from `pretrained_file` when
    given (see `load_pretrained_file`); what the model configs build."""
    model = timm.create_model(model_name, grad_checkpointing=grad_checkpointing, fused_mix=fused_mix, **kwargs)
    if pretrained_file is not None:
        load_pretrained_file(model, pretrained_file, pretrained_weights)
    return model


create_model.passes_kwargs_to = DynaMixer  # the settings the model configs give (dynamixer.schema)
