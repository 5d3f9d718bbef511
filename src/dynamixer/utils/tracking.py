"""Experiment-tracking set-up that depends on where a run happens (W&B offline mode, sweep groups)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from hydra.core.hydra_config import HydraConfig
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


def configure_wandb(logger_cfg: DictConfig) -> None:
    """Fill the W&B logger's open choices: offline without an API key (never block on a login or a
    network), and in a multirun one group per sweep with each job named by its overrides."""
    wandb_cfg = (logger_cfg or {}).get("wandb")
    if wandb_cfg is None:
        return
    with open_dict(wandb_cfg):
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
