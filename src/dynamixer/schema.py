"""The role of each run setting, declared once, on the parameter that takes it: `data_dir: Location[str]`.

A parameter without a role is trained: it defines what a run learns, a resume must keep it, and a checkpoint's
value of it rebuilds the model or data of that run. The other roles are settings of the command, never of a
file: a checkpoint's value of them is never read (evaluation takes the command's, or the option's own), and
a resume may change them:
- `Location`: where data is read or a file is written;
- `Speed`: how fast the same thing is computed (loader workers, recomputation, kernels, compilation);
- `Init`: where weights were first initialised from (the checkpoint's own weights replace them).
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


Location = Annotated[T, Role.LOCATION]
Speed = Annotated[T, Role.SPEED]
Init = Annotated[T, Role.INIT]


@cache
def roles(target: Callable[..., Any]) -> dict[str, Role]:
    """The declared role of each keyword parameter of `target` (a function, or a class: its `__init__`s along
    the classes it passes `**kwargs` to); parameters without one are trained."""
    found: dict[str, Role] = {}
    functions = (
        [c.__init__ for c in inspect.getmro(target) if "__init__" in vars(c)] if inspect.isclass(target) else [target]
    )
    for function in functions:
        try:
            hints = typing.get_type_hints(function, include_extras=True)
        except (NameError, TypeError):  # a library's class without resolvable annotations
            continue
        for name, hint in hints.items():
            role = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Role)), Role.TRAINED)
            found.setdefault(name, role)
        if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(function).parameters.values()):
            break  # the classes above take nothing more from this one
    return found


def role_of(target: Callable[..., Any], key: str) -> Role:
    """The role of `target`'s parameter `key` (trained when it declares none)."""
    return roles(target).get(key, Role.TRAINED)
