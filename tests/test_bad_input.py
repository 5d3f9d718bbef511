"""Every bad input a user can give to the entry points, and the clear error it gets (one test each).

Each case runs an entry point's `main` in process as `python train.py <overrides>` would (the command
line, Hydra, the run layer): the error must come before any training step, alone on stderr with no
traceback, exit status 2, and name the value and the fix. Bugs keep their traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dynamixer.run import train
from helpers import IMAGENET, QUIET_FAST, REPO, compose_job_config, entry_point, script_env, write_image_tree

QUIET_CSV = [*QUIET_FAST, "logger=csv"]


def run_train(tmp_path: Path, *overrides: str) -> dict:
    return train(compose_job_config([*QUIET_CSV, *overrides], tmp_path / "run"))


def tiny_checkpoint(tmp_path: Path) -> Path:
    """A real training checkpoint of the default dynamixer_tiny (10 classes)."""
    run_train(tmp_path / "ckpt", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1")
    return tmp_path / "ckpt" / "run" / "checkpoints" / "last.ckpt"


def corrupt_tree(tmp_path: Path, index: int = 0) -> Path:
    """Two classes of 4 train and 4 val images; the train image `n02_000<index>.JPEG` cut to a third."""
    root = write_image_tree(tmp_path / "data", ["n01", "n02"], train_per_class=4, val_per_class=4)
    bad = root / "train" / "n02" / f"n02_{index:04d}.JPEG"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 3])
    return root


# (name, overrides given the tmp path, fragments the message must hold)
CASES: list[tuple[str, Callable[[Path], list[str]], list[str]]] = [
    ("missing data folder", lambda t: [*IMAGENET, f"data.data_dir={t / 'nowhere'}"], ["nowhere", "does not exist"]),
    ("the base of the ImageNet sources", lambda t: ["data=imagenet_loader"], ["no data module", "data=imagenet"]),
    ("empty data folder", lambda t: [*IMAGENET, f"data.data_dir={(t / 'empty').mkdir() or t / 'empty'}"], ["train"]),
    (
        "train/val classes differ",
        lambda t: [*IMAGENET, f"data.data_dir={write_image_tree(t / 'd', ['n01', 'n02'], val_classes=['n01', 'n03'])}"],
        ["n02", "n03"],
    ),
    ("corrupt JPEG", lambda t: [*IMAGENET, f"data.data_dir={corrupt_tree(t)}"], ["n02_0000.JPEG", "skip_corrupt"]),
    (
        "corrupt JPEG read by a loader worker",
        lambda t: ["data=imagenet", "data.num_workers=1", "data.batch_size=2", f"data.data_dir={corrupt_tree(t)}"],
        ["cannot read image", "n02_0000.JPEG", "skip_corrupt"],
    ),
    ("unknown group option", lambda t: ["model=dynamixer_xxl"], ["dynamixer_xxl", "dynamixer_tiny"]),
    ("unknown key", lambda t: ["trainer.max_epoch=3"], ["max_epoch"]),
    ("ckpt_path that does not exist", lambda t: [f"ckpt_path={t / 'gone.ckpt'}"], ["gone.ckpt", "ckpt_path=auto"]),
    (
        "checkpoint of another variant",
        lambda t: [f"ckpt_path={tiny_checkpoint(t)}", "model.segments=2"],
        ["trains other settings than", "model.segments: None -> 2", "model.pretrained_file=<checkpoint>"],
    ),
    (
        "checkpoint of another class count",
        lambda t: [
            f"ckpt_path={tiny_checkpoint(t)}",
            *IMAGENET,
            f"data.data_dir={write_image_tree(t / 'three', ['a', 'b', 'c'])}",
        ],
        ["data._target_: 'dynamixer.data.DigitsDataModule' -> 'dynamixer.data.ImageFolderDataModule'"],
    ),
    (
        "resume with another batch size",
        lambda t: [f"ckpt_path={tiny_checkpoint(t)}", "data.batch_size=16"],
        ["trains other settings than", "data.batch_size: 32 -> 16"],
    ),
    ("segments that do not divide a width", lambda t: ["model.segments=6"], ["segments=6", "not divisible", "one of"]),
    ("reduced_dim that is not positive", lambda t: ["model.reduced_dim=0"], ["reduced_dim", "positive integer"]),
    ("per-stage list of the wrong length", lambda t: ["model.segments=[4,8]"], ["4 stages"]),
    (
        "image size the model is not built for",
        lambda t: ["data.img_size=64"],
        ["data.img_size=64", "16x16", "model.img_size"],
    ),
    ("image size the patch cannot divide", lambda t: ["model.img_size=30"], ["img_size=(30, 30)", "patch_size=4"]),
    ("GPUs this machine does not have", lambda t: ["trainer.devices=8"], ["8 GPU(s)", "hardware=cpu"]),
    ("no devices", lambda t: ["trainer.devices=0"], ["trainer.devices=0", "trainer.devices=1"]),
    ("a value Lightning refuses", lambda t: ["trainer.limit_val_batches=-1"], ["trainer:", "-1 for limit_val_batches"]),
    ("missing pretrained_file", lambda t: [f"model.pretrained_file={t / 'gone.pth'}"], ["gone.pth", "does not exist"]),
    ("truncated ckpt_path", lambda t: [f"ckpt_path={truncated(t)}"], ["cut.ckpt", "cannot be read"]),
    ("truncated pretrained_file", lambda t: [f"model.pretrained_file={truncated(t)}"], ["cut.ckpt", "cannot be read"]),
    ("seed that is no number", lambda t: ["seed=abc"], ["seed=abc", "integer"]),
    ("one class", lambda t: ["data.classes=[3]"], ["one class (['3'])", "two classes", "data.classes="]),
    ("val_fraction too small", lambda t: ["data.val_fraction=0.001"], ["val_fraction=0.001", "each class"]),
    (
        "time interval without a unit",
        lambda t: ["callbacks.last_checkpoint.train_time_interval=30"],
        ["train_time_interval=30", "minutes: 30"],
    ),
    ("misspelled new data key", lambda t: ["+data.bacth_size=8"], ["data.bacth_size", "batch_size"]),
    ("unknown requeue signal", lambda t: ["callbacks.stop_on_signal.requeue_on=[SIGFOO]"], ["SIGFOO", "SIGUSR2"]),
    (
        "EMA off while its metric is monitored",
        lambda t: ["module.ema_decay=null", "callbacks.model_checkpoint.monitor=val/ema_acc1"],
        ["val/ema_acc1", "module.ema_decay=null", "monitor=val/acc1"],
    ),
    ("output folder that cannot be made", lambda t: [f"paths.log_dir={blocked(t)}/logs"], ["blocked", "paths.log_dir"]),
    ("empty ckpt_path", lambda t: [f"ckpt_path={empty(t)}"], ["empty.ckpt", "cannot be read"]),
    ("empty pretrained_file", lambda t: [f"model.pretrained_file={empty(t)}"], ["empty.ckpt", "cannot be read"]),
    ("a value of another type", lambda t: ["optimizer.lr=x"], ["optimizer.lr='x'", "float"]),
    ("a value the optimizer refuses", lambda t: ["optimizer.lr=-1"], ["optimizer", "Invalid learning rate"]),
    ("a fusion that does not exist", lambda t: ["model.fusion=evil"], ["model.fusion='evil'", "reweight"]),
    (
        "a cool-down as long as the run",
        lambda t: ["scheduler.cooldown_epochs=2", "trainer.max_epochs=2"],
        ["scheduler:", "cooldown_epochs=2", "max_epochs=2"],
    ),
]


def empty(tmp_path: Path) -> Path:
    (tmp_path / "empty.ckpt").write_bytes(b"")
    return tmp_path / "empty.ckpt"


def truncated(tmp_path: Path) -> Path:
    """A training checkpoint cut to half its length, as a kill or a full disk during a copy leaves it."""
    data = tiny_checkpoint(tmp_path).read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.ckpt"


def blocked(tmp_path: Path) -> Path:
    """A file where a folder would have to be made."""
    (tmp_path / "blocked").write_text("a file, not a folder")
    return tmp_path / "blocked"


@pytest.mark.parametrize("name,overrides,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_message_and_exit_2(
    name, overrides, fragments, tmp_path: Path, monkeypatch, user_error
) -> None:
    from dynamixer.lit_module import ImageClassifier

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    steps = []
    step = ImageClassifier.training_step
    monkeypatch.setattr(ImageClassifier, "training_step", lambda self, *a: steps.append(1) or step(self, *a))
    args = overrides(tmp_path)  # a case's checkpoint is trained here, before the command counted below
    steps.clear()
    message = user_error("train.py", [*QUIET_CSV, *args, "run_name=bad"], tmp_path)
    for fragment in fragments:
        assert fragment in message, f"{name}: {fragment!r} not in {message!r}"
    # before any training step, but a corrupt image: it is met when the batch that holds it is read
    assert steps == [] or name.startswith("corrupt JPEG"), f"{name}: {len(steps)} training steps ran first"


@pytest.mark.parametrize(
    "script,args,fragments",
    [
        ("test.py", [], ["ckpt_path", "ckpt_path=..."]),
        ("test.py", ["ckpt_path=gone.ckpt"], ["ckpt_path=gone.ckpt does not exist"]),
        ("predict.py", ["ckpt_path=gone.ckpt", "inputs=x.png"], ["ckpt_path=gone.ckpt does not exist"]),
        ("predict.py", ["ckpt_path=gone.ckpt", "inputs=x.png", "batch_size=0"], ["batch_size=0", "1 or more"]),
    ],
)
def test_evaluation_entry_points_report_bad_input_the_same_way(script, args, fragments, tmp_path: Path, user_error):
    message = user_error(script, args, tmp_path)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    "override,fragments",
    [
        # found by the fuzz harness: each ended in a traceback, from inside the data module or Lightning's Trainer
        ("data.batch_size=x", ["data.batch_size", "'x'"]),
        ("trainer.limit_val_batches=-1", ["trainer:", "-1 for limit_val_batches"]),
    ],
)
def test_test_py_checks_the_commands_settings(override, fragments, digits_run: Path, tmp_path: Path, user_error):
    checkpoint = digits_run / "checkpoints" / "last.ckpt"
    message = user_error("test.py", [f"ckpt_path={checkpoint}", override], tmp_path)
    for fragment in fragments:
        assert fragment in message, message


def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch) -> None:
    """Anything that is not the user's to fix propagates as it is (Python prints its traceback)."""
    import dynamixer.run.training as training

    def broken(*args):
        raise KeyError("a bug")

    monkeypatch.setattr(training, "_train", broken)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", *QUIET_CSV])
    monkeypatch.delenv("DYNAMIXER_TRACES_ASKED", raising=False)
    from dynamixer.run.cli import run_main

    with pytest.raises(KeyError, match="a bug"):
        run_main(entry_point("train.py").main)


@pytest.mark.slow
def test_the_script_prints_the_message_alone_and_the_trace_on_request(tmp_path: Path) -> None:
    """As a user runs it: `python train.py model=dynamixer_s trainer.devices=8` on a machine without GPUs."""
    command = [sys.executable, str(REPO / "train.py"), "model=dynamixer_s", "trainer.devices=8"]
    env = {**script_env(), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("Error: trainer.devices=8") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    full = subprocess.run(
        command, cwd=tmp_path, env={**env, "HYDRA_FULL_ERROR": "1"}, capture_output=True, text=True, timeout=300
    )
    assert full.returncode != 0 and "Traceback" in full.stderr and "HardwareError" in full.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_jpeg_is_skipped_and_counted_when_asked(workers: int, tmp_path: Path) -> None:
    """Counted wherever it was found: in this process or in a loader worker."""
    results = run_train(
        tmp_path,
        *IMAGENET,
        f"data.num_workers={workers}",
        f"data.data_dir={corrupt_tree(tmp_path)}",
        "data.skip_corrupt=true",
        "trainer.limit_train_batches=4",
    )
    assert results["status"] == "finished"
    assert results["data"]["corrupt_files"] == [str(tmp_path / "data" / "train" / "n02" / "n02_0000.JPEG")]


def test_an_image_over_the_decompression_bomb_limit_gets_one_message(tmp_path: Path, monkeypatch, user_error) -> None:
    from PIL import Image

    root = write_image_tree(tmp_path / "data", ["n01", "n02"])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # the tree's 48x40 images are over twice that
    message = user_error("train.py", [*QUIET_CSV, *IMAGENET, f"data.data_dir={root}"], tmp_path)
    assert "MAX_IMAGE_PIXELS" in message and "skip_corrupt" in message


@pytest.mark.slow
@pytest.mark.parametrize("verify", [True, False])
def test_under_ddp_a_bad_image_ends_every_rank_with_its_message(verify: bool, tmp_path: Path) -> None:
    """Two CPU ranks. With data.verify=true each rank decodes its share and all stop together with one list of
    what any rank found (exit 2; the file is the 6th of the list, in rank 1's share, and rank 0 reports it);
    without it, rank 1, whose batch holds the file, prints its message and rank 0 ends with it (exit 2, no
    traceback) instead of waiting at the next collective forever."""
    root = corrupt_tree(tmp_path, index=1)
    args = [
        *QUIET_CSV,
        *IMAGENET,
        f"data.data_dir={root}",
        "hardware=cpu",
        "trainer.devices=2",
        f"data.verify={verify}",
    ]
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args, "run_name=ddp"],
        cwd=tmp_path,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "n02_0001.JPEG" in proc.stderr and "cannot" in proc.stderr, proc.stderr[-3000:]
    if verify:
        assert proc.returncode == 2 and "1 of 16 images" in proc.stderr, proc.stderr[-3000:]
    else:
        assert proc.returncode == 2 and "rank 1 ended with the error above" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_under_ddp_verify_drops_the_same_files_on_every_rank(tmp_path: Path) -> None:
    from helpers import run_script

    root = corrupt_tree(tmp_path)
    args = [*QUIET_CSV, *IMAGENET, f"data.data_dir={root}", "hardware=cpu", "trainer.devices=2", "data.verify=true"]
    run_script("train.py", [*args, "data.skip_corrupt=true", "run_name=ddp"], tmp_path)
    results = json.loads((tmp_path / "logs/train/runs/ddp/results.json").read_text())
    assert results["status"] == "finished"
    assert results["data"]["corrupt_files"] == [str(root / "train" / "n02" / "n02_0000.JPEG")]


@pytest.mark.slow
def test_under_ddp_ranks_that_list_different_data_stop_together(tmp_path: Path) -> None:
    """Rank 0 lists the data, the others check the listing against what they see; here rank 1 is given another
    tree (its LOCAL_RANK picks the folder), as a node with another copy: every rank stops, with one message
    before any step."""
    small = write_image_tree(tmp_path / "d0", ["n01", "n02"], train_per_class=4)
    large = write_image_tree(tmp_path / "d1", ["n01", "n02"], train_per_class=5)
    data_dir = "data.data_dir='${oc.env:DATA_${oc.env:LOCAL_RANK,0}}'"  # quoted: resolved in each rank
    args = [*QUIET_CSV, *IMAGENET, data_dir, "hardware=cpu", "trainer.devices=2", "run_name=ddp"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=tmp_path,
        env={**script_env(), "DATA_0": str(small), "DATA_1": str(large)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    messages = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(messages) == 1, proc.stderr[-3000:]  # rank 0 prints it; rank 1 stops with it, quietly
    assert messages[0].startswith("Error: rank 1: the data it sees is not what rank 0 listed"), messages
    assert "Give every rank the same data" in proc.stderr
    assert "train/n02: 4 images and 0 folders then, 5 and 0 now" in proc.stderr and "Traceback" not in proc.stderr
