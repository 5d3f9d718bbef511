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
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, open_dict

from dynamixer.machinery.lightning_internals import started_wandb_run
from dynamixer.utils.launch import is_multirun

REPLICATE_KEY = "seed"  # jobs of a sweep that differ only in it are replicates of one setting


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
        experiment = started_wandb_run(logger)
        if type(logger).__name__ == "WandbLogger" and experiment is not None:
            experiment.finish()


def sweep_config() -> dict[str, Any]:
    """In a multirun, what the loggers' config holds about this job's place in the sweep: `sweep.name`, the
    job's swept `values` (with the seed), and `sweep.setting`, those values without the seed: the replicates
    of one setting share it (W&B: group runs by `sweep.setting`). Empty outside a multirun."""
    if not is_multirun():
        return {}
    hydra_cfg = HydraConfig.get()
    sweep_dir = Path(hydra_cfg.sweep.dir)
    swept = _swept_keys(sweep_dir)
    excluded = set(hydra_cfg.job.config.override_dirname.exclude_keys)
    values = {}
    for override in OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task)):
        key = override.key_or_group
        if (key in swept) if swept is not None else (key not in excluded):
            values[key] = override.value()
    setting = ",".join(f"{k}={v}" for k, v in values.items() if k != REPLICATE_KEY) or "default"
    return {"sweep": {"name": sweep_dir.name, "values": values, "setting": setting}}


def _swept_keys(sweep_dir: Path) -> set[str] | None:
    """The keys the sweep varies: those given several values on its command line, and those of its
    `hydra.sweeper.params` (a preset's grid, a search space), read from the `multirun.yaml` Hydra wrote
    into the sweep folder; None without that file."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra") or {}
    overrides = OverridesParser.create().parse_overrides(list((hydra.get("overrides") or {}).get("task") or []))
    params = (hydra.get("sweeper") or {}).get("params") or {}
    return {o.key_or_group for o in overrides if o.is_sweep_override()} | set(params)
