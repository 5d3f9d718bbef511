"""Evaluation and prediction with a training checkpoint: `test.py` and `predict.py`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from dynamixer.data import build_transform, load_rgb
from dynamixer.errors import CheckpointError, ConfigError, DataError, MissingPathError
from dynamixer.lit_module import ImageClassifier
from dynamixer.run.build import build_trainer, check_section, check_sections, instantiate_checked
from dynamixer.run.checkpoints import load_model
from dynamixer.run.stored_config import NOT_SETTINGS, StoredRun, builders
from dynamixer.schema import Role, role_of, roles
from dynamixer.utils.launch import command_overrides
from dynamixer.utils.results import write_results

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Validate the checkpoint `cfg.ckpt_path` on the val split with `cfg.weights` (raw or ema);
    print top-1/top-5 and write them to `<run folder>/eval.json`."""
    model, stored = load_model(cfg.ckpt_path, cfg.weights)
    data = eval_data_config(stored, cfg, command_overrides())
    check_section("data", data)  # the command's values, as train.py checks them
    check_sections(cfg, ("trainer",))
    datamodule = instantiate_checked(data)
    check_class_names(stored.data_info["class_names"], datamodule.class_names, cfg)
    module = ImageClassifier(model=model, num_classes=stored.num_classes, optimizer=None)
    trainer = build_trainer(cfg.trainer, logger=False)
    (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    results = {
        "checkpoint": str(cfg.ckpt_path),
        "weights": cfg.weights,
        "epoch": stored.epoch,
        "global_step": stored.global_step,
        "metrics": {k: float(v) for k, v in metrics.items()},
    }
    if trainer.is_global_zero:
        path = write_results(cfg.paths.output_dir, results, name="eval.json")
        for key, value in sorted(results["metrics"].items()):
            print(f"{key}: {value:.4f}")
        log.info("written: %s", path)
    return results


def eval_data_config(stored: StoredRun, cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """The checkpoint's data: its trained settings, with this command's settings of that data module (where
    data is read and files are written, how fast: `command_data_option`) and its `data.<key>=...` overrides
    (keys of that module only) on top. Values of the option are resolved with this command's `paths`."""
    paths = {"paths": OmegaConf.to_container(cfg.paths, resolve=True)}
    target = stored.data["_target_"]
    builder = builders("data")[target]
    data = {
        k: OmegaConf.create({**paths, "v": v}).v if isinstance(v, str) and "${" in v else v
        for k, v in command_data_option(target).items()
        if role_of(builder, k) is not Role.TRAINED
    }
    data.update(stored.data)
    settings = roles(builder)
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key == "data" or not key.startswith("data."):
            continue
        name = key.split(".")[1]
        if name not in settings or name in NOT_SETTINGS:
            raise ConfigError(
                f"{key} is not a setting of the checkpoint's data ({target}); its settings: "
                f"{', '.join(k for k in sorted(settings) if k not in NOT_SETTINGS)}"
            )
        value = OmegaConf.select(cfg, f"data.{name}")
        data[name] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return data


def command_data_option(target: str) -> dict[str, Any]:
    """The data option of this command's own config (`conf/data/<name>.yaml` of the running Hydra app) that
    builds `target`, unresolved; empty where it has none (then the module's own defaults apply)."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return {}
    for name in GlobalHydra.instance().config_loader().get_group_options("data"):
        option = OmegaConf.to_container(compose(overrides=[f"+data={name}"]).data, resolve=False)
        if option.get("_target_") == target:
            return option
    return {}


def check_class_names(trained: list[str], found: list[str], cfg: DictConfig) -> None:
    """The data's classes must be the checkpoint's, in the same order: label i must mean the same class."""
    if list(trained) != list(found):
        differ = [f"label {i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(trained, found)) if a != b][:5]
        raise CheckpointError(
            f"the data's classes are not the ones {cfg.ckpt_path} was trained on ({len(trained)} trained, "
            f"{len(found)} found; {'; '.join(differ) or 'the counts differ'}): its metrics would be wrong. "
            "Point data.data_dir at data with the same class folders."
        )


def printable(text: str) -> str:
    """`text` with every character a terminal would act on (escape sequences, control characters) escaped."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def image_files(inputs: str) -> list[Path]:
    """An image file, or every image file under a folder (the extensions the ImageNet data module reads)."""
    path = Path(inputs)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and has_file_allowed_extension(p.name, IMG_EXTENSIONS))
    elif path.is_file():
        files = [path]
    else:
        raise MissingPathError(f"inputs={inputs} does not exist: give an image file or a folder of images")
    if not files:
        raise MissingPathError(f"inputs={inputs} holds no images ({', '.join(IMG_EXTENSIONS)})")
    return files


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Top-k classes with probabilities for an image file or every image of a folder (`cfg.inputs`);
    printed, and written to `<run folder>/predictions.json`. Files that cannot be read are listed there (and
    on stderr) and the others classified."""
    for key in ("batch_size", "top_k"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} must be a positive integer: give {key}=1 or more")
    model, stored = load_model(cfg.ckpt_path, cfg.weights)
    info = stored.data_info
    transform = build_transform(
        info["img_size"],
        False,
        crop_pct=info["crop_pct"],
        interpolation=info["interpolation"],
        mean=info["mean"],
        std=info["std"],
    )
    files = image_files(cfg.inputs)
    k = min(cfg.top_k, len(info["class_names"]))
    predictions, unreadable = [], []
    for start in range(0, len(files), cfg.batch_size):
        batch, images = [], []
        for file in files[start : start + cfg.batch_size]:
            try:
                images.append(transform(load_rgb(file)))
                batch.append(file)
            except DataError as err:
                unreadable.append({"file": str(file), "error": str(err)})
                print(f"Error: {printable(str(err))}", file=sys.stderr)
        if not batch:
            continue
        images = torch.stack(images)
        with torch.no_grad():
            probs, classes = model(images).softmax(dim=-1).topk(k, dim=-1)
        for file, p, c in zip(batch, probs.tolist(), classes.tolist()):
            top = [{"class": info["class_names"][i], "index": i, "prob": q} for i, q in zip(c, p)]
            predictions.append({"file": str(file), "top": top})
            print(f"{printable(str(file))}: " + ", ".join(f"{printable(t['class'])} {t['prob']:.3f}" for t in top))
    write_results(
        cfg.paths.output_dir,
        {"checkpoint": str(cfg.ckpt_path), "weights": cfg.weights, "predictions": predictions}
        | {"unreadable": unreadable},
        name="predictions.json",
    )
    if unreadable:
        print(f"{len(unreadable)} of {len(files)} files unreadable (listed in predictions.json)", file=sys.stderr)
    return predictions
