"""The run config stored in a checkpoint, read as untrusted data.

A checkpoint's `run_config` is whatever its author wrote. Nothing of it is interpolated, resolved or
instantiated by the name it gives, and nothing of `conf/` is needed to read it: the checkpoint describes its
run. The sections test/predict/export rebuild (`model`, `data`) must name one of our own builders by
`_target_`: the model factory with a DynaMixer variant timm has registered, or one of the data modules of
`dynamixer.data`. Of the settings that builder takes, only the trained ones (`dynamixer.schema`) are read,
each a plain value of the type its parameter declares. The settings of the command (where data is read and
files are written, how fast, where weights were first loaded from) are never taken from a file: the model
takes its builder's defaults, the data this command's values (`run.evaluation`).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import timm

from dynamixer.errors import CheckpointError, ConfigError
from dynamixer.schema import Role, check_types, roles

MODEL_FACTORY = "dynamixer.models.create_model"
# arguments of the builders that are no run settings: the class count is the checkpoint's own field
NOT_SETTINGS = {"self", "kwargs", "device", "dtype", "num_classes", "pretrained", "pretrained_cfg"}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "hamming", "box", "random")


@dataclass(frozen=True)
class StoredRun:
    """What a checkpoint says of the run that wrote it, validated: the `model` and `data` sections as our
    own options rebuilt with the file's values (`_target_` ours), the class count, and `data_info` (class
    names and the eval transform: `img_size`, `crop_pct`, `interpolation`, `mean`, `std`)."""

    model: dict[str, Any]
    data: dict[str, Any]
    num_classes: int
    data_info: dict[str, Any]
    run_config: dict[str, Any]  # the whole stored config as plain values: compared, never built
    epoch: int | None = None
    global_step: int | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)  # each validation's metrics (`MetricsHistory`)
    provenance: dict[str, Any] = field(default_factory=dict)  # versions and git commit of the code that wrote it


def _refuse(source: str, problem: str) -> CheckpointError:
    return CheckpointError(
        f"refused to use the run config stored in {source}: {problem}. A checkpoint's config is read as plain "
        "values of dynamixer's own config options only; use a checkpoint written by dynamixer's train.py"
    )


def plain(value: Any, where: str, source: str, hydra_keys: bool = False) -> Any:
    """`value` if it is plain data (None, bool, int, float, str, and lists and string-keyed maps of them)
    with nothing OmegaConf would act on (`${...}`) nor, unless `hydra_keys`, keys Hydra would (`_target_`,
    any `_..._` key)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        if "${" in value:
            raise _refuse(source, f"{where}={value!r} is an interpolation, which would run a resolver")
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]", source, hydra_keys) for i, v in enumerate(value)]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str) or (key.startswith("_") and not hydra_keys) or "${" in key:
                raise _refuse(source, f"{where} has the key {key!r}")
        return {k: plain(v, f"{where}.{k}", source, hydra_keys) for k, v in value.items()}
    raise _refuse(source, f"{where} is a {type(value).__name__}, not a plain value")


@cache
def builders(section: str) -> dict[str, Any]:
    """The builders a stored `section` may name, by the `_target_` a config writes: for `model`, the model
    factory; for `data`, each data module of the package `dynamixer.data` (by its module's path, and by the
    package's name where it exports it): a new module there is readable from its first checkpoint on."""
    if section == "model":
        from dynamixer.models import create_model

        return {MODEL_FACTORY: create_model}
    import dynamixer.data

    for module in pkgutil.iter_modules(dynamixer.data.__path__):  # our own files, never a name from the file
        importlib.import_module(f"dynamixer.data.{module.name}")
    found, todo = {}, list(dynamixer.data.ClassificationDataModule.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls.__module__.startswith("dynamixer.data."):
            found[f"{cls.__module__}.{cls.__qualname__}"] = cls
            if getattr(dynamixer.data, cls.__name__, None) is cls:
                found[f"dynamixer.data.{cls.__name__}"] = cls
    return found


def trained_settings(target: Any) -> set[str]:
    """The trained settings `target` takes: its keyword parameters without a role, of a plain default or none
    (not `norm_layer`: a class is built, never read)."""
    built = getattr(target, "passes_kwargs_to", target)  # the model factory: the model's settings
    functions = [c.__init__ for c in inspect.getmro(built) if "__init__" in vars(c)] if inspect.isclass(built) else []
    plain_default = (type(None), bool, int, float, str, tuple)
    settable = {
        p.name
        for function in [*functions, target]
        for p in inspect.signature(function).parameters.values()
        if p.default is inspect.Parameter.empty or isinstance(p.default, plain_default)
    }
    return {k for k, role in roles(target).items() if role is Role.TRAINED and k in settable} - NOT_SETTINGS


def rebuild_section(run_config: dict[str, Any], section: str, source: str) -> dict[str, Any]:
    """The stored `section` as a config of one of our builders: its `_target_` and the stored values of its
    trained settings, type-checked. The settings of the command are left out (the builder's defaults, or the
    command's values, apply)."""
    stored = run_config.get(section)
    if not isinstance(stored, dict):
        raise _refuse(source, f"it has no {section} section")
    name = stored.get("_target_")
    known = builders(section)
    if not isinstance(name, str) or name not in known:
        raise _refuse(source, f"its {section} names _target_={name!r}, which is none of ours ({sorted(known)})")
    target = known[name]  # ours: never a name the file gives
    variants = timm.list_models(module="dynamixer") if section == "model" else None
    if variants is not None and stored.get("model_name") not in variants:
        raise _refuse(source, f"model.model_name={stored.get('model_name')!r} is no DynaMixer variant ({variants})")
    settings = trained_settings(target)
    unknown = sorted(set(stored) - {"_target_", "_partial_"} - set(roles(target)))
    if unknown:
        raise _refuse(source, f"{section}.{unknown[0]} is no setting of {name}")
    values = {k: plain(stored[k], f"{section}.{k}", source) for k in sorted(settings & set(stored))}
    try:
        check_types(target, values, section)
    except ConfigError as err:
        raise _refuse(source, str(err).split(": give ")[0]) from None
    return {"_target_": name, **values}


def _data_info(info: Any, num_classes: Any, source: str) -> dict[str, Any]:
    info = plain(info, "data_info", source)
    if not isinstance(info, dict):
        raise _refuse(source, "it has no data_info")
    names = info.get("class_names")

    def three(key: str) -> bool:
        values = info.get(key)
        return isinstance(values, list) and len(values) == 3 and all(isinstance(v, (int, float)) for v in values)

    checks = {
        "num_classes": isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 1,
        "data_info.class_names": isinstance(names, list)
        and all(isinstance(n, str) for n in names)
        and len(names) == num_classes,
        "data_info.img_size": isinstance(info.get("img_size"), int) and 1 <= info["img_size"] <= 8192,
        "data_info.crop_pct": isinstance(info.get("crop_pct"), (int, float)) and 0 < info["crop_pct"] <= 1,
        "data_info.interpolation": info.get("interpolation") in INTERPOLATIONS,
        "data_info.mean": three("mean"),
        "data_info.std": three("std") and all(s > 0 for s in info["std"]),
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise _refuse(source, f"{bad[0]} is missing or not valid")
    return {k: info[k] for k in ("class_names", "img_size", "crop_pct", "interpolation", "mean", "std")}


def read_stored_run(checkpoint: dict[str, Any], source: str) -> StoredRun:
    """The validated run of a training checkpoint written by train.py (see the module's docstring)."""
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or not isinstance(hparams.get("run_config"), dict):
        raise CheckpointError(f"{source} holds no run config: it was not written by dynamixer's train.py")
    run_config = plain(hparams["run_config"], "run_config", source, hydra_keys=True)
    return StoredRun(
        model=rebuild_section(run_config, "model", source),
        data=rebuild_section(run_config, "data", source),
        num_classes=hparams.get("num_classes"),
        data_info=_data_info(hparams.get("data_info"), hparams.get("num_classes"), source),
        run_config=run_config,
        epoch=_count(checkpoint.get("epoch")),
        global_step=_count(checkpoint.get("global_step")),
        metrics=list(checkpoint.get("callbacks", {}).get("MetricsHistory", {}).get("history", [])),
        provenance=dict(checkpoint.get("provenance") or {}),
    )


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
