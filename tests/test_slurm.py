"""Training on a real SLURM cluster (tests/slurm_cluster.py: two nodes of one CPU, slurm 22.05) through the
path a user takes: `python train.py -m hardware=slurm_cpu ...`, Hydra's submitit launcher submitting the job and
waiting for it, the job stopping at a warning, checkpointing, requeuing itself and resuming.

The warning SLURM sends before a time limit (`--signal=USR2@<signal_delay_s>`, which submitit asks for) goes to
the job's step processes; `scancel --signal=USR2 <job>` sends that same signal to the same processes, at once
(slurmctld checks `--signal` only every 30 s, so waiting for it would make the moment random).

The test cluster's node names (n1, n2) do not resolve: `MASTER_ADDR=127.0.0.1` in the job's environment gives
DDP its rendezvous address (on a real cluster Lightning takes the first node's name from SLURM_NODELIST).
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import SlurmCluster

from helpers import differing, read_checkpoint, start_script, training_state

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS_PER_EPOCH = 20
EPOCHS = 3
TOTAL = STEPS_PER_EPOCH * EPOCHS
# one CPU per job (both jobs of a comparison: the same thread count), ~0.15 s a step, every step logged
RUN = [
    "hardware=slurm_cpu",
    "hardware.nodes=1",
    "hardware.cpus_per_task=1",
    "hydra.launcher.partition=debug",
    "hydra.launcher.timeout_min=10",
    "hydra.launcher.signal_delay_s=30",
    "model.img_size=32",
    f"trainer.max_epochs={EPOCHS}",
    f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.deterministic=true",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "data.num_workers=0",
    "hydra.sweep.subdir=${hydra.job.num}",  # job folder `0`: these overrides would name one over 255 characters
]


class Sweep:
    """One `python train.py -m <RUN> run_name=<name> ...` started in `cwd`: the launcher process, and its job."""

    def __init__(self, cluster: SlurmCluster, cwd: Path, name: str, *overrides: str) -> None:
        self.cluster, self.folder = cluster, cwd / "logs" / "train" / "multiruns" / name
        env = {**cluster.env, "MASTER_ADDR": "127.0.0.1"}
        self.started = time.monotonic()
        replaced = {o.split("=", 1)[0] for o in overrides}
        run = [o for o in RUN if o.split("=", 1)[0] not in replaced]
        self.proc = start_script("train.py", ["-m", *run, f"run_name={name}", *overrides], cwd, env=env)

    @property
    def job_id(self) -> str | None:
        ids = [p.name for p in (self.folder / ".submitit").glob("*") if p.name.isdigit()]
        return ids[0] if ids else None

    @property
    def job_dir(self) -> Path:
        return self.folder / "0"

    def state(self) -> str:
        if self.job_id is None:
            return ""
        return self.cluster.run(["squeue", "-h", "-j", self.job_id, "-o", "%T"], check=False).stdout.strip()

    def wait_for(self, what: str, predicate, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, f"the launcher ended while waiting for {what}:\n{self.output()}"
            assert time.monotonic() < end, f"no {what} in {timeout:.0f} s:\n{self.job_log()}"
            time.sleep(0.2)

    def steps(self, job: int = 0) -> list[int]:
        """The steps whose training loss job `job`'s metrics.csv holds, in the order they were written."""
        try:
            path = self.folder / str(job) / "csv" / "metrics.csv"
            with path.open() as f:
                return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss_step")]
        except (OSError, StopIteration, ValueError):
            return []

    def finish(self, timeout: float = 300) -> str:
        out = self.output(timeout)
        assert self.proc.returncode == 0, out[-4000:] + self.job_log()
        return out

    def output(self, timeout: float = 300) -> str:
        if not hasattr(self, "_out"):
            self._out = self.proc.communicate(timeout=timeout)[0]
            self.wall_s = time.monotonic() - self.started
        return self._out

    def job_log(self) -> str:
        logs = sorted((self.folder / ".submitit").glob("*/*_log.*"))
        return "".join(f"\n--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)

    def results(self, job: int = 0) -> dict:
        return json.loads((self.folder / str(job) / "results.json").read_text())

    def restarts(self) -> int:
        """SLURM's restart count of the job (`scontrol show job`: finished jobs stay MinJobAge=300 s)."""
        text = self.cluster.run(["scontrol", "show", "job", self.job_id]).stdout
        return int(re.search(r"Restarts=(\d+)", text).group(1))

    def accounting(self) -> list[str]:
        """The job's states in sacct, its requeued runs included (-D)."""
        cmd = ["sacct", "-D", "-X", "-n", "-P", "-j", self.job_id, "-o", "State"]
        return self.cluster.run(cmd).stdout.split()


def signal_job(cluster: SlurmCluster, job_id: str) -> None:
    """SIGUSR2 to the job's step processes: what SLURM's `--signal=USR2@T` (submitit's) sends before a time limit."""
    cluster.run(["scancel", "--signal=USR2", job_id])


def training_state_of(job_dir: Path) -> dict[str, torch.Tensor]:
    return training_state(job_dir / "checkpoints" / "last.ckpt")


def _status(sweep: Sweep) -> str | None:
    try:
        return sweep.results()["status"]
    except (OSError, ValueError, StopIteration):
        return None


def assert_finished_whole(sweep: Sweep) -> dict:
    results = sweep.results()
    assert results["status"] == "finished" and results["global_step"] == TOTAL, results
    assert results["torch_threads"] == 1
    assert sorted(sweep.steps()) == list(range(TOTAL)), sweep.steps()  # every step, once
    return results


def test_a_time_limit_warning_checkpoints_requeues_and_ends_as_an_uninterrupted_job(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    straight = Sweep(slurm_cluster, tmp_path, "straight")
    straight.finish()
    assert_finished_whole(straight)

    warned = Sweep(slurm_cluster, tmp_path, "warned")
    warned.wait_for("step 25 in metrics.csv", lambda: max(warned.steps(), default=-1) >= 25)
    signal_job(slurm_cluster, warned.job_id)
    warned.wait_for("the stop's results.json", lambda: _status(warned) not in (None, "requeuing"))
    stopped = warned.results()
    assert stopped["status"] == "requeued", stopped
    assert 25 <= stopped["global_step"] < TOTAL
    assert read_checkpoint(warned.job_dir / "checkpoints" / "last.ckpt")["global_step"] == stopped["global_step"]
    requeued_at = time.monotonic()
    warned.wait_for("the requeued job running", lambda: warned.restarts() == 1 and warned.state() == "RUNNING")
    back_after = time.monotonic() - requeued_at
    warned.finish()

    assert_finished_whole(warned)
    assert warned.restarts() == 1 and "REQUEUED" in warned.accounting(), warned.accounting()
    assert warned.steps() == list(range(TOTAL))  # in order: the resume continued at the stop's step
    a, b = training_state_of(straight.job_dir), training_state_of(warned.job_dir)
    assert a.keys() == b.keys() and len(a) > 100
    assert any(k.startswith("state_dict/ema") for k in a), list(a)[:5]
    assert differing(a, b) == []
    print(f"straight {straight.wall_s:.0f} s; warned {warned.wall_s:.0f} s, back {back_after:.0f} s after the stop")


@pytest.mark.parametrize("moment", ["the job's Python", "the run's start"])
def test_a_warning_during_start_up_stops_at_the_first_step_and_the_job_is_requeued(
    slurm_cluster: SlurmCluster, tmp_path: Path, moment: str
) -> None:
    """The warning while the job starts: right after its Python starts (submitit's "Loading pickle": ~7 s of
    imports and unpickling before any handler exists, hardware=slurm's setup holds the signal blocked until
    ours is in place), or once the run has begun (its folder claimed) before its first step. Either way
    training stops after step 1 with that step saved, the job is requeued and finishes."""
    sweep = Sweep(slurm_cluster, tmp_path, "early")
    claimed = sweep.job_dir / ".dynamixer-run"
    if moment == "the job's Python":
        sweep.wait_for(moment, lambda: "Loading pickle" in sweep.job_log(), timeout=120)
        assert not claimed.exists()
    else:
        sweep.wait_for(moment, claimed.exists, timeout=120)
    assert sweep.steps() == []
    signal_job(slurm_cluster, sweep.job_id)
    sweep.wait_for("the stop's results.json", lambda: _status(sweep) not in (None, "requeuing"))
    stopped = sweep.results()
    assert stopped["status"] == "requeued" and stopped["global_step"] == 1, stopped
    sweep.wait_for("the requeue", lambda: sweep.state() == "PENDING" or sweep.restarts() == 1, timeout=60)
    slurm_cluster.run(["scontrol", "update", f"jobid={sweep.job_id}", "StartTime=now"], check=False)
    sweep.finish()
    assert_finished_whole(sweep)
    assert sweep.restarts() == 1 and sweep.steps() == list(range(TOTAL))


def test_a_preemption_from_outside_comes_back_and_loses_at_most_the_checkpoint_interval(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """`scontrol requeue` of a training job (what a pre-emption by requeue does: SIGTERM, SIGKILL KillWait=5 s
    later). `scontrol update StartTime=now` lets it run at once instead of after the 11 s SLURM holds it."""
    every = 5
    sweep = Sweep(slurm_cluster, tmp_path, "preempted", f"callbacks.last_checkpoint.every_n_train_steps={every}")
    sweep.wait_for("step 25 in metrics.csv", lambda: max(sweep.steps(), default=-1) >= 25)
    slurm_cluster.run(["scontrol", "requeue", sweep.job_id])
    sweep.wait_for("the job pending again", lambda: sweep.state() == "PENDING", timeout=60)
    slurm_cluster.run(["scontrol", "update", f"jobid={sweep.job_id}", "StartTime=now"])
    sweep.finish()
    assert_finished_whole(sweep)
    assert sweep.restarts() == 1 and "REQUEUED" in sweep.accounting(), sweep.accounting()
    steps = sweep.steps()
    # where the resumed job's rows begin: a step again that was logged before the requeue (or none: saved exactly)
    back = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
    lost = 0 if back is None else steps[back - 1] - steps[back] + 1
    assert lost <= every, steps
    print(f"preempted: {lost} steps lost, {sweep.wall_s:.0f} s")


def test_max_num_timeout_reached_stops_requeuing_and_results_say_why(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """`hydra.launcher.max_num_timeout=1`: the first warning requeues the job, the second one (after its
    restart) stops it with that step saved and no requeue; results.json says so and counts the restarts."""
    sweep = Sweep(slurm_cluster, tmp_path, "limited", "hydra.launcher.max_num_timeout=1")
    sweep.wait_for("step 10 in metrics.csv", lambda: max(sweep.steps(), default=-1) >= 10)
    signal_job(slurm_cluster, sweep.job_id)
    sweep.wait_for("the stop's results.json", lambda: _status(sweep) not in (None, "requeuing"))
    first = sweep.results()
    assert first["status"] == "requeued" and first["restarts"] == 0, first
    sweep.wait_for("the requeue", lambda: sweep.state() == "PENDING", timeout=60)
    slurm_cluster.run(["scontrol", "update", f"jobid={sweep.job_id}", "StartTime=now"])
    sweep.wait_for("training again", lambda: max(sweep.steps(), default=-1) >= first["global_step"] + 5, timeout=120)
    signal_job(slurm_cluster, sweep.job_id)
    out = sweep.output()
    second = sweep.results()
    assert second["status"] == "requeue_limit" and second["restarts"] == 1, second
    assert "max_num_timeout=1" in second["requeue_error"] and first["global_step"] < second["global_step"] < TOTAL
    assert read_checkpoint(sweep.job_dir / "checkpoints" / "last.ckpt")["global_step"] == second["global_step"]
    assert sweep.proc.returncode != 0 and sweep.restarts() == 1, out[-3000:]
    print(f"limited: launcher output ends\n{out[-1500:]}")


def test_scancel_stops_each_job_saved_ends_the_sweep_with_one_line_per_job_and_its_summary_and_a_resubmit_resumes(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """A sweep of two jobs (one per node), both cancelled while they train (SIGTERM, SIGKILL 5 s later): each
    stops with its step saved (results.json: interrupted); the launcher (`train.py -m`) ends with status 1, one
    line per job naming its state and log, not submitit's traceback, and the sweep's summary. The same command
    again resumes both jobs from their saved steps and finishes them."""
    sweep = Sweep(slurm_cluster, tmp_path, "cancelled", "seed=1,2")
    jobs = lambda: sorted(p.name for p in (sweep.folder / ".submitit").glob("*_*") if p.is_dir())  # noqa: E731
    sweep.wait_for("both jobs training", lambda: min(len(sweep.steps(0)), len(sweep.steps(1))) >= 5)
    cancelled = jobs()
    slurm_cluster.run(["scancel", *cancelled])
    out = sweep.output()
    assert sweep.proc.returncode == 1, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 2 and all("CANCELLED" in line and "run_name=cancelled" in line for line in errors), errors
    assert [job for job in cancelled if f"SLURM job {job} " in out] == cancelled
    assert "Traceback" not in out and "UncompletedJobError" not in out, out[-3000:]
    stopped = [sweep.results(job) for job in (0, 1)]
    for job, results in enumerate(stopped):
        assert results["status"] == "interrupted" and 5 <= results["global_step"] < TOTAL, results
        saved = read_checkpoint(sweep.folder / str(job) / "checkpoints" / "last.ckpt")
        assert saved["global_step"] == results["global_step"]
    table = (sweep.folder / "sweep.md").read_text()
    assert "| 0 | 1 | interrupted |" in table and "| 1 | 2 | interrupted |" in table, table
    assert f"sweep summary: {sweep.folder / 'sweep.md'}" in out
    print("\n".join(errors))

    again = Sweep(slurm_cluster, tmp_path, "cancelled", "seed=1,2")
    again.finish()
    for job, before in enumerate(stopped):
        results = again.results(job)
        assert results["status"] == "finished" and results["global_step"] == TOTAL, results
        assert again.steps(job) == list(range(TOTAL))  # in order: it went on from the saved step
        assert results["start_step"] == before["global_step"], results
    table = (sweep.folder / "sweep.md").read_text()
    assert "| 0 | 1 | finished |" in table and "| 1 | 2 | finished |" in table, table


def test_a_stop_signal_to_the_waiting_launcher_ends_it_at_once_and_the_job_goes_on(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """`train.py -m hardware=slurm_cpu` only waits for its jobs: a SIGTERM (`kill`, `timeout`) ends it at once
    with 128 + 15 and a line saying the jobs go on; the job finishes on the cluster as if nothing happened."""
    sweep = Sweep(slurm_cluster, tmp_path, "waiting")
    sweep.wait_for("the job training", lambda: len(sweep.steps()) >= 2)
    sweep.proc.send_signal(signal.SIGTERM)
    out = sweep.output(timeout=20)
    assert sweep.proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert f"stopped waiting for the jobs of {sweep.folder}" in out and "Traceback" not in out, out[-3000:]
    end = time.monotonic() + 180
    while _status(sweep) != "finished":
        assert time.monotonic() < end, sweep.job_log()
        time.sleep(0.5)
    assert_finished_whole(sweep)


def test_a_sweep_of_three_jobs_with_one_failing_finishes_the_other_two(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """`seed=1,2,oops`: the third job fails at once (a seed that is no integer), the other two train; the sweep
    ends with status 0 and its summary, and the failed job's results.json says why (two nodes: the third job
    waits for a free one)."""
    sweep = Sweep(
        slurm_cluster, tmp_path, "three", "seed=1,2,oops", "trainer.max_epochs=1", "trainer.limit_train_batches=5"
    )
    sweep.finish()
    results = [json.loads((sweep.folder / str(i) / "results.json").read_text()) for i in range(3)]
    assert [r["status"] for r in results] == ["finished", "finished", "failed"], results
    assert "seed=oops is not an integer" in results[2]["error"]
    # the summary lists the two that trained and the one that failed, with its reason
    table = (sweep.folder / "sweep.md").read_text()
    assert "| 0 | 1 | finished |" in table and "| 1 | 2 | finished |" in table, table
    assert "failed: ConfigError: seed=oops is not an integer" in table, table


TWO_NODES = ["hardware.nodes=2", "callbacks.last_checkpoint.every_n_train_steps=4"]


def test_ddp_across_two_nodes_survives_a_requeue_and_a_killed_task_and_ends_bit_identical(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """One DDP rank on each node (gloo, Lightning's SLURMEnvironment). At random steps: `scontrol requeue` (both
    tasks SIGTERM: stopped saved, requeued by SLURM), then SIGKILL of rank 1's process alone (rank 0 loses its
    peer and the job fails, results.json says so; the same command again resumes from the last checkpoint,
    every 4 steps). The end equals an uninterrupted two-node run's bit for bit."""
    seed = int(os.environ.get("CHAOS_SEED", time.time_ns() % 10_000))
    chance = random.Random(seed)
    requeue_at, kill_at = chance.randint(6, 20), chance.randint(26, 45)
    where = f"CHAOS_SEED={seed}: requeue at step {requeue_at}, kill of rank 1 at step {kill_at}"

    straight = Sweep(slurm_cluster, tmp_path, "ddp_straight", *TWO_NODES)
    straight.finish()
    assert_finished_whole(straight)
    nodes = slurm_cluster.run(["sacct", "-X", "-n", "-P", "-j", straight.job_id, "-o", "NNodes,NodeList"]).stdout
    assert nodes.split() == ["2|n[1-2]"], nodes
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in straight.job_log(), straight.job_log()

    chaos = Sweep(slurm_cluster, tmp_path, "ddp_chaos", *TWO_NODES)
    chaos.wait_for(f"step {requeue_at}", lambda: max(chaos.steps(), default=-1) >= requeue_at)
    slurm_cluster.run(["scontrol", "requeue", chaos.job_id])
    chaos.wait_for("the job pending again", lambda: chaos.state() == "PENDING", timeout=60)
    assert chaos.results()["status"] == "interrupted", where
    slurm_cluster.run(["scontrol", "update", f"jobid={chaos.job_id}", "StartTime=now"])
    chaos.wait_for(f"step {kill_at}", lambda: max(chaos.steps(), default=-1) >= kill_at)
    pid = slurm_cluster.task_pid(chaos.job_id, 1)
    assert pid is not None, where
    os.kill(pid, signal.SIGKILL)
    out = chaos.output()
    failed = chaos.results()
    assert failed["status"] == "failed" and failed["error"], (where, failed, out[-3000:])
    saved = read_checkpoint(chaos.job_dir / "checkpoints" / "last.ckpt")["global_step"]

    again = Sweep(slurm_cluster, tmp_path, "ddp_chaos", *TWO_NODES)
    again.finish()
    results = again.results()
    assert results["status"] == "finished" and results["global_step"] == TOTAL, (where, results)
    # it went on from the last checkpoint before the kill: at most the interval lost
    assert results["start_step"] == saved and kill_at - 4 < saved and saved % 4 == 0, (where, saved, results)
    assert sorted(set(again.steps())) == list(range(TOTAL)), where
    a, b = training_state_of(straight.job_dir), training_state_of(again.job_dir)
    assert a.keys() == b.keys() and len(a) > 100
    assert differing(a, b) == [], where
    print(f"{where}; straight {straight.wall_s:.0f} s, chaos {chaos.wall_s:.0f} + {again.wall_s:.0f} s")
