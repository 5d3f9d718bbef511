"""Runs that are killed lose nothing: SIGKILL, SIGTERM, restarts of finished runs, atomic checkpoints."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import (
    EPOCH_END_MOMENTS,
    differing,
    finish,
    logged_steps,
    read_checkpoint,
    run_script,
    scontrol_stand_in,
    start_script,
    step_losses,
    training_state,
    validated_steps,
    wait_for,
)

pytestmark = pytest.mark.slow  # trains models or runs the scripts

STEPS_PER_EPOCH = 6
# deterministic CPU kernels, 6 steps an epoch, a step logged every step
RUN = [
    "trainer.deterministic=true",
    "data.num_workers=2",  # augmentations drawn in loader workers, as on ImageNet
    f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
    "trainer.log_every_n_steps=1",
    "scheduler.warmup_epochs=1",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
]


def start(cwd: Path, *args: str) -> subprocess.Popen:
    return start_script("train.py", [*RUN, *args], cwd)


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def saved_step(path: Path) -> int:
    try:
        return read_checkpoint(path)["global_step"]
    except Exception:  # not there yet, or being replaced right now
        return -1


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    epochs = 3
    finish(start(tmp_path, f"trainer.max_epochs={epochs}", "run_name=straight"))
    straight = results(tmp_path / "logs/train/runs/straight")

    run_dir = tmp_path / "logs/train/runs/killed"
    proc = start(tmp_path, f"trainer.max_epochs={epochs}", "run_name=killed")
    wait_for(lambda: saved_step(run_dir / "checkpoints" / "last.ckpt") >= STEPS_PER_EPOCH, proc)
    proc.send_signal(signal.SIGKILL)  # no handler runs: only what was on disk survives
    proc.wait()
    assert not (run_dir / "results.json").exists()

    finish(start(tmp_path, f"trainer.max_epochs={epochs}", "run_name=killed", "ckpt_path=auto"))
    resumed = results(run_dir)
    assert resumed["global_step"] == straight["global_step"] == epochs * STEPS_PER_EPOCH
    assert [h["epoch"] for h in resumed_history(run_dir)] == list(range(epochs))  # none lost, none twice
    # The resumed run restores weights, optimizer, scheduler, EMA and the random states and repeats the
    # same deterministic CPU computation: it ends with the uninterrupted run's tensors, bit for bit
    a = training_state(tmp_path / "logs/train/runs/straight/checkpoints/last.ckpt")
    b = training_state(run_dir / "checkpoints" / "last.ckpt")
    assert len(a) > 100 and differing(a, b) == []
    assert resumed["final"] == straight["final"]


def resumed_history(run_dir: Path) -> list[dict]:
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return checkpoint["callbacks"]["MetricsHistory"]["history"]


SHARDED = ["data.batch_size=4", "data.cache_dir={cache}"]  # 30 images: 6 batches an epoch (hf: 7, limited)


@pytest.mark.parametrize(
    "setup,stop",
    # one process takes Ctrl-C (SIGTERM's handler only differs in the flag it sets; SIGUSR2 is the slurm test's)
    [
        (["hardware=cpu", "trainer.devices=2"], signal.SIGTERM),
        ([], signal.SIGINT),
        (["data=hf", "data.data_dir={parquet}", *SHARDED], signal.SIGTERM),
        (["data=wds", "data.data_dir={wds}", "data.batch_size=4", "data.shuffle_buffer=4"], signal.SIGTERM),
    ],
    ids=["DDP, 2 ranks", "one process, Ctrl-C", "parquet shards", "WebDataset shards"],
)
def test_sigterm_mid_epoch_resumes_with_the_losses_of_an_uninterrupted_run(
    setup: list[str], stop: signal.Signals, tmp_path: Path, shard_sets: dict[str, Path]
) -> None:
    """SIGTERM (or Ctrl-C) to the (rank 0) process in the middle of an epoch; the losses are rank 0's. Under
    DDP only rank 0 gets the signal, as from a user's `kill`: the ranks stop together at the same step. The
    sharded sources (data=hf, data=wds) continue at the saved batch too."""
    setup = [arg.format(**shard_sets, cache=tmp_path / "cache") for arg in setup]
    finish(start(tmp_path, "trainer.max_epochs=2", "run_name=straight", *setup))
    run_dir = tmp_path / "logs/train/runs/pre"
    # stop in the middle of the second epoch, past the epoch-end checkpoint: sent at that step by a callback
    stopped = STEPS_PER_EPOCH + 2
    signal_at = [f"+callbacks.signal_at.{k}={v}" for k, v in {"moment": "training_step", "step": stopped}.items()]
    signal_at += ["+callbacks.signal_at._target_=helpers.signal_at", f"+callbacks.signal_at.signum={stop.name}"]
    out = finish(
        start(tmp_path, "trainer.max_epochs=2", "run_name=pre", *setup, *signal_at), expect=128 + signal.SIGTERM
    )
    assert "ckpt_path=auto" in out
    every = 10 if "trainer.devices=2" in setup else 1  # DDP ranks decide together every 10 steps (the default)
    stopped = -(-stopped // every) * every
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") == stopped  # mid-epoch: the exact step
    assert results(run_dir)["status"] == "interrupted" and results(run_dir)["global_step"] == stopped

    finish(start(tmp_path, "trainer.max_epochs=2", "run_name=pre", "ckpt_path=auto", *setup))
    # metrics.csv kept the rows from before the stop and continued: every step once, in order
    assert logged_steps(run_dir) == list(range(2 * STEPS_PER_EPOCH))
    assert results(run_dir)["global_step"] == 2 * STEPS_PER_EPOCH and results(run_dir)["status"] == "finished"
    # the resumed run saw the batches and augmentations the uninterrupted run saw: the same losses, step for step
    assert step_losses(run_dir) == step_losses(tmp_path / "logs/train/runs/straight")
    # and every rank did (under DDP a rank's other batch would change the averaged gradients): the same end
    straight = training_state(tmp_path / "logs/train/runs/straight/checkpoints/last.ckpt")
    assert differing(straight, training_state(run_dir / "checkpoints" / "last.ckpt")) == []


@pytest.fixture(scope="module")
def validated_straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted two-epoch run the epoch-end stops are compared with."""
    cwd = tmp_path_factory.mktemp("straight")
    finish(start(cwd, *VALIDATED, "run_name=straight"))
    return cwd / "logs/train/runs/straight"


VALIDATED = ["trainer.max_epochs=2", "trainer.limit_val_batches=2"]


@pytest.mark.parametrize("moment", EPOCH_END_MOMENTS)
def test_a_signal_around_an_epoch_s_end_stops_at_its_last_step_and_the_resume_trains_on_exactly(
    moment: str, validated_straight: Path, tmp_path: Path
) -> None:
    """A stop that meets an epoch's end (after its last step, in or after the validation that closes it, as it
    ends; each moment made to happen by a callback that signals there) is saved at that epoch's last step with
    its validation complete (the last: after the next step); the resumed run trains on as the uninterrupted
    run did, to the same weights, and every epoch is validated once."""
    run_dir = tmp_path / "logs/train/runs/pre"
    signal_at = ["+callbacks.signal_at._target_=helpers.signal_at", f"+callbacks.signal_at.moment={moment}"]
    finish(start(tmp_path, *VALIDATED, "run_name=pre", *signal_at), expect=128 + signal.SIGTERM)
    # the epoch ends with its validation; a signal after the epoch's end (its callbacks run after ours) is
    # acted on after the next step
    stopped = STEPS_PER_EPOCH + (moment == "train_epoch_end")
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") == stopped
    assert validated_steps(run_dir) == validated_steps(validated_straight)[:1]  # the epoch's metrics are there

    finish(start(tmp_path, *VALIDATED, "run_name=pre", "ckpt_path=auto"))
    assert step_losses(run_dir) == step_losses(validated_straight)
    straight = training_state(validated_straight / "checkpoints" / "last.ckpt")
    assert differing(straight, training_state(run_dir / "checkpoints" / "last.ckpt")) == []
    assert validated_steps(run_dir) == validated_steps(validated_straight)  # each epoch once, at its last step


def test_restarting_a_finished_run_changes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "logs/train/runs/done"
    finish(start(tmp_path, "trainer.max_epochs=1", "run_name=done"))
    before = results(run_dir)

    def checkpoints() -> dict[str, tuple[int, bytes]]:  # each file's time of last write and its bytes
        return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (run_dir / "checkpoints").iterdir()}

    files = checkpoints()
    finish(start(tmp_path, "trainer.max_epochs=1", "run_name=done", "ckpt_path=auto"))
    after = results(run_dir)
    assert after["global_step"] == before["global_step"] == STEPS_PER_EPOCH
    assert after["final"] == before["final"] and after["best_checkpoint"] == before["best_checkpoint"]
    assert checkpoints() == files  # not one checkpoint written again, renamed or removed


def test_a_diverged_run_stops_at_once_with_the_step_and_keeps_the_last_finite_checkpoint(tmp_path: Path) -> None:
    """An absurd learning rate makes the weights overflow at the first update: `train.py` stops at the first
    non-finite loss with one message naming the step and what to try (exit 2), and last.ckpt (saved every
    step) holds the step before it, finite."""
    args = [*RUN, "optimizer.lr=1e30", "scheduler.warmup_epochs=0", "trainer.max_epochs=3"]
    args += ["callbacks.last_checkpoint.every_n_train_steps=1", "run_name=diverged"]
    proc = run_script("train.py", args, tmp_path, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = errors[0]
    found = re.search(r"training loss is (nan|inf) at step (\d+) .*optimizer\.lr", message)
    assert found, message
    step = int(found.group(2))
    # step 0 trains on finite weights; its update at lr 1e30 overflows them, so step 1's loss is not finite
    assert step == 1, message
    last = read_checkpoint(tmp_path / "logs/train/runs/diverged/checkpoints/last.ckpt")
    assert last["global_step"] == step
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


def start_with_file_size_limit(cwd: Path, limit: int, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`train.py` in a process that cannot write a file larger than `limit` bytes (RLIMIT_FSIZE): the real
    event of a disk or quota that fills up in the middle of a checkpoint."""
    import resource

    from helpers import script_command, script_env

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.Popen(
        script_command("train.py", [*RUN, *args]),
        cwd=cwd,
        env={**script_env(), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=limited,
    )


def test_a_full_disk_during_saves_keeps_the_previous_checkpoint_and_still_requeues(tmp_path: Path) -> None:
    """A run saved its first epoch; resumed where no file over half a checkpoint can be written: a periodic
    save fails with one message (exit 2); a stop for a requeue signal cannot save its step, says so in
    results.json and still requeues the job (stand-in `scontrol`, as in the test above). `last.ckpt` keeps
    the first epoch's state byte for byte, and no temporary file is left."""
    finish(start(tmp_path, "trainer.max_epochs=1", "run_name=full"))
    run_dir = tmp_path / "logs/train/runs/full"
    checkpoints = run_dir / "checkpoints"
    saved = {p.name: p.read_bytes() for p in checkpoints.iterdir()}
    limit = len(saved["last.ckpt"]) // 2
    resume = ["trainer.max_epochs=2", "extend=true", "run_name=full", "ckpt_path=auto"]

    out = finish(
        start_with_file_size_limit(tmp_path, limit, [*resume, "callbacks.last_checkpoint.every_n_train_steps=1"], {}),
        expect=2,
    )
    assert "cannot write the checkpoint" in out and "the previous last.ckpt is intact" in out, out[-3000:]
    assert "Traceback" not in out
    assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == saved  # nothing torn, nothing left over

    env = scontrol_stand_in(tmp_path / "bin", f'echo "$@" >> {tmp_path / "scontrol.log"}')
    requeue = ["callbacks.stop_on_signal.requeue_on=[SIGUSR2]", "+callbacks.signal_at._target_=helpers.signal_at"]
    requeue += ["+callbacks.signal_at.moment=training_step", f"+callbacks.signal_at.step={STEPS_PER_EPOCH + 2}"]
    requeue += ["+callbacks.signal_at.signum=SIGUSR2"]
    finish(start_with_file_size_limit(tmp_path, limit, [*resume, *requeue], env), expect=128 + signal.SIGTERM)
    assert results(run_dir)["status"] == "requeued"
    assert "cannot write the checkpoint" in results(run_dir)["checkpoint_error"]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == saved
