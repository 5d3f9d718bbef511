"""Checkpoint and results writes that a kill cannot tear, and resuming from the newest readable state."""

from __future__ import annotations

import json
import logging
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dynamixer.checkpoint_io import AtomicCheckpointIO, previous_path
from dynamixer.errors import CheckpointError
from dynamixer.run.checkpoints import resume_checkpoint
from dynamixer.utils.results import write_results

# a child that saves ever larger steps of a real checkpoint with a 64 MB state through the real writer, until it
# is killed
WRITER = """
import sys, torch
from dynamixer.checkpoint_io import AtomicCheckpointIO
io, path, step, ours = AtomicCheckpointIO(), sys.argv[1], int(sys.argv[2]), torch.load(sys.argv[3], weights_only=True)
while True:
    step += 1
    io.save_checkpoint({**ours, "global_step": step, "w": torch.full((16 * 2**20,), float(step))}, path)
    print(step, flush=True)
"""


@pytest.fixture(scope="module")
def ours(digits_run: Path) -> dict:
    """A real training checkpoint's content: what the reader takes as one of ours."""
    return torch.load(digits_run / "checkpoints" / "last.ckpt", weights_only=True)


def auto_resume(output_dir: Path) -> str | None:
    found = resume_checkpoint(OmegaConf.create({"ckpt_path": "auto", "paths": {"output_dir": str(output_dir)}}))
    return found and found[0]


def test_kills_during_real_writes_leave_whole_checkpoints_and_no_temporary_file_after_a_restart(
    tmp_path: Path, digits_run: Path
) -> None:
    folder = tmp_path / "checkpoints"
    path = folder / "last.ckpt"
    rng, step = random.Random(0), 0
    for _ in range(4):
        command = [sys.executable, "-c", WRITER, str(path), str(step), str(digits_run / "checkpoints" / "last.ckpt")]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # one save of this process is complete
        time.sleep(rng.uniform(0.0, 0.5))  # then somewhere in a later one: a save takes about that long
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = torch.load(path, weights_only=True)
        step = state["global_step"]
        assert torch.equal(state["w"], torch.full((16 * 2**20,), float(step)))
        # a kill while the replaced `last.prev.ckpt` is freed (the rename that drops it) can leave one hidden
        # temporary name; what a restarted run does first removes it, and resumes the newest checkpoint
        assert auto_resume(tmp_path) == str(path)
        assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []
        if step == 1 and not previous_path(path).exists():
            continue  # killed in the second save before it kept the first: no previous state exists yet
        # the file it replaced is whole too: the state before (or the same one, when the kill came between
        # keeping it and putting the new one in place)
        assert torch.load(previous_path(path), weights_only=True)["global_step"] in (step - 1, step)


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, caplog, ours: dict) -> None:
    folder = tmp_path / "checkpoints"
    io = AtomicCheckpointIO()
    for step in (1, 2):
        io.save_checkpoint({**ours, "global_step": step, "w": torch.ones(1000) * step}, folder / "last.ckpt")
    assert auto_resume(tmp_path) == str(folder / "last.ckpt")
    newest = (folder / "last.ckpt").read_bytes()
    (folder / "last.ckpt").write_bytes(newest[: len(newest) // 2])  # a disk that filled up mid-copy
    with caplog.at_level(logging.WARNING):
        found = auto_resume(tmp_path)
    assert found == str(previous_path(folder / "last.ckpt"))
    assert torch.load(found, weights_only=True)["global_step"] == 1
    assert "last.ckpt" in caplog.text and "previous" in caplog.text

    previous_path(folder / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        auto_resume(tmp_path)


def test_a_stale_temporary_file_of_a_killed_save_is_removed_on_resume(tmp_path: Path, ours: dict) -> None:
    folder = tmp_path / "checkpoints"
    AtomicCheckpointIO().save_checkpoint({**ours, "global_step": 3}, folder / "last.ckpt")
    (folder / ".last.ckpt.12345.tmp").write_bytes(b"half a checkpoint")
    assert auto_resume(tmp_path) == str(folder / "last.ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]


def test_results_are_written_whole_with_no_temporary_file(tmp_path: Path) -> None:
    write_results(tmp_path, {"status": "finished", "step": 1})
    write_results(tmp_path, {"status": "finished", "step": 2})
    assert json.loads((tmp_path / "results.json").read_text())["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
