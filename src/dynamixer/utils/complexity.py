"""Parameter and multiply-accumulate counts of a model."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...], train: bool = False) -> int:
    """FLOPs (torch's flop counter: 2 per multiply-accumulate) of one forward pass of a batch
    `input_shape = (B, C, H, W)`, or of a forward and backward pass when `train`.

    Counted on a weightless copy on the meta device: free of memory and time at any model size.
    """
    meta = copy.deepcopy(model).to("meta").train(train)
    x = torch.empty(*input_shape, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            meta(x).sum().backward()
        else:
            with torch.no_grad():
                meta(x)
    return counter.get_total_flops()


def count_gmacs(model: nn.Module, input_size: tuple[int, int, int]) -> float:
    """GMACs of one forward pass of one image `input_size = (C, H, W)`."""
    return count_flops(model, (1, *input_size)) / 2e9
