"""Checkpoint and results writes that a kill cannot tear, and resuming from the newest readable state."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dynamixer.errors import CheckpointError
from dynamixer.machinery.checkpoint_io import AtomicCheckpointIO
from dynamixer.machinery.files import previous_path
from dynamixer.run.checkpoints import resume_checkpoint
from dynamixer.utils.results import write_results

# a child that makes saves 1, 2, ... of a real checkpoint through the real writer and is killed (SIGKILL, by
# itself) at one point of save `kill_in`: each point a fault-injection hook, so the kill lands exactly there
WRITER = """
import os, signal, sys, torch
from dynamixer.machinery import checkpoint_io as cio, files
path, ours, kill_in, point = sys.argv[1], torch.load(sys.argv[2], weights_only=True), int(sys.argv[3]), sys.argv[4]
die = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
io = cio.AtomicCheckpointIO()
for step in range(1, kill_in):
    io.save_checkpoint({**ours, "global_step": step, "w": torch.full((2**20,), float(step))}, path)
if point == "writing":  # in the middle of the bytes of the new file
    write, written = cio._Writes.write, []
    cio._Writes.write = lambda self, data: (written.append(1), len(written) == 3 and die(), write(self, data))[2]
elif point == "kept":  # the replaced file kept as last.prev.ckpt, the new one not yet named
    keep = files._keep_previous
    files._keep_previous = lambda target: (keep(target), die())
elif point == "named":  # the new file named (a hidden temporary name), not yet renamed over last.ckpt
    replace = os.replace
    os.replace = lambda a, b: die() if str(b) == path else replace(a, b)
elif point == "renamed":  # in place, the folder not yet synced
    files._fsync_folder = die
io.save_checkpoint({**ours, "global_step": kill_in, "w": torch.full((2**20,), float(kill_in))}, path)
"""

# (save killed, point) -> the steps last.ckpt and last.prev.ckpt then hold (None: absent)
LEFT = {
    (1, "writing"): (None, None),
    (1, "named"): (None, None),
    (2, "writing"): (1, None),  # the second save of a run, killed before it kept the first: no previous yet
    (2, "kept"): (1, 1),
    (3, "writing"): (2, 1),
    (3, "kept"): (2, 2),
    (3, "named"): (2, 2),
    (3, "renamed"): (3, 2),
}


@pytest.fixture(scope="module")
def ours(digits_run: Path) -> dict:
    """A real training checkpoint's content: what the reader takes as one of ours."""
    return torch.load(digits_run / "checkpoints" / "last.ckpt", weights_only=True)


def auto_resume(output_dir: Path) -> str | None:
    found = resume_checkpoint(OmegaConf.create({"ckpt_path": "auto", "paths": {"output_dir": str(output_dir)}}))
    return found and found[0]


def saved_step(path: Path) -> int | None:
    if not path.exists():
        return None
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["w"], torch.full((2**20,), float(state["global_step"])))  # whole
    return state["global_step"]


@pytest.mark.slow  # a real process killed at each point
@pytest.mark.parametrize(("kill_in", "point"), list(LEFT), ids=[f"save{k}-{p}" for k, p in LEFT])
def test_a_kill_at_each_point_of_a_save_leaves_whole_checkpoints_and_a_restart_removes_the_rest(
    kill_in: int, point: str, tmp_path: Path, digits_run: Path
) -> None:
    folder = tmp_path / "checkpoints"
    path = folder / "last.ckpt"
    command = [sys.executable, "-c", WRITER, str(path), str(digits_run / "checkpoints" / "last.ckpt")]
    proc = subprocess.run([*command, str(kill_in), point], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # killed at that point, not before or after
    assert (saved_step(path), saved_step(previous_path(path))) == LEFT[kill_in, point]
    # what a restarted run does first removes a hidden temporary name, and resumes the newest checkpoint
    assert auto_resume(tmp_path) == (str(path) if LEFT[kill_in, point][0] else None)
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


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
