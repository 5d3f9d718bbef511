"""Every field of a checkpoint is data we check: crafted loop, data, random, optimizer and callback states are
refused with one message or made harmless before Lightning sees them; paths in the file reach nothing; sizes
are bounded before anything is built."""

from __future__ import annotations

import resource
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dynamixer.checkpoint_reader import read_checkpoint
from dynamixer.errors import CheckpointError
from dynamixer.machinery.checkpoint_io import AtomicCheckpointIO
from helpers import QUIET_FAST, files_state, run_dir
from helpers import read_checkpoint as load_raw

RESUME = [*QUIET_FAST, "run_name=r", "ckpt_path=auto"]


def resumable(digits_run: Path, cwd: Path, change: Callable[[dict], None]) -> Path:
    """A copy of the digits run as `cwd`'s run `r`, its last.ckpt changed by `change` (last.prev.ckpt removed)."""
    folder = run_dir(cwd, "r")
    shutil.copytree(digits_run, folder)
    last = folder / "checkpoints" / "last.ckpt"
    checkpoint = load_raw(last)
    change(checkpoint)
    torch.save(checkpoint, last)
    (folder / "checkpoints" / "last.prev.ckpt").unlink(missing_ok=True)
    return last


def checkpoint_callbacks(checkpoint: dict) -> list[dict]:
    return [s for k, s in checkpoint["callbacks"].items() if k.startswith(("ModelCheckpoint", "ResumableCheckpoint"))]


def victim_folder(root: Path) -> Path:
    victim = root / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "keep.ckpt").write_bytes(b"someone else's checkpoint")
    (victim / "sub" / "data.txt").write_text("someone else's data")
    return victim


def test_paths_in_a_checkpoints_callback_state_delete_nothing_and_reach_nothing(
    digits_run: Path, tmp_path: Path, entry, connections
) -> None:
    victim = victim_folder(tmp_path / "outside")
    before = files_state(victim)
    hostile = [f"local://{victim}", f"{connections.url}/x.ckpt", str(victim / "keep.ckpt"), str(victim)]

    def plant(checkpoint: dict) -> None:
        for state in checkpoint_callbacks(checkpoint):
            state["best_model_path"] = state["kth_best_model_path"] = state["last_model_path"] = hostile[0]
            state["best_k_models"] = {path: torch.tensor(2.0) for path in hostile}
            state["dirpath"] = hostile[0]

    resumable(digits_run, tmp_path, plant)
    code, out, err = entry("train.py", [*RESUME, "extend=true", "trainer.max_epochs=4"], tmp_path)
    assert code == 0, err
    assert files_state(victim) == before
    assert connections.connections == 0
    results = (run_dir(tmp_path, "r") / "results.json").read_text()
    assert str(victim) not in results and "127.0.0.1" not in results


def test_the_checkpoint_io_removes_only_checkpoint_files_it_saved_next_to(tmp_path: Path, connections) -> None:
    victim = victim_folder(tmp_path / "outside")
    before = files_state(victim)
    io = AtomicCheckpointIO()
    ours = tmp_path / "run" / "checkpoints"
    io.save_checkpoint({"w": torch.ones(2)}, ours / "epoch000.ckpt")
    (ours / "sub").mkdir()
    for path in (f"local://{victim}", f"{connections.url}/x.ckpt", victim / "keep.ckpt", victim, ours / "sub"):
        io.remove_checkpoint(path)
    assert files_state(victim) == before and (ours / "sub").is_dir()
    assert connections.connections == 0
    io.remove_checkpoint(ours / "epoch000.ckpt")
    assert not (ours / "epoch000.ckpt").exists()


def test_the_reader_keeps_only_paths_of_the_folder_it_read_from(digits_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    shutil.copytree(digits_run / "checkpoints", folder)
    raw = load_raw(folder / "last.ckpt")
    ours = str(folder / "epoch001-step000006.ckpt")
    for state in checkpoint_callbacks(raw):
        state["dirpath"] = str(folder)
        state["best_model_path"] = state["kth_best_model_path"] = ours
        state["best_k_models"] = {ours: torch.tensor(0.5)}
        state["last_model_path"] = str(tmp_path / "elsewhere.ckpt")
    torch.save(raw, folder / "last.ckpt")
    for state in checkpoint_callbacks(read_checkpoint(folder / "last.ckpt")):
        assert state["best_model_path"] == ours and list(state["best_k_models"]) == [ours]
        assert state["last_model_path"] == ""

    for state in checkpoint_callbacks(raw):  # a top-k record that names a file it does not hold is cleared
        state["kth_best_model_path"] = str(folder / "other.ckpt")
    torch.save(raw, folder / "last.ckpt")
    for state in checkpoint_callbacks(read_checkpoint(folder / "last.ckpt")):
        assert state["best_k_models"] == {} and state["best_model_path"] == "" and state["best_model_score"] is None


def _key(node, key: str):
    """`key` as `node` has it: a list index or an optimizer state's parameter index are numbers."""
    return int(key) if isinstance(node, list) or (key.isdigit() and key not in node) else key


def _set(path: str, value) -> Callable[[dict], None]:
    """A change of the checkpoint field at `path` (keys joined by `/`) to `value`; `KeyError` deletes it."""

    def change(checkpoint: dict) -> None:
        *parents, last = path.split("/")
        node = checkpoint
        for key in parents:
            node = node[_key(node, key)]
        if value is KeyError:
            del node[_key(node, last)]
        else:
            node[_key(node, last)] = value

    return change


# fields of a checkpoint that a resume restores, each crafted as an attacker or a bad copy would
CRAFTED = {
    "data_position_negative": ("DigitsDataModule/batches", -5, "DigitsDataModule.batches"),
    "data_state_without_batch_size": ("DigitsDataModule/batch_size", KeyError, "DigitsDataModule.batch_size"),
    "random_state_without_python": ("rng_states_per_rank/0/python", KeyError, "rng_states_per_rank[0].python"),
    "random_state_out_of_range": ("rng_states_per_rank/0/numpy/pos", 10**6, "rng_states_per_rank[0].numpy.pos"),
    "loop_progress_negative": ("loops/fit_loop/epoch_progress/current/completed", -1, "epoch_progress.current"),
    "loop_flag_not_a_flag": ("loops/fit_loop/epoch_loop.batch_progress/is_last_batch", 1, "is_last_batch"),
    "loop_state_missing": ("loops/fit_loop/epoch_loop.state_dict", KeyError, "epoch_loop.state_dict"),
    "optimizer_setting_changed": ("optimizer_states/0/param_groups/1/weight_decay", 5, "param_groups[1].weight_decay"),
    "optimizer_setting_added": ("optimizer_states/0/param_groups/0/amsgrad", "yes", "param_groups[0].amsgrad"),
    "optimizer_lr_not_finite": ("optimizer_states/0/param_groups/0/lr", float("nan"), "param_groups[0].lr"),
    "step_not_a_count": ("global_step", True, "global_step"),
    "weights_not_a_tensor": ("state_dict/model.head.bias", [0.0], "state_dict.model.head.bias"),
    "weights_of_another_shape": ("state_dict/model.head.bias", torch.zeros(3), "model.head.bias"),
    "optimizer_state_of_another_shape": ("optimizer_states/0/state/196/exp_avg", torch.zeros(7), "exp_avg"),
    "history_not_numbers": ("callbacks/MetricsHistory/history/0/step", "x", "MetricsHistory.history[0].step"),
}


@pytest.mark.parametrize("attack", sorted(CRAFTED))
def test_a_crafted_field_of_a_checkpoint_is_one_message_naming_it(
    attack: str, digits_run: Path, tmp_path: Path, user_error
) -> None:
    path, value, named = CRAFTED[attack]
    checkpoints = resumable(digits_run, tmp_path, _set(path, value)).parent
    before = files_state(checkpoints)
    message = user_error("train.py", [*RESUME, "extend=true", "trainer.max_epochs=3"], tmp_path)
    assert named in message, message
    assert files_state(checkpoints) == before


def test_a_stored_model_far_larger_than_its_weights_is_refused_before_it_is_built(
    digits_run: Path, tmp_path: Path, user_error
) -> None:
    last = resumable(digits_run, tmp_path, _set("hyper_parameters/run_config/model/embed_dims", [60000] * 4))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    message = user_error("test.py", [f"ckpt_path={last}", "hardware=cpu"], tmp_path)
    assert "not those of the model" in message, message
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert grown_mib < 512, f"{grown_mib:.0f} MiB allocated for a model that was never to be built"


def test_the_structure_of_a_checkpoint_is_bounded_before_it_is_walked(
    digits_run: Path, tmp_path: Path, monkeypatch
) -> None:
    raw = load_raw(digits_run / "checkpoints" / "last.ckpt")
    laughs: list = [0]
    for _ in range(64):  # 2**64 visits through shared references, in a file of a few kB
        laughs = [laughs, laughs]
    torch.save({**raw, "provenance": {"x": laughs}}, tmp_path / "laughs.ckpt")
    with pytest.raises(CheckpointError, match="over the bounds"):
        read_checkpoint(tmp_path / "laughs.ckpt")

    import dynamixer.checkpoint_reader as reader

    monkeypatch.setattr(reader, "MAX_PICKLE_BYTES", 1000)
    with pytest.raises(CheckpointError, match=r"data\.pkl"):
        read_checkpoint(digits_run / "checkpoints" / "last.ckpt")
