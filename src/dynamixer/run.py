"""The one place where a config becomes objects and a Trainer runs: train, evaluate."""

from __future__ import annotations

import logging
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from dynamixer.callbacks import MetricsHistory
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


def _instantiate(node: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, re-raising our own clear errors (bad values, missing files) as they are,
    without Hydra's wrapper around them."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, (ValueError, OSError)):
            raise err.__cause__ from None
        raise


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, ImageClassifier]:
    """The data module and the LightningModule (with its backbone) described by `cfg`."""
    datamodule = _instantiate(cfg.data)
    model = _instantiate(cfg.model, num_classes=datamodule.num_classes, _convert_="all")
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
        data_info={
            "class_names": list(datamodule.class_names),
            "img_size": datamodule.img_size,
            "crop_pct": datamodule.crop_pct,
            "interpolation": datamodule.interpolation,
            "mean": list(datamodule.mean),
            "std": list(datamodule.std),
        },
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


def _describe(model_cfg: Any, num_classes: Any) -> str:
    keys = ("model_name", "img_size", "segments", "reduced_dim", "fusion")
    return f"{dict((k, model_cfg.get(k)) for k in keys)} with {num_classes} classes"


def check_checkpoint_fits(ckpt_path: str, module: ImageClassifier, cfg: DictConfig) -> None:
    """Fail early, naming both models, when a checkpoint's weights do not fit this run's model."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    saved = {k[len("model."):]: v.shape for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("model.")}
    expected = {k: v.shape for k, v in module.model.state_dict().items()}
    differ = [f"{k}: checkpoint {tuple(saved[k])} vs model {tuple(v)}" for k, v in expected.items()
              if k in saved and saved[k] != v]
    differ += [f"{k}: not in the checkpoint" for k in expected if k not in saved]
    differ += [f"{k}: not in the model" for k in saved if k not in expected]
    if differ:
        hparams = checkpoint.get("hyper_parameters", {})
        stored = (hparams.get("run_config") or {}).get("model", {})
        raise ValueError(
            f"checkpoint {ckpt_path} does not fit this run's model ({len(differ)} tensors differ, e.g. {differ[0]}).\n"
            f"  checkpoint: {_describe(stored, hparams.get('num_classes'))}\n"
            f"  this run:   {_describe(cfg.model, module.hparams.num_classes)}\n"
            "Resume with the model and data the checkpoint was trained with, or start without ckpt_path."
        )


def _monitor(trainer: L.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    return getattr(callback, "monitor", None)


def model_size(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter count and GMACs per image (at the size the model is built for)."""
    img_size = getattr(model, "img_size", None)
    gmacs = round(count_gmacs(model, (3, *img_size)), 4) if img_size else None
    return {"num_params": count_params(model), "gmacs": gmacs}


def summarize(trainer: L.Trainer, cfg: DictConfig, size: dict[str, Any], datamodule: Any) -> dict[str, Any]:
    """The content of `results.json`: final and best validation metrics, best checkpoint, model size."""
    history = next(c.history for c in trainer.callbacks if isinstance(c, MetricsHistory))
    monitor = _monitor(trainer)
    best = max(history, key=lambda h: h.get(monitor, float("-inf"))) if history and monitor else None
    callback = trainer.checkpoint_callback
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    return {
        "status": "finished",
        "final": history[-1] if history else None,
        "best": best,
        "monitor": monitor,
        "best_checkpoint": getattr(callback, "best_model_path", None) or None,
        "last_checkpoint": str(last) if last.is_file() else None,
        **size,
        # images skipped with data.skip_corrupt=true (counted in this process: data.num_workers=0 sees all)
        "data": {"corrupt_files": sorted(getattr(datamodule, "corrupt_files", []))},
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
    ckpt_path = _resume_path(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg)
    if ckpt_path:
        check_checkpoint_fits(ckpt_path, module, cfg)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(MetricsHistory())  # results.json is made from it
    configure_wandb(cfg.get("logger"))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    size = model_size(module.model)
    for logger in trainer.loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), **{f"model/{k}": v for k, v in size.items()}})

    try:
        try:
            # our own checkpoints hold the numpy random state, which torch's weights-only loader refuses
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=False)
        except SIGTERMException:  # SIGTERM or Ctrl-C: ModelCheckpoint saved last.ckpt of this exact step
            if trainer.is_global_zero:
                write_results(cfg.paths.output_dir, {**summarize(trainer, cfg, size, datamodule), "status": "interrupted"})
            log.warning("stopped at step %d; resume with: python train.py <same overrides> run_name=%s ckpt_path=auto",
                        trainer.global_step, cfg.run_name)
            raise SystemExit(128 + signal.SIGTERM) from None
        results = summarize(trainer, cfg, size, datamodule)
        if trainer.is_global_zero:
            path = write_results(cfg.paths.output_dir, results)
            log.info("results: %s", path)
            log.info("checkpoints: %s", Path(cfg.paths.output_dir) / "checkpoints")
            log.info("logs: %s", ", ".join(str(lg.log_dir or lg.save_dir) for lg in trainer.loggers) or "none")
    finally:
        close_loggers(trainer.loggers)
    return results


def load_checkpoint(ckpt_path: str) -> dict[str, Any]:
    """A training checkpoint written by train.py (it holds the run's config in its hyper-parameters)."""
    if not ckpt_path or not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist: give the path of a checkpoint (.ckpt) file")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if "run_config" not in checkpoint.get("hyper_parameters", {}):
        raise ValueError(f"{ckpt_path} holds no run config: it was not written by dynamixer's train.py")
    return checkpoint


def backbone_state(checkpoint: dict[str, Any], weights: str, ckpt_path: str) -> dict[str, torch.Tensor]:
    """The backbone's state dict in a training checkpoint: its raw (`model.`) or EMA (`ema.module.`) weights."""
    if weights not in ("raw", "ema"):
        raise ValueError(f"weights={weights} is not known: use weights=raw or weights=ema")
    prefix = "ema.module." if weights == "ema" else "model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{ckpt_path} has no EMA weights (trained with module.ema_decay=null): use weights=raw")
    return state


def load_run_config(checkpoint: dict[str, Any], cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The config of the run that wrote `checkpoint`, with `data` overrides of this command on top.

    The model is always the checkpoint's own; data can be pointed elsewhere (`data.data_dir=...`,
    `data.batch_size=...`, or a whole `data=...` choice).
    """
    run_cfg = OmegaConf.create(checkpoint["hyper_parameters"]["run_config"])
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
    checkpoint = load_checkpoint(cfg.ckpt_path)
    state = backbone_state(checkpoint, cfg.weights, cfg.ckpt_path)
    datamodule, module = build(load_run_config(checkpoint, cfg, _overrides()))
    module.model.load_state_dict(state)
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


def load_model(ckpt_path: str, weights: str = "ema") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The backbone of a training checkpoint with its raw or EMA weights, in eval mode, and the
    checkpoint's hyper-parameters (`run_config`, `num_classes`, `data_info`)."""
    checkpoint = load_checkpoint(ckpt_path)
    state = backbone_state(checkpoint, weights, ckpt_path)
    hparams = checkpoint["hyper_parameters"]
    model = instantiate(OmegaConf.create(hparams["run_config"]).model, num_classes=hparams["num_classes"],
                        _convert_="all")
    model.load_state_dict(state)
    return model.eval(), hparams


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Top-k classes with probabilities for an image file or every image of a folder (`cfg.inputs`);
    printed, and written to `<run folder>/predictions.json`."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    from dynamixer.data import build_transform

    model, hparams = load_model(cfg.ckpt_path, cfg.weights)
    info = hparams["data_info"]
    transform = build_transform(info["img_size"], False, crop_pct=info["crop_pct"],
                                interpolation=info["interpolation"], mean=info["mean"], std=info["std"])
    inputs = Path(cfg.inputs)
    if inputs.is_dir():
        # the image files the ImageNet data module reads too
        files = sorted(p for p in inputs.rglob("*") if p.is_file() and has_file_allowed_extension(p.name, IMG_EXTENSIONS))
    elif inputs.is_file():
        files = [inputs]
    else:
        raise FileNotFoundError(f"inputs={cfg.inputs} does not exist: give an image file or a folder of images")
    if not files:
        raise FileNotFoundError(f"inputs={cfg.inputs} holds no images ({', '.join(IMG_EXTENSIONS)})")
    k = min(cfg.top_k, len(info["class_names"]))
    predictions = []
    for start in range(0, len(files), cfg.batch_size):
        batch = files[start : start + cfg.batch_size]
        images = torch.stack([transform(Image.open(f).convert("RGB")) for f in batch])
        with torch.no_grad():
            probs, classes = model(images).softmax(dim=-1).topk(k, dim=-1)
        for file, p, c in zip(batch, probs.tolist(), classes.tolist()):
            top = [{"class": info["class_names"][i], "index": i, "prob": q} for i, q in zip(c, p)]
            predictions.append({"file": str(file), "top": top})
            print(f"{file}: " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in top))
    write_results(cfg.paths.output_dir, {"checkpoint": str(cfg.ckpt_path), "weights": cfg.weights,
                                         "predictions": predictions}, name="predictions.json")
    return predictions
