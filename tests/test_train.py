"""End-to-end tests of train.py / test.py run as scripts (in a temporary folder), and of resuming a killed run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from dynamixer.callbacks import MetricsHistory
from dynamixer.run import build
from helpers import (
    DIGITS_TRAIN,
    QUIET_TRAIN,
    REPO,
    compose_train_config,
    finish,
    read_checkpoint,
    run_dir,
    run_script,
    start_script,
    wait_for,
)

pytestmark = pytest.mark.slow  # trains models or runs the scripts


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# digits end to end (train.py learning, test.py reproducing a checkpoint's validation): the README's own
# commands as written, tests/test_readme.py::test_the_readmes_cpu_runs_run_as_written


# --- the ImageNet layout ------------------------------------------------------------------------------


def test_train_imagenet_layout_on_a_tiny_tree(tmp_path, image_tree):
    args = [
        *QUIET_TRAIN,
        "data=imagenet",
        f"data.data_dir={image_tree}",
        "model.img_size=32",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer.max_epochs=1",
        "run_name=inet",
    ]
    run_script("train.py", args, cwd=tmp_path)
    folder = run_dir(tmp_path, "inet")
    results = read_json(folder / "results.json")
    assert results["status"] == "finished"
    assert results["epochs"] == 1 and results["global_step"] == 12 // 4  # 3 classes x 4 train images, batch 4
    final = results["final"]
    assert final["epoch"] == 0
    # 3 classes: top-1 and top-3 (top-5 is capped at the class count), over the 6 val images
    assert {"val/acc1", "val/acc3", "val/loss"} <= final.keys() and "val/acc5" not in final
    assert final["val/acc1"] * 6 == pytest.approx(round(final["val/acc1"] * 6), abs=1e-4)
    ckpt = read_checkpoint(folder / "checkpoints" / "last.ckpt")
    assert ckpt["state_dict"]["model.head.weight"].shape[0] == 3
    run_config = ckpt["hyper_parameters"]["run_config"]
    assert run_config["data"]["_target_"].endswith("ImageFolderDataModule")
    assert Path(run_config["data"]["data_dir"]) == image_tree
    # what made it: the package versions and the code's commit, in results.json and the checkpoint
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert results["git"]["commit"] == head.strip() and isinstance(results["git"]["dirty"], bool), results["git"]
    assert results["torch_build"]["version"] == torch.__version__ and results["versions"]["lightning"] == L.__version__
    assert ckpt["provenance"] == {k: results[k] for k in ("versions", "torch_build", "git")}


# --- command line -------------------------------------------------------------------------------------


def test_help_lists_the_config_groups(tmp_path):
    proc = run_script("train.py", ["--help"], cwd=tmp_path)
    out = proc.stdout
    for group, options in (
        ("model", "dynamixer_l, dynamixer_m, dynamixer_s, dynamixer_tiny"),
        ("data", "cifar, digits, hf, imagenet, imagenet_loader, wds"),
        ("optimizer", "adamw, sgd"),
        ("hardware", "cpu, default, gpu, gpu8_ddp, slurm, slurm_cpu"),
    ):
        assert re.search(rf"^{group}: {options}$", out, re.MULTILINE), f"--help does not list {group}: {options}"
    assert not (tmp_path / "logs").exists(), "--help started a run"


# --- checkpoints and resuming (a SIGKILL and the exact resume after it: tests/test_faults.py) ----------


def test_default_checkpointing_writes_last_ckpt_at_every_epoch(tmp_path):
    """`last.ckpt` is what `ckpt_path=auto` resumes from: it must hold the latest epoch even when the monitored
    metric stops improving (here: lr 0, so val/acc1 never moves after the first epoch)."""
    cfg = compose_train_config(
        [
            "callbacks.progress_bar=null",
            "callbacks.model_summary=null",
            "callbacks.lr_monitor=null",
            "optimizer.lr=0",
            "scheduler.warmup_epochs=0",
            "scheduler.warmup_lr=0",
            "scheduler.min_lr=0",
            "module.ema_decay=null",
            "trainer.max_epochs=3",
            "++trainer.limit_train_batches=1",
            "++trainer.limit_val_batches=1",
        ],
        output_dir=tmp_path,
    )
    L.seed_everything(0)
    datamodule, module = build(cfg)
    history = MetricsHistory()
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None] + [history]
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)

    accs = [h["val/acc1"] for h in history.history]
    assert len(accs) == 3 and len(set(accs)) == 1  # the premise: no improvement after epoch 0
    last = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (2, 3), (
        f"last.ckpt holds epoch {last['epoch']} (step {last['global_step']}), not the last epoch 2 (step 3)"
    )
    assert [h["epoch"] for h in last["callbacks"]["MetricsHistory"]["history"]] == [0, 1, 2]


def count_reads_args(counts: Path, first: int, steps: int) -> list[str]:
    """train.py overrides that count the host reads of `steps` steps from step `first` into `counts`."""
    args = ["+callbacks.host_syncs._target_=dynamixer.callbacks.HostSyncCounter"]
    return args + [f"+callbacks.host_syncs.{k}={v}" for k, v in (("first", first), ("steps", steps), ("out", counts))]


def assert_reads_only_at_log_intervals(counts: Path, first: int, steps: int, most: int) -> None:
    """`counts` (HostSyncCounter's) holds no read in a step between two log intervals (every 10), and 1 to
    `most` at each interval."""
    reads = json.loads(counts.read_text())["host_reads"]
    assert len(reads) == steps, reads
    # reads[i] belongs to the step that took global step first + i to first + i + 1
    at_log = {i: n for i, n in enumerate(reads) if (first + i + 1) % 10 == 0}
    between = [n for i, n in enumerate(reads) if i not in at_log]
    assert between == [0] * len(between), str(reads)
    assert all(0 < n <= most for n in at_log.values()), reads


def test_a_steady_training_step_reads_nothing_back_from_the_device(tmp_path):
    """The default digits run (validation off): counted in its main process (`HostSyncCounter`: every
    `aten._local_scalar_dense`, i.e. `.item()`, `bool(t)`), a step between two log intervals reads nothing from
    the device; a step at a log interval (every 10) reads the divergence check's flag and the logged loss.
    Before: 35 reads a step (torchvision's Normalize checking std per image, the loss in the progress bar,
    the divergence check every step)."""
    counts, first, steps = tmp_path / "reads.json", 5, 30  # after the first steps: three log intervals
    args = [*QUIET_TRAIN, "trainer.limit_val_batches=0", "trainer.max_epochs=1", "run_name=reads"]
    run_script("train.py", [*args, *count_reads_args(counts, first, steps)], cwd=tmp_path)
    assert_reads_only_at_log_intervals(counts, first, steps, most=3)


def test_under_ddp_a_steady_step_reads_nothing_back_and_a_stop_lands_on_a_step_the_ranks_decided_at(tmp_path):
    """Two CPU ranks (DDP over gloo): the ranks decide together whether to stop (an all-reduce and a read of
    its result) every 10 steps (`callbacks.stop_on_signal.every_n_steps`, the log interval here too) and at
    each epoch's end, not after every step as before, and Lightning's own per-step broadcast of its stop flag
    is gone. A SIGTERM to rank 0 in between stops both ranks at the next such step, saved there."""
    # steps 3 to 21 of the first epoch (22 steps a rank: its end reads the epoch's metrics), two log intervals
    counts, first, steps = tmp_path / "reads.json", 3, 18
    args = [*QUIET_TRAIN, "hardware=cpu", "trainer.devices=2", "trainer.limit_val_batches=0"]
    args += ["trainer.max_epochs=3", "run_name=ddp_reads", *count_reads_args(counts, first, steps)]
    proc = start_script("train.py", args, tmp_path)
    folder = run_dir(tmp_path, "ddp_reads")
    wait_for(counts.exists, proc)  # 21 steps done, the count written
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, expect=128 + signal.SIGTERM)
    assert_reads_only_at_log_intervals(counts, first, steps, most=4)  # and the stop decision's read
    stopped = read_json(folder / "results.json")
    assert stopped["status"] == "interrupted", out[-3000:]
    epoch_steps = DIGITS_TRAIN // (32 * 2)  # 22
    assert stopped["global_step"] % 10 == 0 or stopped["global_step"] % epoch_steps == 0, stopped
    assert stopped["global_step"] >= first + steps, stopped
    assert read_checkpoint(folder / "checkpoints" / "last.ckpt")["global_step"] == stopped["global_step"]
