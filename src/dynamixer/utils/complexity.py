"""Parameter and multiply-accumulate counts of a model."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: nn.Module, input_size: tuple[int, int, int]) -> float:
    """GMACs of one forward pass of one image `input_size = (C, H, W)` (torch's flop counter / 2).

    Counted on a weightless copy on the meta device: free of memory and time at any model size.
    """
    meta = copy.deepcopy(model).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta(torch.empty(1, *input_size, device="meta"))
    return counter.get_total_flops() / 2e9
