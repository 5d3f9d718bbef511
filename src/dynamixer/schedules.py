"""Learning-rate schedules expressed in epochs and run per optimizer step."""

from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler

from dynamixer.errors import ConfigError


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: float,
    max_epochs: int,
    warmup_epochs: float = 0,
    cooldown_epochs: int = 0,
    min_lr: float = 0.0,
    warmup_lr: float = 0.0,
) -> CosineLRScheduler:
    """timm's cosine schedule, stepped per optimizer update (`step_update(num_updates)`).

    As in the paper's recipe: a linear warm-up from `warmup_lr` over `warmup_epochs`, a cosine from the
    optimizer's lr down to `min_lr` at epoch `max_epochs - cooldown_epochs` (the warm-up overlays the
    start of the cosine), then `min_lr` for the `cooldown_epochs` left.
    """
    cosine_epochs = max_epochs - cooldown_epochs
    if cosine_epochs <= 0:
        raise ConfigError(
            f"cooldown_epochs={cooldown_epochs} leaves no cosine epochs out of max_epochs={max_epochs}: "
            "raise trainer.max_epochs or lower scheduler.cooldown_epochs"
        )
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, round(cosine_epochs * steps_per_epoch)),
        lr_min=min_lr,
        warmup_t=round(warmup_epochs * steps_per_epoch),
        warmup_lr_init=warmup_lr,
        t_in_epochs=False,
    )
