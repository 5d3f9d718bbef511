"""The run config stored in a checkpoint, read as untrusted data.

A checkpoint's `run_config` is whatever its author wrote. Nothing of it is interpolated, resolved or
instantiated by the name it gives: each section that test/predict/export rebuild (`model`, `data`) is
matched to one of our own options in `conf/<section>/` by the `_target_` (and `model_name`) it names;
the class built is that option's, and only plain values (numbers, strings, booleans, lists and maps of
them) of the trained keys that option or its class takes are read from the file, each of the kind the option
has. The keys of the command (`dynamixer.schema`: where data is read and files are written, how fast, where
weights were first loaded from) are never taken from a file: they keep the option's own values, which the
command resolves (timm's `pretrained`, URLs and Hub ids are no keys of ours). A new option in `conf/` is
readable from its first checkpoint on.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from hydra.utils import get_object

from dynamixer.errors import CheckpointError
from dynamixer.schema import Role, role_of

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
# constructor arguments that are not run settings
NOT_SETTINGS = {"self", "device", "dtype", "num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay"}
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


def _same_kind(value: Any, default: Any) -> bool:
    """Whether a stored value is of the kind of our option's default (any kind where that is unset or an
    interpolation of ours)."""
    if default is None or value is None or (isinstance(default, str) and "${" in default):
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(default, float) or isinstance(value, int))
    return isinstance(value, type(default))


@cache
def options(section: str) -> dict[str, dict[str, Any]]:
    """Our options of a config group, by name, as `conf/<section>/<name>.yaml` composes them: an option that
    starts from another option of its group (`defaults: [<name>, _self_]`) has that one's keys under its own."""
    found = {p.stem: yaml.safe_load(p.read_text()) or {} for p in sorted((CONF_DIR / section).glob("*.yaml"))}

    def composed(name: str) -> dict[str, Any]:
        option = found[name]
        bases = [d for d in option.get("defaults", []) if isinstance(d, str) and d in found and d != name]
        merged: dict[str, Any] = {}
        for base in bases:
            merged.update(composed(base))
        merged.update({k: v for k, v in option.items() if k != "defaults"})
        return merged

    return {name: composed(name) for name in found}


def _settings_of(target: str) -> set[str]:
    """The keyword arguments a target of ours takes that are run settings (for the model factory: the model's)."""
    built = get_object(target)
    built = getattr(built, "passes_kwargs_to", built)  # the model factory: the model's settings
    params = inspect.signature(built).parameters.values()
    plain_default = (type(None), bool, int, float, str, tuple)
    return {
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in NOT_SETTINGS
        and (p.default is inspect.Parameter.empty or isinstance(p.default, plain_default))
    }


def rebuild_section(run_config: dict[str, Any], section: str, source: str) -> dict[str, Any]:
    """The stored `section` as one of our options: its `_target_`, the stored values of its keys."""
    stored = run_config.get(section)
    if not isinstance(stored, dict):
        raise _refuse(source, f"it has no {section} section")
    identity = {k: stored.get(k) for k in ("_target_", "model_name") if k in stored}
    matches = [
        (name, option)
        for name, option in options(section).items()
        if all(option.get(k) == v for k, v in identity.items()) and option.get("_target_")
    ]
    if not matches:
        offered = sorted({str(o.get("_target_")) for o in options(section).values()})
        names = ", ".join(f"{k}={v!r}" for k, v in identity.items()) or "no _target_"
        raise _refuse(source, f"its {section} names {names}, which no option in conf/{section}/ builds ({offered})")
    name, option = matches[0]
    target = get_object(option["_target_"])  # ours, from conf/: never a name the file gives
    allowed = (set(option) | _settings_of(option["_target_"])) - {"_target_", "_partial_"}
    unknown = sorted(set(stored) - allowed - {"_target_"})
    if unknown:
        raise _refuse(source, f"{section}.{unknown[0]} is no setting of conf/{section}/{name}.yaml")
    values: dict[str, Any] = {"_target_": option["_target_"]}
    for key in sorted(allowed):
        if role_of(target, key) is not Role.TRAINED:  # the command's: the option's own value, if it has one
            if key in option:
                values[key] = option[key]
        elif key in stored:
            value = plain(stored[key], f"{section}.{key}", source)
            if not _same_kind(value, option.get(key)):
                raise _refuse(source, f"{section}.{key}={value!r} is not of the kind of conf/{section}/{name}.yaml")
            values[key] = value
        elif key in option:
            if isinstance(option[key], str) and "${" in option[key]:
                raise _refuse(source, f"it has no value of {section}.{key}")
            values[key] = option[key]
    return values


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
