"""W&B tracking: offline without an API key, the run's config and metrics, a complete offline folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import wandb
from omegaconf import open_dict

from dynamixer.run import train
from dynamixer.utils.tracking import wandb_api_key_configured
from helpers import compose_job_config

pytestmark = pytest.mark.slow  # trains models or runs the scripts


@pytest.fixture
def no_wandb_login(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / ".config" / "wandb"))


def test_api_key_detection(no_wandb_login: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not wandb_api_key_configured()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_api_key_configured()
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert wandb_api_key_configured()


def test_wandb_run_offline_holds_config_and_metrics(
    no_wandb_login: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_job_config(
        [
            "logger=wandb",
            "debug=fast",
            "logger.wandb.tags=[ablation]",
            "logger.wandb.group=g1",
            "callbacks.progress_bar=null",
            "callbacks.model_summary=null",
        ],
        tmp_path / "run",
    )
    with open_dict(cfg):  # debug=fast turns the pictures off; here: after each of its 2 epochs
        cfg.callbacks.mixing_figures = FIGURES_EVERY_EPOCH

    seen = {}
    finish = wandb.sdk.wandb_run.Run.finish

    def record_then_finish(run, *args, **kwargs):  # what the run holds just before it closes
        seen.update(
            config=dict(run.config),
            summary=dict(run.summary),
            offline=run.offline,
            tags=run.tags,
            group=run.group,
            dir=Path(run.dir).parent,
            id=run.id,
        )
        return finish(run, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "finish", record_then_finish)
    results = train(cfg)

    assert seen["offline"]  # no API key: never blocks on a login or a network
    assert seen["tags"] == ("ablation",) and seen["group"] == "g1"
    config = seen["config"]
    assert config["model"]["model_name"] == "dynamixer_tiny"  # the resolved Hydra config
    assert config["model/num_params"] == results["num_params"] == 844_046
    assert config["model/gmacs"] == pytest.approx(results["gmacs"])
    summary = seen["summary"]
    for key in ("val/acc1", "val/ema_acc1", "val/loss"):
        assert summary[key] == pytest.approx(results["final"][key])
    assert summary["epoch"] == results["final"]["epoch"] == 1
    assert {"train/throughput", "lr-AdamW/pg1", "lr-AdamW/pg2", "train/loss_epoch"} <= set(summary), sorted(summary)
    for key in ("mixing/matrices", "mixing/branch_weights"):  # the pictures of what the model generates
        assert summary[key]["_type"] in ("images/separated", "image-file") and summary[key]["count"] == 1, summary[key]

    run_dir = seen["dir"]  # <output_dir>/wandb/offline-run-*: what `wandb sync` uploads
    assert run_dir.parent == tmp_path / "run" / "wandb" and run_dir.name.startswith("offline-run-")
    assert (run_dir / f"run-{seen['id']}.wandb").stat().st_size > 1000
    assert (run_dir / "files" / "output.log").is_file() and (run_dir / "logs" / "debug.log").is_file()
    pictures = sorted((run_dir / "files" / "media" / "images" / "mixing").glob("*.png"))
    assert len(pictures) == 4 and all(p.stat().st_size > 5000 for p in pictures), pictures  # 2 figures x 2 epochs
    assert wandb.run is None  # finished, so a next multirun job opens its own run

    # resumed with more epochs: the same W&B run continues (its id is kept in the run folder)
    first_id = seen["id"]
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() == first_id
    with open_dict(cfg):
        cfg.ckpt_path = "auto"
        cfg.trainer.max_epochs = 3
        cfg.extend = True  # a longer run: the schedule is rebuilt for it
    seen.clear()
    resumed = train(cfg)
    assert resumed["epochs"] == 3 and seen["id"] == first_id and seen["summary"]["epoch"] == 2


FIGURES_EVERY_EPOCH = {"_target_": "dynamixer.callbacks.MixingFigures", "every_n_epochs": 1, "num_images": 2}


def test_tensorboard_receives_the_mixing_pictures_every_n_epochs(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_job_config(
        ["logger=tensorboard", "debug=fast", "trainer.max_epochs=4", "callbacks.progress_bar=null"],
        tmp_path / "run",
    )
    with open_dict(cfg):
        cfg.callbacks.mixing_figures = {**FIGURES_EVERY_EPOCH, "every_n_epochs": 2}
    results = train(cfg)
    (events,) = (tmp_path / "run").rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0}).Reload()
    assert set(accumulator.Tags()["images"]) == {"mixing/matrices", "mixing/branch_weights"}
    steps_per_epoch = results["global_step"] // 4
    for tag in ("mixing/matrices", "mixing/branch_weights"):
        images = accumulator.Images(tag)
        assert [i.step for i in images] == [2 * steps_per_epoch, 4 * steps_per_epoch]  # after epochs 2 and 4
        assert all(i.width > 300 and i.height > 200 for i in images)
