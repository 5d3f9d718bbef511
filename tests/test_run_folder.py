"""A run's folder belongs to that run, and a resume trains what was trained before: a fresh start refuses a
folder that holds a run and leaves it as it was; a resume that changes what is trained is refused naming
each key; `extend=true` trains longer on the schedule rebuilt for the new length."""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from dynamixer.machinery.run_folder import RunFolderError, claim_run_folder
from dynamixer.schedules import cosine_with_warmup
from helpers import QUIET_FAST, QUIET_TRAIN, compose_job_config, compose_train_config, files_state, run_dir

STEPS_PER_EPOCH = 4
RUN = [
    *QUIET_TRAIN,
    "run_name=a",
    f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "scheduler.warmup_epochs=1",
    "callbacks.mixing_figures=null",
]


@pytest.fixture
def two_epochs(tmp_path: Path, entry) -> Path:
    """A finished 2-epoch run `a` in `tmp_path`; returns its folder."""
    code, _, err = entry("train.py", [*RUN, "trainer.max_epochs=2"], tmp_path)
    assert code == 0, err[-3000:]
    return run_dir(tmp_path, "a")


def test_a_fresh_start_in_a_run_folder_is_refused_and_changes_nothing(two_epochs, tmp_path, user_error) -> None:
    before = files_state(two_epochs)
    log = (two_epochs / "train.log").read_text()
    message = user_error("train.py", [*RUN, "trainer.max_epochs=1", "seed=1"], tmp_path)
    assert f"holds a run saved at step {2 * STEPS_PER_EPOCH}" in message
    assert "ckpt_path=auto" in message and "run_name=" in message
    after = files_state(two_epochs)
    assert after.pop("train.log")[0] >= before.pop("train.log")[0]  # Hydra's job log only grows
    assert (two_epochs / "train.log").read_text().startswith(log)
    assert after == before  # checkpoints, metrics.csv, results.json and .hydra/ as they were


def test_two_fresh_starts_cannot_share_a_folder_and_default_names_differ(tmp_path: Path) -> None:
    cfg = compose_train_config(["run_name=same"], tmp_path / "run")
    claim_run_folder(cfg, resuming=False)
    with pytest.raises(RunFolderError, match="holds a run"):
        claim_run_folder(cfg, resuming=False)  # the claim is exclusive (O_EXCL): one of two starts at once wins
    claim_run_folder(cfg, resuming=True)  # a resume takes its own folder
    names = {compose_train_config().run_name for _ in range(3)}
    assert len(names) == 3  # to the microsecond (Hydra's `now` is cached per pattern: new compositions differ)


def test_a_resume_that_changes_what_is_trained_is_refused_naming_each_key(two_epochs, tmp_path, user_error) -> None:
    resume = [*RUN, "trainer.max_epochs=2", "ckpt_path=auto"]
    message = user_error("train.py", [*resume, "trainer.max_epochs=4", "optimizer.lr=1e-4"], tmp_path)
    assert "optimizer.lr: 0.002 -> 0.0001" in message and "trainer.max_epochs: 2 -> 4" in message
    assert "extend=true" in message
    message = user_error("train.py", [*resume, "optimizer=sgd"], tmp_path)
    assert "optimizer._target_: 'torch.optim.AdamW' -> 'torch.optim.SGD'" in message
    message = user_error("train.py", [*resume, "module.ema_decay=null"], tmp_path)
    assert "module.ema_decay: 0.999 -> None" in message
    trainer = ("trainer.accumulate_grad_batches=2", "trainer.limit_train_batches=1.0", "trainer.precision=bf16-mixed")
    for change in ("data.batch_size=16", "model.segments=2", "seed=7", *trainer):
        assert change.split("=")[0] in user_error("train.py", [*resume, change], tmp_path)


def test_a_resume_accepts_what_does_not_change_training(two_epochs, tmp_path, entry) -> None:
    args = [*RUN, "trainer.max_epochs=2", "ckpt_path=auto", "data.num_workers=1", "callbacks.lr_monitor=null"]
    args += ["trainer.log_every_n_steps=2", "trainer.num_sanity_val_steps=1"]  # how it runs, not what it trains
    code, _, err = entry("train.py", args, tmp_path)
    assert code == 0, err[-3000:]


def logged_lr(folder: Path) -> dict[int, float]:
    """The lr of the first parameter group, as the LearningRateMonitor logged it at each step."""
    with open(folder / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")]
    return {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in rows}


def test_extend_trains_longer_on_the_schedule_rebuilt_for_the_new_length(two_epochs, tmp_path, entry) -> None:
    code, _, err = entry("train.py", [*RUN, "trainer.max_epochs=4", "ckpt_path=auto", "extend=true"], tmp_path)
    assert code == 0, err[-3000:]
    resumed = 2 * STEPS_PER_EPOCH
    # timm's cosine over 4 epochs, as the config builds it (lr 2e-3, warm-up 1 epoch from 1e-6, floor 1e-5)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-3)
    schedule = functools.partial(cosine_with_warmup, steps_per_epoch=STEPS_PER_EPOCH, warmup_epochs=1)
    four, two = (schedule(optimizer, max_epochs=n, min_lr=1e-5, warmup_lr=1e-6) for n in (4, 2))
    lrs = logged_lr(two_epochs)
    assert sorted(lrs) == list(range(4 * STEPS_PER_EPOCH))  # every step once: the first 2 epochs, then 2 more
    for step, lr in lrs.items():
        # before the resume the 2-epoch schedule, after it the 4-epoch one (not the old floor)
        expected = (two if step < resumed else four)._get_lr(step)[0]
        assert lr == pytest.approx(expected, rel=1e-6), step
    assert lrs[resumed] > 5 * lrs[resumed - 1]  # the old schedule had reached its floor
    results = json.loads((two_epochs / "results.json").read_text())
    assert results["global_step"] == 4 * STEPS_PER_EPOCH
    assert results["schedule_extended"] == {"at_step": resumed, "changed": {"trainer.max_epochs": [2, 4]}}


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_run_folder_holding_links_is_refused_and_nothing_is_written_through_them(
    link: str, digits_run: Path, tmp_path: Path, user_error
) -> None:
    """A run folder received from someone else whose logs are links to files outside (or other names of them):
    the resume names the links, and the files they point to are as they were."""
    outside = tmp_path / "outside"
    outside.mkdir()
    folder = run_dir(tmp_path, "r")
    shutil.copytree(digits_run, folder)
    for inside in ("csv/hparams.yaml", "csv/metrics.csv", "train.log"):
        target = outside / Path(inside).name
        target.write_text(f"someone's {target.name}\n")
        (folder / inside).unlink(missing_ok=True)
        (folder / inside).symlink_to(target) if link == "symbolic" else os.link(target, folder / inside)
    if link == "symbolic":  # a link to a file that does not exist yet is not created through either
        (folder / ".hydra" / "config.yaml").unlink()
        (folder / ".hydra" / "config.yaml").symlink_to(outside / "planted.yaml")
    before = files_state(outside)
    message = user_error("train.py", [*QUIET_FAST, "run_name=r", "ckpt_path=auto"], tmp_path)
    assert "holds links" in message and "csv/metrics.csv" in message and "train.log" in message
    assert files_state(outside) == before


def test_links_that_stay_inside_the_run_folder_resume(digits_run: Path, tmp_path: Path, entry) -> None:
    """Links within the run folder keep writes in it; W&B's folder is its own (its latest run, its logs linked to
    the user's cache)."""
    folder = run_dir(tmp_path, "r")
    shutil.copytree(digits_run, folder)
    (folder / "csv" / "latest.csv").symlink_to("metrics.csv")
    (folder / "wandb").mkdir()
    (folder / "wandb" / "debug-core.log").symlink_to(tmp_path / "cache-of-wandb.log")
    (folder / "wandb" / "run-1" / "logs").mkdir(parents=True)  # W&B's own links
    (folder / "wandb" / "run-1" / "logs" / "debug.log").write_text("")
    (folder / "wandb" / "latest-run").symlink_to("run-1", target_is_directory=True)
    (folder / "wandb" / "debug.log").symlink_to(folder / "wandb" / "run-1" / "logs" / "debug.log")
    code, _, err = entry(
        "train.py", [*QUIET_FAST, "run_name=r", "ckpt_path=auto", "extend=true", "trainer.max_epochs=3"], tmp_path
    )
    assert code == 0, err[-3000:]


def test_a_checkpoint_of_another_run_is_refused_in_a_folder_that_holds_a_run(
    digits_run: Path, tmp_path: Path, user_error, entry
) -> None:
    """`ckpt_path=<run a's last.ckpt>` with the folder of run b: refused naming both, b as it was; b's own
    checkpoint resumes there."""
    a, b = run_dir(tmp_path, "a"), run_dir(tmp_path, "b")
    shutil.copytree(digits_run, a)
    shutil.copytree(digits_run, b)
    other = uuid.uuid4().hex  # b: another run, its id in its claim and in its checkpoints
    claim = json.loads((b / ".dynamixer-run").read_text())
    (b / ".dynamixer-run").write_text(json.dumps({**claim, "run_id": other}))
    for path in (b / "checkpoints").glob("*.ckpt"):
        torch.save({**torch.load(path, weights_only=True), "run_id": other}, path)
    before = files_state(b)
    message = user_error(
        "train.py", [*QUIET_FAST, "run_name=b", f"ckpt_path={a / 'checkpoints' / 'last.ckpt'}"], tmp_path
    )
    assert str(b) in message and other in message and "another run" in message
    assert files_state(b) == before
    code, _, err = entry(
        "train.py", [*QUIET_FAST, "run_name=b", "ckpt_path=auto", "extend=true", "trainer.max_epochs=3"], tmp_path
    )
    assert code == 0, err[-3000:]
    assert torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)["run_id"] == other


def test_results_name_the_best_epoch_by_the_monitors_mode(tmp_path: Path) -> None:
    """`best` in results.json is the epoch the checkpoint callback kept: with val/loss, the lowest."""
    from dynamixer.run import train

    monitor = ["callbacks.model_checkpoint.monitor=val/loss", "callbacks.model_checkpoint.mode=min"]
    results = train(compose_job_config([*QUIET_FAST, "trainer.max_epochs=3", *monitor], tmp_path / "run"))
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    losses = [h["val/loss"] for h in last["callbacks"]["MetricsHistory"]["history"]]
    assert len(set(losses)) == 3 and results["best"]["val/loss"] == min(losses)
    assert results["best_checkpoint"].endswith(f"step{results['best']['step']:06d}.ckpt")
