"""Common base for the image-classification data modules."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning import LightningDataModule
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset

from dynamixer.data.identity import differences
from dynamixer.data.sampling import ResumableSampler, SeededSamples
from dynamixer.data.transforms import TRAIN_AUG_KEYS, build_transform
from dynamixer.errors import ConfigError, DataError, SharedDataError
from dynamixer.machinery.lightning_internals import batches_done
from dynamixer.schema import Speed

# ImageNet's loader and the paper's augmentation (conf/data/imagenet_loader.yaml states all of it), for the
# data modules of each ImageNet source: decoding needs workers, RandAugment and random erasing
IMAGENET_DEFAULTS = {"num_workers": 8}
IMAGENET_TRAIN_AUG = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25}


def _distributed() -> tuple[bool, int, int]:
    """(whether a process group runs, this rank, the rank count)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True, torch.distributed.get_rank(), torch.distributed.get_world_size()
    return False, 0, 1


def rank_zero_first(work: Callable[[], None]) -> None:
    """Run `work` on rank 0 of a distributed run (or in a single process) while the other ranks wait: a listing
    or a cache that one rank makes and all read. If it fails, every rank stops: a `DataError` with its message
    (printed by rank 0 only: the others raise it as a `SharedDataError`), any other error with its traceback on
    rank 0 and a `RuntimeError` naming it on the others (which would otherwise wait for rank 0 forever)."""
    distributed, rank, _ = _distributed()
    error: Exception | None = None
    if rank == 0:
        try:
            work()
        except Exception as err:  # re-raised below, after the other ranks learnt of it
            error = err
    if distributed:
        told = [None if error is None else (isinstance(error, DataError), f"{type(error).__name__}: {error}")]
        torch.distributed.broadcast_object_list(told, src=0)
        if rank != 0 and told[0] is not None:
            user, text = told[0]
            if user:
                raise SharedDataError(text.split(": ", 1)[1])
            raise RuntimeError(f"rank 0 failed while making what every rank reads ({text}); see its traceback")
    if error is not None:
        raise error


def stop_together(problem: str | None) -> None:
    """Every rank says what it found wrong (`problem`, or None); if any rank did, every rank stops with one
    `DataError` naming each rank's problem (printed by rank 0: the others raise a `SharedDataError`)."""
    distributed, rank, world = _distributed()
    found: list[Any] = [problem]
    if distributed:
        found = [None] * world
        torch.distributed.all_gather_object(found, problem)
    problems = [(r, p) for r, p in enumerate(found) if p is not None]
    if not problems:
        return
    message = "\n".join(p if world == 1 else f"rank {r}: {p}" for r, p in problems)
    raise (DataError if rank == 0 else SharedDataError)(message)


class InMemoryImages(Dataset):
    """PIL images and integer labels held in memory; items are ``(transform(image), label)``."""

    def __init__(self, images: list[Image.Image], labels: list[int], transform: Callable) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), self.labels[index]


class ClassificationDataModule(LightningDataModule, ABC):
    """Serves ``(image, label)`` batches: images ``(B, 3, img_size, img_size)`` float, labels ``(B,)`` int64.

    ``batch_size`` is per device. ``train_aug`` overrides keys of the subclass's
    ``default_train_aug`` (both are keyword arguments of ``build_transform``'s
    training branch). Subclasses set ``default_train_aug`` and implement
    ``class_names`` and ``_build_datasets``. The datasets are built
    in ``setup`` (or lazily by the first dataloader call). The training loader shards
    itself over the ranks and resumes mid-epoch (``state_dict``, ``dynamixer.data.sampling``);
    ``seed`` fixes its order and augmentations. Lightning shards the evaluation loaders.
    """

    defaults: Mapping[str, Any] = {}  # subclasses: constructor defaults of their own (batch size, mean, ...)
    default_train_aug: Mapping[str, Any] = {}

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: Speed[int] = 4,
        pin_memory: Speed[bool] = True,
        persistent_workers: Speed[bool] = True,
        img_size: int = 224,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        train_aug: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        aug = {**self.default_train_aug, **dict(train_aug or {})}
        unknown = sorted(set(aug) - TRAIN_AUG_KEYS)
        if unknown:
            raise ConfigError(
                f"data.train_aug has unknown keys {unknown}: use only {sorted(TRAIN_AUG_KEYS)} (or remove them)"
            )
        if int(batch_size) < 1:
            raise ConfigError(f"data.batch_size={batch_size}: give 1 or more, e.g. data.batch_size=64")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.img_size = int(img_size)
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.train_aug = aug
        self.seed = int(seed)
        self._resume: dict[str, Any] | None = None
        self._identity: dict[str, str] | None = None
        common = dict(crop_pct=self.crop_pct, interpolation=interpolation, mean=self.mean, std=self.std)
        self._train_tf = build_transform(self.img_size, True, **common, **aug)
        self._eval_tf = build_transform(self.img_size, False, **common)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    @abstractmethod
    def class_names(self) -> list[str]:
        """Class names, index ``i`` is label ``i``."""

    @abstractmethod
    def _build_datasets(self) -> tuple[Dataset, Dataset]:
        """Return ``(train, val)`` datasets using ``self._train_tf`` / ``self._eval_tf``."""

    @abstractmethod
    def _content(self) -> dict[str, str]:
        """The data set's identity (`dynamixer.data.identity`): names relative to it -> content digests."""

    def identity(self) -> dict[str, str]:
        """The data set's identity by content, made once."""
        if self._identity is None:
            self._identity = self._content()
        return self._identity

    def eval_transform(self):
        """The evaluation transform: PIL image -> ``(3, img_size, img_size)`` tensor."""
        return self._eval_tf

    def setup(self, stage: str | None = None) -> None:
        """Builds the datasets. Lightning's call (`stage` given) comes before a resume's checkpoint state and
        leaves them to the first loader, so that a resume compares the data before reading it."""
        if stage is None and self.train_set is None:
            self.train_set, self.val_set = self._build_datasets()

    def _loader_args(self) -> dict[str, Any]:
        """The `DataLoader` arguments every loader of this module takes."""
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
            # each new iterator draws its workers' base seed from this generator: from the process's own it
            # would take a draw that a resumed run (iterator made after the restore) takes one step late, and
            # every drop-path and dropout mask after it would differ; the samples are seeded on their own
            "generator": torch.Generator().manual_seed(self.seed),
        }

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(dataset, **{**self._loader_args(), **kwargs})

    def _ranks(self) -> tuple[int, int]:
        """(world size, global rank) of the trainer this module serves; (1, 0) without one."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches in an order, and with augmentations, that a resumed run repeats exactly
        (`dynamixer.data.sampling`); sharded over the ranks of a distributed run."""
        self.setup()
        world_size, rank = self._ranks()
        if len(self.train_set) < self.batch_size * world_size:
            raise DataError(
                f"the training split has {len(self.train_set)} images, fewer than batch_size="
                f"{self.batch_size} x {world_size} rank(s); with drop_last=True no training step would run. "
                "Lower batch_size or add training images."
            )
        sampler = ResumableSampler(self.train_set, num_replicas=world_size, rank=rank, seed=self.seed)
        if self._resume is not None:
            sampler.set_epoch(self._resume["epoch"])
            sampler.start = self._resume["batches"] * self.batch_size
            self._resume = None
        return self._loader(SeededSamples(self.train_set), sampler=sampler, drop_last=True)

    def state_dict(self) -> dict[str, Any]:
        """Where training stands in the data, for a checkpoint: the epoch and how many of its batches are
        trained, with the batch size and rank count that define those batches, and the data's identity."""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return {}
        epoch, batches = trainer.current_epoch, batches_done(trainer)
        if batches >= trainer.num_training_batches:  # saved at the end of an epoch: the next one starts
            epoch, batches = epoch + 1, 0
        return {
            "epoch": epoch,
            "batches": batches,
            "batch_size": self.batch_size,
            "world_size": trainer.world_size,
            "data": self.identity(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict) or None
        if self._resume is not None:
            self._check_resume(self._resume, self._ranks()[0])

    def _check_resume(self, state: Mapping[str, Any], world_size: int) -> None:
        saved, now = (state["batch_size"], state["world_size"]), (self.batch_size, world_size)
        if saved != now:
            raise ConfigError(
                f"the checkpoint was trained with data.batch_size={saved[0]} on {saved[1]} rank(s), this run has "
                f"data.batch_size={now[0]} on {now[1]}: the batches, the steps per epoch and so the learning-rate "
                f"schedule would differ. Resume with data.batch_size={saved[0]} and {saved[1]} device(s) in all "
                "(trainer.devices x trainer.num_nodes), or start a new run from its weights."
            )
        recorded = state.get("data")
        if recorded is None:
            raise DataError(
                "the checkpoint records no identity of the data it trained on (it was written before dynamixer "
                "recorded one), so this resume cannot check that the data is the same: finish the run with the "
                "version that wrote it, or start a new run from its weights (model.pretrained_file=<checkpoint>)"
            )
        differ = differences(recorded, self.identity())
        stop_together(
            f"the data is not the data set this run trained on: {differ} (by content, wherever it lies). A "
            "resume trains on the data it started with: point the data options at that data set, or start a new "
            "run (a new run folder) to train on this one"
            if differ
            else None
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set)
