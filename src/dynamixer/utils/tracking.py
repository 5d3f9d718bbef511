"""Experiment-tracking set-up that depends on where a run happens (W&B offline mode, sweep groups)."""

from __future__ import annotations

import netrc
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, open_dict

from dynamixer.utils.launch import is_multirun


def wandb_api_key_configured() -> bool:
    """Whether W&B can authenticate: `WANDB_API_KEY`, or a `wandb login` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def run_id(output_dir: str | os.PathLike) -> str | None:
    """The W&B run id of a run folder: made at its first start (by rank 0, the one that logs) and kept in
    `<run folder>/wandb_run_id`, so that a resumed or requeued run continues the same W&B run."""
    path = Path(output_dir) / "wandb_run_id"
    if not path.is_file() and rank_zero_only.rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(8) + "\n")
    return path.read_text().strip() if path.is_file() else None


def configure_wandb(logger_cfg: DictConfig, output_dir: str | os.PathLike) -> None:
    """Fill the W&B logger's open choices: offline without an API key (never block on a login or a
    network), one W&B run per run folder (resumed with it), and in a multirun one group per sweep with
    each job named by its overrides."""
    wandb_cfg = (logger_cfg or {}).get("wandb")
    if wandb_cfg is None:
        return
    with open_dict(wandb_cfg):
        if wandb_cfg.get("id") is None:
            wandb_cfg.id = run_id(output_dir)
            wandb_cfg.resume = "allow"
        if wandb_cfg.get("offline") is None:
            wandb_cfg.offline = not wandb_api_key_configured() or os.environ.get("WANDB_MODE") == "offline"
        if is_multirun():
            hydra_cfg = HydraConfig.get()
            if wandb_cfg.get("group") is None:
                wandb_cfg.group = Path(hydra_cfg.sweep.dir).name
            wandb_cfg.name = hydra_cfg.job.override_dirname or f"job{hydra_cfg.job.num}"


def close_loggers(loggers: list) -> None:
    """Finish the W&B runs this job opened, so the next job of a multirun starts its own run."""
    for logger in loggers:
        experiment = getattr(logger, "_experiment", None)  # WandbLogger's run, if one was started
        if type(logger).__name__ == "WandbLogger" and experiment is not None:
            experiment.finish()


def sweep_config() -> dict[str, Any]:
    """In a multirun, what the loggers' config holds about this job's place in the sweep: `sweep.name`, this
    job's override `values` (without the run plumbing that job folder names leave out), and `sweep.setting`,
    those values without `seed`: the replicates of one setting share it (W&B: group runs by `sweep.setting`).
    Empty outside a multirun."""
    if not is_multirun():
        return {}
    hydra_cfg = HydraConfig.get()
    excluded = set(hydra_cfg.job.config.override_dirname.exclude_keys)
    values = {}
    for item in hydra_cfg.overrides.task:
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if key not in excluded:
            try:
                values[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                values[key] = value
    setting = ",".join(f"{k}={v}" for k, v in values.items() if k != "seed") or "default"
    return {"sweep": {"name": Path(hydra_cfg.sweep.dir).name, "values": values, "setting": setting}}
