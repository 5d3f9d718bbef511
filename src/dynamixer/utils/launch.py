"""Hardware checks and process launching for Lightning under Hydra."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict, read_write

from dynamixer.errors import HardwareError


def check_devices(trainer_cfg: Mapping[str, Any]) -> None:
    """Fail early, naming the fix, when the trainer config asks for GPUs that are not there.

    `accelerator=auto` with several devices means GPUs (as in `trainer.devices=8`); CPU processes
    need `hardware=cpu` (accelerator cpu) to be asked for explicitly.
    """
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    devices = trainer_cfg.get("devices", "auto")
    if devices in (0, "0") or (hasattr(devices, "__len__") and not isinstance(devices, str) and not len(devices)):
        raise HardwareError(f"trainer.devices={devices} asks for no device: give trainer.devices=1 (or more, or auto)")
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


# x86 capabilities without bf16 arithmetic (torch.backends.cpu.get_cpu_capability); others (ARM) are not judged
_X86 = ("DEFAULT", "AVX2", "AVX512")


def cpu_bf16_warning(trainer_cfg: Mapping[str, Any]) -> str | None:
    """The warning for bf16 precision trained on an x86 CPU without native bf16 (neither AVX512-BF16 nor AMX):
    PyTorch then emulates every bf16 matrix product, and a step takes many times as long as in fp32. None
    where the run is on GPUs, in another precision, or on a CPU with native bf16."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    capability = torch.backends.cpu.get_cpu_capability()
    # private, but the only test torch offers of what its kernels use (torch 2.14, as requirements.lock pins)
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if not on_cpu or not str(trainer_cfg.get("precision")).startswith("bf16") or capability not in _X86 or native:
        return None
    return (
        f"trainer.precision={trainer_cfg.get('precision')} on this CPU ({capability}, without AVX512-BF16 or AMX) "
        "emulates every bf16 matrix product: a training step takes many times as long as in fp32 (dynamixer_s, "
        "batch 8, on an AVX2 CPU: 25x). Use trainer.precision=32 here, or bf16 on a GPU or a CPU that has it"
    )


def command_overrides() -> list[str]:
    """The overrides of this command line (empty outside a Hydra run)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def is_first_process() -> bool:
    """Whether this process is global rank 0 of its run, by the environment a launcher gives its ranks
    (Lightning's DDP re-launch, torchrun, SLURM's tasks), before any process group exists."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"))


def is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@contextmanager
def ddp_relaunch_of_this_job(extra_overrides: list[str] = ()) -> Iterator[None]:
    """Inside the block, Lightning's DDP re-launch of this script runs *this* multirun job, in *its* folder;
    after it, `sys.argv`, the job's Hydra config and `__main__.__spec__` are as they were.

    Lightning starts ranks 1..N-1 as `sys.argv + hydra.run.dir=<HydraConfig run.dir>`; inside a multirun
    that would start the whole sweep again, in the wrong folder. It is handed the job's own overrides (and
    `extra_overrides`, e.g. the devices of its slot) and output folder instead.
    """
    if not is_multirun():
        yield
        return
    hydra_cfg = HydraConfig.get()
    main = sys.modules["__main__"]
    argv, run_dir, spec = sys.argv, hydra_cfg.run.dir, getattr(main, "__spec__", None)
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task, *extra_overrides]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    if spec is not None and spec.name.startswith("joblib."):
        # a worker of a parallel sweep: Lightning would start the ranks as `python -m <the worker's module>`;
        # without a spec it starts them as `python <sys.argv[0]>`, the entry script (joblib keeps sys.argv)
        main.__spec__ = None
    try:
        yield
    finally:
        sys.argv, main.__spec__ = argv, spec
        with read_write(hydra_cfg), open_dict(hydra_cfg):
            hydra_cfg.run.dir = run_dir


@contextmanager
def ranks_started_with(overrides: list[str]) -> Iterator[None]:
    """Inside the block, the ranks Lightning starts (it starts them as `sys.argv` and its own overrides) are
    also given `overrides`: how rank 0 tells them what it decided. After it, `sys.argv` is as it was."""
    argv = sys.argv
    sys.argv = [*argv, *overrides]
    try:
        yield
    finally:
        sys.argv = argv


def override(key: str, value: str | None) -> str:
    """`key=value` such that Hydra reads back exactly `value`, whatever its characters (None: null): quoted, a
    quote and the backslashes before it or at the end escaped, and `${` kept from being an interpolation."""
    if value is None:
        return f"{key}=null"
    text = re.sub(r"(\\*)('|\Z)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
    text = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    return f"{key}='{text}'"


def parallel_jobs() -> int:
    """How many jobs of this multirun run at once: `hydra.launcher.n_jobs` of a parallel launcher (joblib;
    -1 is one per CPU core, -2 all but one, ...), else 1."""
    if not is_multirun():
        return 1
    n_jobs = HydraConfig.get().launcher.get("n_jobs")
    if n_jobs is None:
        return 1
    n_jobs = int(n_jobs)
    return n_jobs if n_jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + n_jobs)


@contextmanager
def job_slot(trainer_cfg: DictConfig) -> Iterator[list[str]]:
    """This job's share of the machine while jobs of a sweep run side by side (`hydra/launcher=parallel`).

    Holds one of the `n_jobs` slots (a lock file of this machine, free again when the job ends) and
    gives slot `k` the GPUs `k*d ... k*d+d-1` for `trainer.devices=d`, or on the CPU `cores // (n_jobs * d)`
    threads per process, so that side-by-side jobs do not oversubscribe the cores. Yields the overrides
    that give DDP ranks started by this job the same devices. Outside a parallel sweep: nothing.
    """
    n_jobs = parallel_jobs()
    if n_jobs == 1:
        yield []
        return
    # the slots are this machine's: their lock files live in its temporary folder, not in a shared sweep folder
    sweep_dir = str(Path(HydraConfig.get().sweep.dir).resolve())
    lock_dir = Path(tempfile.gettempdir()) / f"dynamixer-slots-{hashlib.sha1(sweep_dir.encode()).hexdigest()[:12]}"
    with _lease(n_jobs, lock_dir) as slot:
        devices = trainer_cfg.get("devices")
        accelerator = str(trainer_cfg.get("accelerator", "auto"))
        gpus = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") else 0
        if gpus and isinstance(devices, int) and devices > 0:
            if n_jobs * devices > gpus:
                raise HardwareError(
                    f"hydra.launcher.n_jobs={n_jobs} side-by-side jobs of trainer.devices={devices} GPUs need "
                    f"{n_jobs * devices} GPUs, but this machine has {gpus}: set hydra.launcher.n_jobs="
                    f"{max(1, gpus // devices)} or lower trainer.devices"
                )
            ids = list(range(slot * devices, (slot + 1) * devices))
            with open_dict(trainer_cfg):
                trainer_cfg.devices = ids
            yield [f"trainer.devices=[{','.join(map(str, ids))}]"]
            return
        ranks = devices if isinstance(devices, int) and devices > 0 and accelerator == "cpu" else 1
        threads = max(1, (os.cpu_count() or 1) // (n_jobs * ranks))
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the DDP ranks this job starts
        torch.set_num_threads(threads)
        yield []


@contextmanager
def _lease(n_slots: int, lock_dir: Path) -> Iterator[int]:
    """The first free one of `n_slots` slots, held as an exclusive lock until the block ends (or the
    process dies: the operating system releases it)."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for slot in range(n_slots):
            with open(lock_dir / f"{slot}.lock", "w") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                try:
                    yield slot
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
                return
        time.sleep(0.2)  # all taken: a job of another worker has not finished its release yet


def release_distributed() -> None:
    """End this job's process group, so that the next job of a multirun starts a fresh one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Lightning's launcher leaves these in this process's environment; with LOCAL_RANK set, the next
    # job would believe its ranks were started externally and wait for them forever
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE"):
        os.environ.pop(name, None)
