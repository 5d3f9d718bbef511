"""Training order and augmentation randomness that a resumed run repeats exactly, on any number of ranks.

The order of an epoch is a function of `(seed, epoch)` (torch's `DistributedSampler`), and each sample's
augmentation draws come from its own seed, a function of `(seed, epoch, index)`: neither depends on which
data-loader worker decoded the sample, nor on how many steps this process has run. A run resumed in the
middle of an epoch starts its loader at the next batch (`start`) and sees the batches and augmentations
the uninterrupted run saw.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of sample `index` in `epoch`."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def seed_generators(seed: int) -> None:
    """Seed python's, numpy's and torch's (CPU) generators for one sample's augmentation draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # alone: torch.manual_seed's accelerator checks cost more


def generator_states() -> tuple[Any, Any, torch.Tensor]:
    return random.getstate(), np.random.get_state(), torch.default_generator.get_state()


def restore_generators(states: tuple[Any, Any, torch.Tensor]) -> None:
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.default_generator.set_state(states[2])


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (one rank too: `num_replicas=1`) that yields `(index, sample_seed)` pairs and can
    start an epoch at sample `start` of this rank's share (a resumed run; reset after that epoch)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start :]
        self.start = 0
        return iter([(i, sample_seed(self.seed, self.epoch, i)) for i in indices])


class SeededSamples(Dataset):
    """`dataset[index]` with python's, numpy's and torch's random generators seeded by the sample's own seed;
    items are requested as `(index, seed)`. The generators of the process are left as they were."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int] | int) -> Any:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int] | int]) -> list[Any]:
        """The samples of a batch (the data loader's batched fetch). The process's generators are saved and
        restored once per batch: numpy's state copy alone would cost more than decoding a small image."""
        states = generator_states()
        try:
            samples = []
            for item in items:
                # a plain index: Lightning's overfit_batches put its own sequential sampler in place; the
                # sample's draws then come from its index (the same every epoch, what overfitting asks)
                index, seed = item if isinstance(item, tuple) else (item, item)
                seed_generators(seed)
                samples.append(self.dataset[index])
            return samples
        finally:
            restore_generators(states)
