"""Our training checkpoints: finding the one to resume, checking that it fits, loading its weights."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from dynamixer.checkpoint_reader import check_weights_fit, read_checkpoint, typed_text
from dynamixer.errors import CheckpointError, MissingPathError
from dynamixer.machinery.files import previous_path, remove_stale_temporaries
from dynamixer.models.weights import training_weights
from dynamixer.run.stored_config import StoredRun, read_stored_run
from dynamixer.schema import Role, role_of

log = logging.getLogger(__name__)


def _read_or_why(path: Path) -> dict[str, Any] | str:
    """The checkpoint at `path`, or why it cannot be read."""
    try:
        return read_checkpoint(path)
    except Exception as err:  # truncated, torn or not a checkpoint at all: any reason means "not this one"
        log.warning("cannot read checkpoint %s (%s: %s); trying the previous one", path, type(err).__name__, err)
        return f"{path.name}: {err}"


def resume_checkpoint(cfg: DictConfig) -> tuple[str, dict[str, Any]] | None:
    """The checkpoint to resume, read and validated (`dynamixer.checkpoint_reader`), with its path: `ckpt_path`,
    a checkpoint file, or `auto` for this run folder's newest readable resumable state: `last.ckpt`, else the
    `last.prev.ckpt` it replaced (with a warning naming the unreadable file)."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return None
    if ckpt_path == "auto":
        folder = Path(cfg.paths.output_dir) / "checkpoints"
        remove_stale_temporaries(folder)
        candidates = [p for p in (folder / "last.ckpt", previous_path(folder / "last.ckpt")) if p.is_file()]
        why = []
        for path in candidates:
            found = _read_or_why(path)
            if isinstance(found, dict):
                return str(path), found
            why.append(found)
        if candidates:
            raise CheckpointError(
                f"no readable checkpoint to resume in {folder} ({'; '.join(why)}). Move them away to start the run "
                "over, or give ckpt_path=<file> of another checkpoint"
            )
        return None
    if not os.path.isfile(ckpt_path):
        raise MissingPathError(
            f"ckpt_path={ckpt_path} does not exist: give the path of a .ckpt file (e.g. <run folder>/checkpoints/"
            "last.ckpt), or ckpt_path=auto to resume this run folder's last checkpoint when there is one"
        )
    return str(ckpt_path), read_checkpoint(ckpt_path)


def _flat(node: Any, prefix: str) -> dict[str, Any]:
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}.{key}").items()}
    return {prefix: node}


def _built(config: dict[str, Any]) -> set[str]:
    """The sections of a run config that build an object (`_target_`)."""
    return {k for k, node in config.items() if isinstance(node, dict) and isinstance(node.get("_target_"), str)}


def _trained(config: dict[str, Any], sections: set[str], targets: dict[str, Any]) -> dict[str, tuple[Any, Role]]:
    """The flattened keys of a run config that define what is trained, with their roles: `seed`, and each key
    of `sections` whose parameter's role is trained or extendable (`dynamixer.schema`). `targets`: each
    section's class, of this command's config (a name in a file is never imported); a section this command
    does not build is compared whole."""
    keys = {"seed": (config.get("seed"), Role.TRAINED)}
    for section in sorted(sections):
        for key, value in _flat(config.get(section), section).items():
            name = key.split(".")[1] if "." in key else ""
            role = role_of(targets[section], name) if section in targets else Role.TRAINED
            if role in (Role.TRAINED, Role.EXTENDABLE):
                keys[key] = (value, role)
    return keys


def check_resume_config(ckpt_path: str, checkpoint: dict[str, Any], cfg: DictConfig) -> dict[str, Any] | None:
    """A resume trains what was trained before: refuse, naming each key with its old and new value, a
    command that changes it. With `extend=true` a new `trainer.max_epochs`/`max_steps` is accepted (the
    schedule is then rebuilt for it): returns `{key: [old, new]}` of those, or None."""
    now_config = OmegaConf.to_container(cfg, resolve=True)
    stored_config = read_stored_run(checkpoint, ckpt_path).run_config
    targets = {section: get_object(now_config[section]["_target_"]) for section in _built(now_config)}
    sections = _built(now_config) | _built(stored_config)
    stored, now = (_trained(config, sections, targets) for config in (stored_config, now_config))
    roles = {k: role for k, (_, role) in (stored | now).items()}
    stored, now = ({k: value for k, (value, _) in keys.items()} for keys in (stored, now))
    # typed: Lightning reads limit_train_batches=1 as one batch and 1.0 as the whole epoch
    keys = sorted(stored.keys() | now.keys())
    differ = {k: [stored.get(k), now.get(k)] for k in keys if typed_text(stored.get(k)) != typed_text(now.get(k))}
    extended = {k: v for k, v in differ.items() if roles[k] is Role.EXTENDABLE} if cfg.get("extend") else {}
    refused = {k: v for k, v in differ.items() if k not in extended}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise CheckpointError(
            f"this command trains other settings than {ckpt_path} was trained with ({listed}). A resume trains "
            "what was trained before: resume with the run's own settings, or start a new run (another run_name) "
            "from its weights with model.pretrained_file=<checkpoint>; to train longer, give the new "
            "trainer.max_epochs with extend=true (the lr schedule is rebuilt for the new length at this step)"
        )
    return extended or None


def load_checkpoint(ckpt_path: str) -> tuple[dict[str, Any], StoredRun]:
    """A training checkpoint written by train.py, and its stored run (validated, see `stored_config`)."""
    if not ckpt_path or not os.path.isfile(ckpt_path):
        raise MissingPathError(f"ckpt_path={ckpt_path} does not exist: give the path of a checkpoint (.ckpt) file")
    checkpoint = read_checkpoint(ckpt_path)
    return checkpoint, read_stored_run(checkpoint, ckpt_path)


def load_model(ckpt_path: str, weights: str = "ema") -> tuple[torch.nn.Module, StoredRun]:
    """The backbone of a training checkpoint with its raw or EMA weights, in eval mode, and the checkpoint's
    stored run (model and data settings, class names, eval transform)."""
    from dynamixer.run.build import instantiate_checked

    checkpoint, stored = load_checkpoint(ckpt_path)
    state = training_weights(checkpoint["state_dict"], weights, ckpt_path, option="weights")
    with torch.device("meta"):  # its shapes, nothing allocated: the weights must fit before the model is built
        shapes = instantiate_checked(stored.model, num_classes=stored.num_classes, _convert_="all").state_dict()
    check_weights_fit(state, shapes, ckpt_path)
    model = instantiate_checked(stored.model, num_classes=stored.num_classes, _convert_="all")
    model.load_state_dict(state)
    return model.eval(), stored
