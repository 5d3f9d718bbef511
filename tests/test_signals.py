"""The stop and requeue signals are ours for a run's whole life: one during start-up stops training at its
first step with a checkpoint instead of killing the process; one after training ends the process once the
results are written; Lightning's own SIGTERM handler is never put in place of ours."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dynamixer.machinery import signals
from dynamixer.machinery.callbacks import StopOnSignal
from dynamixer.machinery.run_folder import CLAIM
from helpers import (
    QUIET_TRAIN,
    cpu_trainer,
    finish,
    read_checkpoint,
    run_dir,
    scontrol_stand_in,
    start_script,
    tiny_module,
    wait_for,
)


def test_after_training_sigterm_is_still_ours_and_ends_the_process(tmp_path: Path) -> None:
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,))), batch_size=8)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, signals.noted():
        seen = []

        class Handler(L.Callback):
            def on_train_batch_end(self, *args) -> None:
                seen.append(signal.getsignal(signal.SIGTERM))

        trainer = cpu_trainer(tmp_path, [StopOnSignal(), Handler()], enable_checkpointing=False)
        trainer.fit(tiny_module(), data)
        assert seen and all(h is signals._note for h in seen)  # while training: ours, not Lightning's wrapper
        assert signal.getsignal(signal.SIGTERM) is signals._note  # not Lightning's, put back by its teardown
        os.kill(os.getpid(), signal.SIGTERM)  # after training: noted, and acted on when the run ends
        assert signals.received() == [signal.SIGTERM]
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before and signals.received() == []


def test_a_signal_inside_gradient_accumulation_stops_after_the_optimizer_step(tmp_path: Path) -> None:
    """A SIGTERM after the first of two accumulated batches: training stops after the second, which steps the
    optimizer, not between them (a checkpoint there would lose the accumulated gradient)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class Signal(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 0:
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,))), batch_size=4)
    trainer = cpu_trainer(tmp_path, [Signal(), StopOnSignal()], enable_checkpointing=False, accumulate_grad_batches=2)
    with pytest.raises(SIGTERMException), signals.noted():
        trainer.fit(tiny_module(), data)
    assert (trainer.global_step, trainer.fit_loop.epoch_loop.batch_progress.current.processed) == (1, 2)
    assert signals._depth == 0  # the callback's own block ended with the stop


def test_a_signal_held_blocked_since_start_up_reaches_our_handler_when_noted_begins() -> None:
    """A SLURM job's Python starts with the stop signals blocked (hardware=slurm's setup): one sent before any
    handler exists waits pending, and `noted` delivers it to ours (tests/test_slurm.py: the real job)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    try:
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR2)
        assert signal.SIGUSR2 in signal.sigpending()  # held: the default action (the end of the process) waits
        with signals.noted():
            assert signals.received() == [signal.SIGUSR2]
            signals.acted_on()
        assert signal.SIGUSR2 not in signal.sigpending()
    finally:  # one still pending is dropped, not the end of pytest
        before = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
        signal.signal(signal.SIGUSR2, before)


def blocks(pid: int, signum: signal.Signals) -> bool:
    """Whether process `pid`'s main thread has `signum` blocked (its /proc status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
    return bool(mask & (1 << (signum - 1)))


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["the imports", "the run's start"])
def test_a_requeue_signal_during_start_up_stops_at_the_first_step_with_a_checkpoint(
    tmp_path: Path, moment: str
) -> None:
    """A cluster's warning (SIGUSR2) that comes while train.py is still starting: in its first second (the
    imports: train.py blocks the signal until our handler is in place), or once the run has begun (its folder
    claimed, the data and model not yet built). The process is not killed by it; training stops after its
    first step, saved."""
    args = [*QUIET_TRAIN, "run_name=early", "trainer.max_epochs=3", "callbacks.stop_on_signal.requeue_on=[SIGUSR2]"]
    proc = start_script("train.py", args, tmp_path)
    folder = run_dir(tmp_path, "early")
    if moment == "the imports":
        wait_for(lambda: blocks(proc.pid, signal.SIGUSR2), proc, timeout=60)  # train.py's first line ran
        assert not folder.exists()  # Hydra has not even composed the config yet
    else:
        wait_for(lambda: (folder / CLAIM).exists(), proc)
        assert not (folder / "checkpoints").exists()  # still starting
    proc.send_signal(signal.SIGUSR2)
    out = finish(proc, expect=128 + signal.SIGTERM)
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "interrupted" and results["global_step"] == 1, out[-2000:]  # not a SLURM job
    assert read_checkpoint(folder / "checkpoints" / "last.ckpt")["global_step"] == 1
    assert "not a SLURM job" in out


@pytest.mark.slow
def test_a_requeue_that_fails_is_what_results_json_says(tmp_path: Path) -> None:
    """`scontrol requeue` exits 1 (a stand-in that fails, on PATH, in a job's environment): results.json says
    `requeue_failed` with the error, never `requeued`, and the output names how to resume."""
    env = scontrol_stand_in(tmp_path / "bin", "echo 'slurm_requeue error: Access/permission denied' >&2\nexit 1")
    args = [*QUIET_TRAIN, "run_name=denied", "trainer.max_epochs=3", "callbacks.stop_on_signal.requeue_on=[SIGUSR2]"]
    proc = start_script("train.py", args, tmp_path, env=env)
    folder = run_dir(tmp_path, "denied")
    wait_for(lambda: (folder / CLAIM).exists(), proc)
    proc.send_signal(signal.SIGUSR2)
    out = finish(proc, expect=128 + signal.SIGTERM)
    results = json.loads((folder / "results.json").read_text())
    assert (
        results["status"] == "requeue_failed"
        and "exited with 1: slurm_requeue error: Access/permission denied" in results["requeue_error"]
    )
    assert "the requeue failed" in out and "ckpt_path=auto" in out
