"""The Lightning private state dynamixer reads is where `dynamixer.machinery.lightning_internals` expects it, with the
values it expects; a release that moves it fails here, naming the attribute, before a resume goes wrong."""

from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from torch.utils.data import DataLoader, TensorDataset

from dynamixer.machinery import lightning_internals as internals
from dynamixer.machinery.callbacks import ResumableCheckpoint
from helpers import cpu_trainer, tiny_module


class Record(Callback):
    """What the adapter reads at each training batch's end."""

    def __init__(self) -> None:
        self.done: list[int] = []
        self.epochs: list[int] = []

    def on_train_epoch_start(self, trainer, *args) -> None:
        self.epochs.append(internals.epoch_being_trained(trainer))

    def on_train_batch_end(self, trainer, *args) -> None:
        self.done.append(internals.batches_done(trainer))
        if trainer.global_step == 5:
            internals.stop_after_this_step(trainer)


def test_the_version_is_the_one_the_adapter_was_written_for() -> None:
    assert L.__version__.startswith(internals.WRITTEN_FOR + "."), L.__version__


def test_the_data_position_the_stop_flag_and_the_save_bookkeeping_behave_as_read(tmp_path) -> None:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    by_steps = ResumableCheckpoint(dirpath=tmp_path, filename="last", every_n_train_steps=3, save_on_exception=True)
    by_epochs = ResumableCheckpoint(dirpath=tmp_path / "e", filename="last")
    record = Record()
    trainer = cpu_trainer(tmp_path, [record, by_steps, by_epochs], max_epochs=3)
    assert not internals.saves_every_epoch(by_steps) and internals.saves_every_epoch(by_epochs)
    with pytest.raises(SIGTERMException):  # the stop flag ends the loop after step 5, through SIGTERM's path
        trainer.fit(tiny_module(), DataLoader(data, batch_size=8))
    assert record.done == [1, 2, 3, 4, 1]  # batches of the current epoch (4 an epoch), after each step
    assert record.epochs == [0, 1]  # the epoch the loop is in, as its samplers are told
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 5  # saved at the stop
    internals.save_unless_saved(by_steps, trainer)  # already saved this step: nothing new
    assert not (tmp_path / "last-v1.ckpt").exists()


def test_the_stop_flag_broadcast_is_the_training_loop_s_and_can_be_skipped() -> None:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    loop = trainer.fit_loop.epoch_loop
    assert "_broadcast_sigterm_tensor()" in inspect.getsource(type(loop).advance)  # what runs before each step
    internals.skip_stop_flag_broadcast(trainer)
    assert loop._broadcast_sigterm_tensor() is None


def test_with_the_sigterm_notifier_quiet_fit_s_handler_calls_only_ours() -> None:
    import signal
    import threading

    from dynamixer.machinery import signals

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    internals.quiet_sigterm_notifier(trainer)
    with signals.noted():
        trainer._signal_connector.register_signal_handlers()  # what fit does as it starts
        try:
            assert signal.getsignal(signal.SIGTERM) is not signals._note  # Lightning's composed handler
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            assert signals.received() == [signal.SIGTERM] and not trainer.received_sigterm
        finally:
            trainer._signal_connector.teardown()
            signals.acted_on()


def test_compiled_in_place_and_the_csv_writer_hooks_are_where_they_were() -> None:
    module = nn.Linear(2, 2)
    assert not internals.is_compiled(module)
    module.compile()
    assert internals.is_compiled(module)
    assert "_check_log_dir_exists" in dict(inspect.getmembers(ExperimentWriter))  # dynamixer.loggers overrides it


def test_a_moved_attribute_is_named(monkeypatch) -> None:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    monkeypatch.delattr(type(trainer.fit_loop.epoch_loop), "batch_progress", raising=False)
    monkeypatch.delattr(trainer.fit_loop.epoch_loop, "batch_progress", raising=False)
    with pytest.raises(RuntimeError, match=r"no `fit_loop.epoch_loop.batch_progress.current.processed`"):
        internals.batches_done(trainer)
