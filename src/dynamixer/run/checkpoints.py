"""Our training checkpoints: finding the one to resume, checking that it fits, loading its weights."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from dynamixer.checkpoint_io import previous_path, remove_stale_temporaries
from dynamixer.errors import CheckpointError, MissingPathError

log = logging.getLogger(__name__)


def read_checkpoint(ckpt_path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """The content of a checkpoint file, on the CPU."""
    return torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=mmap)


def _readable(path: Path) -> bool:
    try:
        read_checkpoint(path, mmap=True)
        return True
    except Exception as err:  # truncated, torn or not a checkpoint at all: any reason means "not this one"
        log.warning("cannot read checkpoint %s (%s: %s); trying the previous one", path, type(err).__name__, err)
        return False


def resume_path(cfg: DictConfig) -> str | None:
    """`ckpt_path`: a checkpoint file, or `auto` for this run folder's newest readable resumable state:
    `last.ckpt`, else the `last.prev.ckpt` it replaced (with a warning naming the unreadable file)."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return None
    if ckpt_path == "auto":
        folder = Path(cfg.paths.output_dir) / "checkpoints"
        remove_stale_temporaries(folder)
        candidates = [p for p in (folder / "last.ckpt", previous_path(folder / "last.ckpt")) if p.is_file()]
        found = next((p for p in candidates if _readable(p)), None)
        if candidates and found is None:
            raise CheckpointError(
                f"no readable checkpoint to resume in {folder} ({', '.join(p.name for p in candidates)} cannot be "
                "read): move them away to start the run over, or give ckpt_path=<file> of another checkpoint"
            )
        return None if found is None else str(found)
    if not os.path.isfile(ckpt_path):
        raise MissingPathError(
            f"ckpt_path={ckpt_path} does not exist: give the path of a .ckpt file (e.g. <run folder>/checkpoints/"
            "last.ckpt), or ckpt_path=auto to resume this run folder's last checkpoint when there is one"
        )
    return ckpt_path


def _describe(model_cfg: Any, num_classes: Any) -> str:
    """The model config's architecture keys that are set (unset ones are the variant's own)."""
    keys = ("model_name", "img_size", "segments", "reduced_dim", "fusion")
    return f"{ {k: model_cfg.get(k) for k in keys if model_cfg.get(k) is not None} } with {num_classes} classes"


def check_checkpoint_fits(ckpt_path: str, model: torch.nn.Module, cfg: DictConfig, num_classes: int) -> None:
    """Fail early, naming both models, when a checkpoint's weights do not fit this run's backbone."""
    checkpoint = read_checkpoint(ckpt_path, mmap=True)
    saved = {k[len("model.") :]: v.shape for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("model.")}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    differ = [
        f"{k}: checkpoint {tuple(saved[k])} vs model {tuple(v)}"
        for k, v in expected.items()
        if k in saved and saved[k] != v
    ]
    differ += [f"{k}: not in the checkpoint" for k in expected if k not in saved]
    differ += [f"{k}: not in the model" for k in saved if k not in expected]
    if differ:
        hparams = checkpoint.get("hyper_parameters", {})
        stored = (hparams.get("run_config") or {}).get("model", {})
        raise CheckpointError(
            f"checkpoint {ckpt_path} does not fit this run's model ({len(differ)} tensors differ, e.g. {differ[0]}).\n"
            f"  checkpoint: {_describe(stored, hparams.get('num_classes'))}\n"
            f"  this run:   {_describe(cfg.model, num_classes)}\n"
            "Resume with the model and data the checkpoint was trained with, or start without ckpt_path."
        )


def load_checkpoint(ckpt_path: str) -> dict[str, Any]:
    """A training checkpoint written by train.py (it holds the run's config in its hyper-parameters)."""
    if not ckpt_path or not os.path.isfile(ckpt_path):
        raise MissingPathError(f"ckpt_path={ckpt_path} does not exist: give the path of a checkpoint (.ckpt) file")
    checkpoint = read_checkpoint(ckpt_path)
    if "run_config" not in checkpoint.get("hyper_parameters", {}):
        raise CheckpointError(f"{ckpt_path} holds no run config: it was not written by dynamixer's train.py")
    return checkpoint


def backbone_state(checkpoint: dict[str, Any], weights: str, ckpt_path: str) -> dict[str, torch.Tensor]:
    """The backbone's state dict in a training checkpoint: its raw (`model.`) or EMA (`ema.module.`) weights."""
    if weights not in ("raw", "ema"):
        raise CheckpointError(f"weights={weights} is not known: use weights=raw or weights=ema")
    prefix = "ema.module." if weights == "ema" else "model."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"{ckpt_path} has no EMA weights (trained with module.ema_decay=null): use weights=raw")
    return state


def load_run_config(checkpoint: dict[str, Any], cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The config of the run that wrote `checkpoint`, with `data` overrides of this command on top.

    The model is always the checkpoint's own; data can be pointed elsewhere (`data.data_dir=...`,
    `data.batch_size=...`, or a whole `data=...` choice).
    """
    run_cfg = OmegaConf.create(checkpoint["hyper_parameters"]["run_config"])
    with open_dict(run_cfg):
        for override in overrides:
            key = override.lstrip("+~").split("=", 1)[0]
            if key == "data" or key.startswith("data."):
                OmegaConf.update(run_cfg, key, OmegaConf.select(cfg, key), merge=False)
        run_cfg.paths = cfg.paths
    return run_cfg


def load_model(ckpt_path: str, weights: str = "ema") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The backbone of a training checkpoint with its raw or EMA weights, in eval mode, and the
    checkpoint's hyper-parameters (`run_config`, `num_classes`, `data_info`)."""
    checkpoint = load_checkpoint(ckpt_path)
    state = backbone_state(checkpoint, weights, ckpt_path)
    hparams = checkpoint["hyper_parameters"]
    model = instantiate(
        OmegaConf.create(hparams["run_config"]).model, num_classes=hparams["num_classes"], _convert_="all"
    )
    model.load_state_dict(state)
    return model.eval(), hparams
