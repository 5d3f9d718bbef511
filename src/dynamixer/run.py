"""The one place where a config becomes objects and a Trainer runs: train, evaluate."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from dynamixer.lit_module import ImageClassifier
from dynamixer.utils.complexity import count_gmacs, count_params
from dynamixer.utils.launch import check_devices, is_multirun, prepare_ddp_relaunch, release_distributed
from dynamixer.utils.results import write_results
from dynamixer.utils.tracking import close_loggers, configure_wandb

log = logging.getLogger(__name__)
# the EMA copy of the model is meant to stay in eval mode while the raw model trains
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def _overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, ImageClassifier]:
    """The data module and the LightningModule (with its backbone) described by `cfg`."""
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, num_classes=datamodule.num_classes, _convert_="all")
    built_for = tuple(getattr(model, "img_size", (datamodule.img_size,) * 2))
    if built_for != (datamodule.img_size,) * 2:
        raise ValueError(
            f"data.img_size={datamodule.img_size} but the model is built for {built_for[0]}x{built_for[1]} images: "
            f"set model.img_size (data.img_size follows it) instead of data.img_size"
        )
    # partial first: the objects and the plain run config passed next must not be re-instantiated
    module = instantiate(cfg.module, _partial_=True)(
        model=model,
        num_classes=datamodule.num_classes,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )
    return datamodule, module


def _resume_path(cfg: DictConfig) -> str | None:
    """`ckpt_path`: a checkpoint file, or `auto` for this run folder's `last.ckpt` when there is one."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return None
    if ckpt_path == "auto":
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path} does not exist: give the path of a .ckpt file (e.g. <run folder>/checkpoints/"
            "last.ckpt), or ckpt_path=auto to resume this run folder's last checkpoint when there is one"
        )
    return ckpt_path


def _monitor(trainer: L.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    return getattr(callback, "monitor", None)


def model_size(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter count and GMACs per image (at the size the model is built for)."""
    img_size = getattr(model, "img_size", None)
    gmacs = round(count_gmacs(model, (3, *img_size)), 4) if img_size else None
    return {"num_params": count_params(model), "gmacs": gmacs}


def summarize(module: ImageClassifier, trainer: L.Trainer, cfg: DictConfig, size: dict[str, Any]) -> dict[str, Any]:
    """The content of `results.json`: final and best validation metrics, best checkpoint, model size."""
    history, monitor = module.history, _monitor(trainer)
    best = max(history, key=lambda h: h.get(monitor, float("-inf"))) if history and monitor else None
    callback = trainer.checkpoint_callback
    return {
        "status": "finished",
        "final": history[-1] if history else None,
        "best": best,
        "monitor": monitor,
        "best_checkpoint": getattr(callback, "best_model_path", None) or None,
        "last_checkpoint": getattr(callback, "last_model_path", None) or None,
        **size,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "overrides": _overrides(),
        "output_dir": str(cfg.paths.output_dir),
    }


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit a model as `cfg` says and write `results.json` into the run folder.

    In a multirun, a failing job writes its error into its own `results.json` and the sweep goes on.
    """
    try:
        return _train(cfg)
    except Exception as err:
        if not is_multirun():
            raise
        log.exception("job failed; the sweep goes on")
        write_results(cfg.paths.output_dir, {"status": "failed", "error": f"{type(err).__name__}: {err}",
                                              "overrides": _overrides()})
        return {"status": "failed"}
    finally:
        release_distributed()


def _train(cfg: DictConfig) -> dict[str, Any]:
    prepare_ddp_relaunch()
    check_devices(cfg.trainer)
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    configure_wandb(cfg.get("logger"))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    size = model_size(module.model)
    for logger in trainer.loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), **{f"model/{k}": v for k, v in size.items()}})

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(cfg))
        results = summarize(module, trainer, cfg, size)
        if trainer.is_global_zero:
            path = write_results(cfg.paths.output_dir, results)
            log.info("results: %s", path)
            log.info("checkpoints: %s", Path(cfg.paths.output_dir) / "checkpoints")
            log.info("logs: %s", ", ".join(str(lg.log_dir or lg.save_dir) for lg in trainer.loggers) or "none")
    finally:
        close_loggers(trainer.loggers)
    return results


def load_run_config(ckpt_path: str, cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The config of the run that wrote `ckpt_path`, with `data` overrides of this command on top.

    The model is always the checkpoint's own; data can be pointed elsewhere (`data.data_dir=...`,
    `data.batch_size=...`, or a whole `data=...` choice).
    """
    if not ckpt_path or not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist: give the path of a checkpoint (.ckpt) file")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    stored = checkpoint.get("hyper_parameters", {}).get("run_config")
    if stored is None:
        raise ValueError(f"{ckpt_path} holds no run config: it was not written by dynamixer's train.py")
    run_cfg = OmegaConf.create(stored)
    with open_dict(run_cfg):
        for override in overrides:
            key = override.lstrip("+~").split("=", 1)[0]
            if key == "data" or key.startswith("data."):
                OmegaConf.update(run_cfg, key, OmegaConf.select(cfg, key), merge=False)
        run_cfg.paths = cfg.paths
    return run_cfg


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Validate the checkpoint `cfg.ckpt_path` on the val split with `cfg.weights` (raw or ema);
    print top-1/top-5 and write them to `<run folder>/eval.json`."""
    if cfg.weights not in ("raw", "ema"):
        raise ValueError(f"weights={cfg.weights} is not known: use weights=raw or weights=ema")
    run_cfg = load_run_config(cfg.ckpt_path, cfg, _overrides())
    datamodule, module = build(run_cfg)
    checkpoint = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=False)
    module.load_state_dict(checkpoint["state_dict"])
    if cfg.weights == "ema":
        if module.ema is None:
            raise ValueError(f"{cfg.ckpt_path} has no EMA weights (trained with module.ema_decay=null): use weights=raw")
        module.model.load_state_dict(module.ema.module.state_dict())
    module.ema = None  # evaluate one set of weights
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False)
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    results = {
        "checkpoint": str(cfg.ckpt_path),
        "weights": cfg.weights,
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "metrics": {k: float(v) for k, v in metrics.items()},
    }
    if trainer.is_global_zero:
        path = write_results(cfg.paths.output_dir, results, name="eval.json")
        for key, value in sorted(results["metrics"].items()):
            print(f"{key}: {value:.4f}")
        log.info("written: %s", path)
    return results
