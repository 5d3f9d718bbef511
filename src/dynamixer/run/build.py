"""Config -> objects: the data module and the LightningModule (with its backbone) of a run."""

from __future__ import annotations

import difflib
import re
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from dynamixer.errors import ConfigError, DataError, UserError
from dynamixer.lit_module import ImageClassifier
from dynamixer.schema import check_types
from dynamixer.utils.complexity import count_gmacs, count_params


def instantiate_checked(node: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, with the errors a config value causes re-raised as user errors: our own
    (raised where a value is found wrong) as they are, and a key the constructor does not take (a misspelled
    `+section.key=...`) as one naming the key and the closest ones it takes. Any other error keeps its
    traceback: it is a bug, or a library's message we have not learned to explain."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        unknown = isinstance(cause, TypeError) and re.search(r"unexpected keyword argument '(\w+)'", str(cause))
        if unknown and OmegaConf.is_config(node) and unknown.group(1) in node:
            section = node._get_full_key(None)
            close = difflib.get_close_matches(unknown.group(1), [k for k in node if k != unknown.group(1)], n=3)
            raise ConfigError(
                f"{section}.{unknown.group(1)} is not a setting of {node.get('_target_')}"
                + (f": did you mean {' or '.join(f'{section}.{k}' for k in close)}?" if close else "")
                + f" Remove +{section}.{unknown.group(1)}=... or correct the key."
            ) from None
        raise


def check_sections(cfg: DictConfig, sections: tuple[str, ...] = ("data", "model", "module", "optimizer", "scheduler")):
    """Each value of these sections is of the type its target's parameter declares (`dynamixer.schema`)."""
    for section in sections:
        node = cfg.get(section)
        if OmegaConf.is_dict(node) and isinstance(node.get("_target_"), str):  # resolved only then
            check_section(section, OmegaConf.to_container(node, resolve=True))


def check_section(section: str, values: dict[str, Any]) -> None:
    """The values of one section with a `_target_` are of the types its parameters declare."""
    if isinstance(values.get("_target_"), str):
        check_types(get_object(values["_target_"]), values, section)


def build_trainer(node: DictConfig, **kwargs: Any) -> L.Trainer:
    """The Trainer of `node` (the `trainer` section): a value Lightning refuses (`limit_val_batches=-1`,
    `accelerator=x`) is a user's error naming the section, as a value of the wrong type is (`check_sections`)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return instantiate_checked(node, **kwargs)
    except InstantiationException as err:
        if not isinstance(err.__cause__, (MisconfigurationException, ValueError)):
            raise
        raise ConfigError(
            f"trainer: {str(err.__cause__).rstrip('.')}. Give the trainer settings values it takes"
        ) from None


def dry_build(section: str, make: Any) -> Any:
    """`make()`: a partial of the config built once on a stand-in, so that what its own checks refuse (torch's
    "Invalid learning rate") is a user's error now, naming the section, not a traceback at the first step."""
    try:
        return make()
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{section}: {err}. Give the {section} settings values it takes") from None


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, ImageClassifier]:
    """The data module and the LightningModule (with its backbone) described by `cfg`."""
    if "_target_" not in cfg.data:  # conf/data/imagenet_loader.yaml: the base of the ImageNet sources
        raise ConfigError(
            "this data option names no data module (imagenet_loader is the shared base of data=imagenet, data=hf "
            "and data=wds): choose one of those, or digits or cifar"
        )
    check_sections(cfg)
    optimizer = instantiate(cfg.optimizer)
    stand_in = dry_build("optimizer", lambda: optimizer(params=[torch.zeros(1, requires_grad=True)]))
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    if scheduler is not None:
        epochs = cfg.trainer.get("max_epochs") if cfg.get("trainer") else None
        length = epochs if isinstance(epochs, int) and epochs >= 1 else 1  # as the module builds it
        dry_build("scheduler", lambda: scheduler(stand_in, steps_per_epoch=1, max_epochs=length))
    datamodule = instantiate_checked(cfg.data)
    if datamodule.num_classes < 2:
        raise DataError(
            f"the data has one class ({datamodule.class_names}); a classifier needs two classes or more: keep at "
            "least two with data.classes=[...] (digits) or point data.data_dir at two class folders or more"
        )
    model = instantiate_checked(cfg.model, num_classes=datamodule.num_classes, _convert_="all")
    built_for = tuple(getattr(model, "img_size", (datamodule.img_size,) * 2))
    if built_for != (datamodule.img_size,) * 2:
        raise ConfigError(
            f"data.img_size={datamodule.img_size} but the model is built for {built_for[0]}x{built_for[1]} images: "
            f"set model.img_size (data.img_size follows it) instead of data.img_size"
        )
    # partial first: the objects and the plain run config passed next must not be re-instantiated
    module = instantiate(cfg.module, _partial_=True)(
        model=model,
        num_classes=datamodule.num_classes,
        optimizer=optimizer,
        scheduler=scheduler,
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


def model_size(model: torch.nn.Module) -> dict[str, Any]:
    """Parameter count and GMACs per image (at the size the model is built for)."""
    img_size = getattr(model, "img_size", None)
    gmacs = round(count_gmacs(model, (3, *img_size)), 4) if img_size else None
    return {"num_params": count_params(model), "gmacs": gmacs}
