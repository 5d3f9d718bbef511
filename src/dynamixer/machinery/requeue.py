"""The requeue of a stopped SLURM job (`scontrol requeue`), bounded by `hydra.launcher.max_num_timeout`, and
what a sweep says of the jobs that ended without a result."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from hydra.core.hydra_config import HydraConfig


class RequeueLimitReached(OSError):
    """The job has been requeued `hydra.launcher.max_num_timeout` times already: it is not requeued again."""


def slurm_restarts() -> int:
    """How many times SLURM has requeued this job, for any reason (SLURM_RESTART_COUNT; 0 on a first run)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


def requeue_limit() -> int | None:
    """`hydra.launcher.max_num_timeout` of this job (submitit's launcher): the most requeues; None without one.
    We requeue the job ourselves, so submitit's own count never runs: this is the one that does."""
    if not HydraConfig.initialized():
        return None
    limit = HydraConfig.get().launcher.get("max_num_timeout")
    return None if limit is None else int(limit)


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
    limit = requeue_limit()
    if limit is not None and slurm_restarts() >= limit:
        raise RequeueLimitReached(
            f"job {job_id} has been requeued {slurm_restarts()} times, hydra.launcher.max_num_timeout={limit}: "
            "not requeued again"
        )
    proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if proc.returncode:
        raise OSError(f"scontrol requeue {job_id} exited with {proc.returncode}: {proc.stderr.strip()}")
    return True


def uncompleted_slurm_jobs(message: str) -> tuple[Path | None, list[str]]:
    """The sweep folder of a submitit sweep with jobs that did not complete, and one line per such job, from
    the message of submitit's `UncompletedJobError` (it names the first one's result file, in the sweep's
    `.submitit/<job id>/`): each job's state in `sacct` and its log folder."""
    first = message.strip().splitlines()[0] if message.strip() else "a SLURM job of the sweep did not complete"
    found = re.search(r"path (\S+)/(\d+(?:_\d+)?)/\S*_result\.pkl", message)
    if not found:
        return None, [first]
    folder = Path(found.group(1))
    sweep_dir = folder.parent  # .submitit/ is in the sweep's folder, logs/<task>/multiruns/<run_name>
    jobs = sorted((p.name for p in folder.iterdir() if re.fullmatch(r"\d+(_\d+)?", p.name)), key=lambda j: (len(j), j))
    try:
        cmd = ["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(jobs)]
        rows = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return sweep_dir, [first]
    states = dict(row.split("|", 1) for row in rows if "|" in row)
    lines = [
        f"SLURM job {job} is {states[job]}, no result (its log: {folder / job}); the same command with "
        f"run_name={sweep_dir.name} resumes it (hardware=slurm sets ckpt_path=auto)"
        for job in jobs
        if states.get(job, "COMPLETED") != "COMPLETED"
    ]
    return sweep_dir, lines or [first]
