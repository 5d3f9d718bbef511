"""Hardware checks and process launching for Lightning under Hydra."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write

from dynamixer.errors import UserError


class HardwareError(UserError, RuntimeError):
    """The trainer asks for devices this machine does not have."""


def check_devices(trainer_cfg: Mapping[str, Any]) -> None:
    """Fail early, naming the fix, when the trainer config asks for GPUs that are not there.

    `accelerator=auto` with several devices means GPUs (as in `trainer.devices=8`); CPU processes
    need `hardware=cpu` (accelerator cpu) to be asked for explicitly.
    """
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    devices = trainer_cfg.get("devices", "auto")
    if isinstance(devices, int) and devices > 0:
        wanted = devices
    elif isinstance(devices, (list, tuple)) or hasattr(devices, "__len__") and not isinstance(devices, str):
        wanted = len(devices)
    else:
        return
    wants_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and wanted > 1)
    have = torch.cuda.device_count()
    if wants_gpu and have < wanted:
        raise HardwareError(
            f"trainer.devices={devices} (accelerator={accelerator}) asks for {wanted} GPU(s), but this machine has "
            f"{have}. Run it on a machine with {wanted} GPUs, lower trainer.devices, or train data-parallel on CPU "
            f"processes with hardware=cpu trainer.devices={wanted}."
        )


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def prepare_ddp_relaunch() -> None:
    """Make Lightning's DDP re-launch of this script run *this* multirun job, in *its* folder.

    Lightning starts ranks 1..N-1 as `sys.argv + hydra.run.dir=<HydraConfig run.dir>`; inside a multirun
    that would start the whole sweep again, in the wrong folder. We hand it the job's own overrides and
    output folder instead.
    """
    if not is_multirun():
        return
    hydra_cfg = HydraConfig.get()
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


def release_distributed() -> None:
    """End this job's process group, so that the next job of a multirun starts a fresh one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if is_multirun():
        # Lightning's launcher leaves these in this process's environment; with LOCAL_RANK set, the next
        # job would believe its ranks were started externally and wait for them forever
        for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"):
            os.environ.pop(name, None)


def requeue_slurm_job() -> bool:
    """Requeue this SLURM job (`scontrol requeue $SLURM_JOB_ID`), from rank 0 of a SLURM job only; True if
    it was asked for. The requeued job runs the same command again."""
    job_id = (
        os.environ.get("SLURM_ARRAY_JOB_ID")
        and os.environ.get("SLURM_ARRAY_TASK_ID")
        and (f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}")
        or os.environ.get("SLURM_JOB_ID")
    )
    if not job_id or os.environ.get("SLURM_PROCID", "0") != "0":
        return False
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    return True
