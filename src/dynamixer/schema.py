"""The role of each run setting, declared once, on the parameter that takes it: `data_dir: Location[str]`.

A parameter without a role is trained: it defines what a run learns, a resume must keep it, and a checkpoint's
value of it rebuilds the model or data of that run. The other roles are settings of the command, never of a
file: a checkpoint's value of them is never read (evaluation takes the command's, or the option's own), and
a resume may change them:
- `Location`: where data is read or a file is written;
- `Speed`: how fast the same thing is computed (loader workers, recomputation, kernels, compilation);
- `Init`: where weights were first initialised from (the checkpoint's own weights replace them).
`Extendable` is trained, and a resume with `extend=true` may change it: the length of a run.
Lightning's Trainer declares no roles: `TRAINER_ROLES` declares them for it.
The resume comparison (`dynamixer.run.checkpoints`) and the reading of stored configs
(`dynamixer.run.stored_config`) both ask `roles`.
"""

from __future__ import annotations

import enum
import inspect
import typing
from collections.abc import Callable
from functools import cache
from typing import Annotated, Any, TypeVar

T = TypeVar("T")


class Role(enum.Enum):
    TRAINED = "trained"
    LOCATION = "location"
    SPEED = "speed"
    INIT = "init"
    EXTENDABLE = "extendable"


Location = Annotated[T, Role.LOCATION]
Speed = Annotated[T, Role.SPEED]
Init = Annotated[T, Role.INIT]
Extendable = Annotated[T, Role.EXTENDABLE]

TRAINER = "lightning.pytorch.trainer.trainer.Trainer"
# what of Lightning's Trainer decides what is trained: the steps (how many, of which batches, accumulated,
# clipped, at which precision); every other parameter says how or where it runs (devices, logging, validation)
TRAINER_ROLES = {
    "max_epochs": Role.EXTENDABLE,
    "max_steps": Role.EXTENDABLE,
    "limit_train_batches": Role.TRAINED,
    "overfit_batches": Role.TRAINED,
    "accumulate_grad_batches": Role.TRAINED,
    "precision": Role.TRAINED,
    "gradient_clip_val": Role.TRAINED,
    "gradient_clip_algorithm": Role.TRAINED,
    "default_root_dir": Role.LOCATION,
}


@cache
def annotations(target: Callable[..., Any]) -> dict[str, Any]:
    """The annotation of each keyword parameter of `target`: a function, or a class (its `__init__`s along the
    classes it passes `**kwargs` to, or the class a factory names as `passes_kwargs_to`)."""
    passes_to = getattr(target, "passes_kwargs_to", None)  # a factory whose **kwargs build this class
    if passes_to is not None:
        # timm.create_model drops arguments given as None: the variant's own value
        return {**{k: hint | None for k, hint in annotations(passes_to).items()}, **_hints([target])}
    if inspect.isclass(target):
        return _hints([c.__init__ for c in inspect.getmro(target) if "__init__" in vars(c)])
    return _hints([target])


def _hints(functions: list[Callable[..., Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for function in functions:
        try:
            hints = typing.get_type_hints(function, include_extras=True)
        except (NameError, TypeError):  # a library's class without resolvable annotations
            hints = {}
        for name, hint in hints.items():
            found.setdefault(name, hint)
        if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(function).parameters.values()):
            break  # the classes above take nothing more from this one
    found.pop("return", None)
    return found


def roles(target: Callable[..., Any]) -> dict[str, Role]:
    """The declared role of each keyword parameter of `target` (see `annotations`); without one: trained.
    Lightning's Trainer: `TRAINER_ROLES`, speed for the parameters it does not name."""
    if f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}" == TRAINER:
        return {name: TRAINER_ROLES.get(name, Role.SPEED) for name in annotations(target)}
    return {
        name: next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Role)), Role.TRAINED)
        for name, hint in annotations(target).items()
    }


def check_types(target: Callable[..., Any], values: dict[str, Any], section: str) -> None:
    """Each of `values` (keyword arguments of `target`, as the config gives them) is of its parameter's declared
    type, strictly (a string is no number, a bool no count); else one `ConfigError` naming the key, the value
    and the type. Parameters without an annotation pydantic can check are left to the target."""
    from pydantic import ValidationError

    from dynamixer.errors import ConfigError

    for key, value in values.items():
        hint = annotations(target).get(key)
        nested = "_target_" in repr(value)  # objects the config builds (callbacks, plugins): their own checks
        if hint is None or nested or key.startswith("_"):
            continue
        try:
            adapter = _adapter(hint)
        except Exception:  # a library's own types, which pydantic cannot check
            continue
        candidates = [value, tuple(value)] if isinstance(value, list) else [value]  # YAML has lists only
        for candidate in candidates:
            try:
                adapter.validate_python(candidate, strict=True)
                break
            except ValidationError:
                continue
        else:
            raise ConfigError(
                f"{section}.{key}={value!r} is not of the type it takes ({_name(hint)}): give {section}.{key} a value "
                "of that type"
            )


@cache
def _adapter(hint: Any) -> Any:
    from pydantic import ConfigDict, TypeAdapter

    return TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True))


def _name(hint: Any) -> str:
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is None and hasattr(hint, "__name__"):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def role_of(target: Callable[..., Any], key: str) -> Role:
    """The role of `target`'s parameter `key` (trained when it declares none)."""
    return roles(target).get(key, Role.TRAINED)
