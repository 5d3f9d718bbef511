"""Smoke tests of the one-machine SLURM cluster of the tests (tests/slurm_cluster.py; the `slurm_cluster`
fixture is in conftest.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_both_nodes_are_idle(slurm_cluster: SlurmCluster) -> None:
    nodes = slurm_cluster.run(["sinfo", "-h", "-N", "-o", "%N %t"]).stdout.splitlines()
    assert nodes == ["n1 idle", "n2 idle"]


def test_a_batch_job_completes_and_shows_in_sacct(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job = slurm_cluster.run(["sbatch", "--parsable", "--wrap", "sleep 1"], cwd=tmp_path).stdout.strip()
    deadline = time.monotonic() + 60
    while (state := slurm_cluster.run(["sacct", "-j", job, "-X", "-n", "-o", "State"]).stdout.strip()) != "COMPLETED":
        assert time.monotonic() < deadline, f"job {job} is {state!r} in sacct"
        time.sleep(0.5)


def test_srun_runs_one_task_per_node(slurm_cluster: SlurmCluster) -> None:
    tasks = slurm_cluster.run(["srun", "-N", "2", "-n", "2", "printenv", "SLURMD_NODENAME"]).stdout.split()
    assert sorted(tasks) == ["n1", "n2"]
