"""WebDataset tar shards (`data=wds`), read with the `webdataset` library, resumable at the saved batch.

How an epoch is read, all of it a function of `(seed, epoch)`:

* The shards are put in an order drawn from `(seed, epoch)` and dealt to `ranks x workers` streams (stream
  `rank * workers + worker` takes every `ranks x workers`-th shard): no two streams share a shard.
* Each stream reads its shards in turn and shuffles their samples in a buffer (`shuffle_buffer` samples)
  whose generator is seeded by `(seed, epoch, stream)`; a sample's augmentation draws are seeded by
  `(seed, epoch, its key)`.
* Every stream yields the same number of full batches, in every epoch (what the smallest stream of any
  deal holds), so every rank trains the same number of steps; what a stream holds beyond that is left out
  of this epoch (another epoch deals the shards again). Shards of about equal size, at least a few per
  stream, keep that small: the converter (`python -m dynamixer.data.convert --to wds`) writes such shards.

A resumed run continues at the saved batch: each worker reads its streams up to the samples it had yielded
(through the shuffle buffer, without decoding them) and goes on from there, so the batches after a resume
are those of the uninterrupted run. The order depends on the worker count, so a resume refuses another
`data.num_workers`. The shard list and the sample counts come from the converter's `info.json`.

The validation shards are read with random access instead (`TarSamples`: each file's offset taken from the
tar headers once), as a map-style data set that Lightning shards over the ranks: every rank evaluates the
same number of batches (the ranks meet at each batch's end) and no sample is left out.

Every shard is opened here as a plain, uncompressed local tar (not through webdataset's URL opener, which
runs `pipe:` commands and rewrites paths from the environment), each file of a sample at most
`MAX_MEMBER_BYTES`, each shard's count checked against `info.json`'s and each class index against its classes.
"""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from collections.abc import Callable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision.datasets.folder import IMG_EXTENSIONS

from dynamixer.bounded import expand_braces
from dynamixer.data.base import IMAGENET_DEFAULTS, IMAGENET_TRAIN_AUG, ClassificationDataModule
from dynamixer.data.convert import WDS_FORMAT, WDS_INFO
from dynamixer.data.identity import SHARD_EDGE, digest_of, files_identity
from dynamixer.data.images import load_rgb
from dynamixer.data.sampling import generator_states, restore_generators, sample_seed, seed_generators
from dynamixer.errors import ConfigError, DataError
from dynamixer.machinery.lightning_internals import epoch_being_trained
from dynamixer.schema import Location

IMAGE_KEYS = tuple(ext.lstrip(".") for ext in IMG_EXTENSIONS)  # what the converter writes: the folder source's
MAX_MEMBER_BYTES = 64 << 20  # a file of a sample, read whole into memory: an ImageNet JPEG is ~110 kB
_MAX_INFO_BYTES = 64 << 20


def _member_name(shard: str, name: str, seen: set[str]) -> tuple[str | None, str | None]:
    """The (key, extension) of a tar member of a sample (None for a file that is none), refusing a name given
    twice and webdataset's own fields (`__key__`, `__url__`), which a member must not set."""
    from webdataset.tariterators import base_plus_ext

    if name in seen:
        raise DataError(f"{shard} holds {name[:200]!r} twice: convert the data again")
    seen.add(name)
    key, ext = base_plus_ext(name)
    if ext is not None and (ext.startswith("_") or key.startswith("_")):
        raise DataError(f"{shard} holds a member {name[:200]!r}, a name no sample's file has: convert the data again")
    return key, ext


def _tar_files(path: str) -> Iterator[dict[str, Any]]:
    """The regular files of the uncompressed tar at `path`, in order, as webdataset's file records
    (`fname`, `data`, `__url__`); opened here, not through webdataset's URL opener (which takes `pipe:` and
    rewrites from the environment). A member over `MAX_MEMBER_BYTES`, or a file that is no plain tar,
    raises `DataError`."""
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            seen: set[str] = set()
            for member in tar:
                if not member.isfile():
                    continue
                _member_name(path, member.name, seen)
                if member.size > MAX_MEMBER_BYTES:
                    raise DataError(
                        f"{path}: {member.name} is {member.size} bytes, over the {MAX_MEMBER_BYTES >> 20} MiB a "
                        "sample's file may hold: remove it, or convert the data again"
                    )
                yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": path}
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"cannot read the tar shard {path} ({err}): replace it, or convert the data again") from None


def _counted(shards: list[str], counts: dict[str, int]) -> Iterator[dict[str, Any]]:
    """The samples of `shards` in order (webdataset's grouping of a tar's files by key), each shard's count
    checked against `info.json`'s: a stream that ended early would train fewer steps than the other ranks."""
    from webdataset.tariterators import group_by_keys

    for shard in shards:
        found = 0
        for sample in group_by_keys(_tar_files(shard)):
            found += 1
            yield sample
        if found != counts[shard]:
            raise DataError(
                f"{shard} holds {found} samples, its info.json says {counts[shard]}: the shard or info.json was "
                "changed; convert the data again"
            )


class ShardStream(IterableDataset):
    """The training samples of the shards for one rank, as the module docstring describes: items
    ``(transform(image), label)``. ``epoch`` and ``start`` (batches of this rank already trained in the
    epoch) are set by the loader before each epoch's iteration (`EpochLoader`)."""

    def __init__(
        self,
        shards: list[str],
        counts: list[int],
        transform: Callable,
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        batch_size: int,
        shuffle_buffer: int,
        num_classes: int,
    ) -> None:
        self.shards, self.counts, self.transform, self.num_classes = shards, counts, transform, num_classes
        self.seed, self.rank, self.world_size, self.workers = seed, rank, world_size, max(1, workers)
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.epoch, self.start = 0, 0

    @property
    def streams(self) -> int:
        return self.world_size * self.workers

    def dealt(self, epoch: int) -> list[list[int]]:
        """Each stream's shard indices in `epoch`."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()
        return [order[s :: self.streams] for s in range(self.streams)]

    def quota(self) -> int:
        """Batches each stream yields in a training epoch: what the smallest stream of any epoch holds (a stream
        is dealt at least `shards // streams` shards, at worst the smallest ones), so every epoch has as many."""
        fewest = sorted(self.counts)[: len(self.counts) // self.streams]
        return sum(fewest) // self.batch_size

    def __len__(self) -> int:
        return self.quota() * self.workers * self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.workers:
            raise RuntimeError(f"{type(self).__name__} made for {self.workers} workers runs in {workers}")
        epoch, start = self.epoch, self.start  # read now: the loader resets start once the epoch has begun
        # the loader takes batch i from worker i % workers, its first from worker 0: after `start` batches
        # worker 0 goes on with the stream whose turn is next
        mine = (worker + start) % self.workers
        stream = self.rank * self.workers + mine
        urls = [self.shards[i] for i in self.dealt(epoch)[stream]]
        done = len(range(mine, start, self.workers))  # this stream's batches among the first `start`
        skip, stop = done * self.batch_size, self.quota() * self.batch_size
        return self._samples(urls, epoch, stream, skip, stop, restore=info is None)

    def _samples(self, urls: list[str], epoch: int, stream: int, skip: int, stop: int, restore: bool):
        import webdataset as wds

        rng = random.Random(int(sample_seed(self.seed, epoch, stream)))
        counts = dict(zip(self.shards, self.counts))
        pipeline = wds.DataPipeline(
            lambda: _counted(urls, counts),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng),
        )
        for sample in islice(pipeline, skip, stop):
            yield self._decode(sample, epoch, restore)

    def _decode(self, sample: Mapping[str, Any], epoch: int, restore: bool) -> tuple[torch.Tensor, int]:
        states = generator_states() if restore else None
        seed_generators(sample_seed(self.seed, epoch, _key_number(sample["__key__"])))
        try:
            return _decode(sample, self.transform, self.num_classes)
        finally:
            if states is not None:  # in the training process itself (no workers): leave its generators alone
                restore_generators(states)


def _key_number(key: str) -> int:
    """A sample's key as the number its augmentation seed is drawn from (64 bits of its sha256)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def _decode(sample: Mapping[str, Any], transform: Callable, num_classes: int) -> tuple[torch.Tensor, int]:
    """A shard's sample (its files by extension) as ``(transform(image), label)``."""
    name = f"{sample.get('__url__')}:{sample['__key__']}"
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None or "cls" not in sample:
        raise DataError(
            f"sample {name} has {sorted(k for k in sample if not k.startswith('__'))}: a sample needs an image "
            f"({', '.join(IMAGE_KEYS)}) and its class index (cls)"
        )
    try:
        label = int(sample["cls"])
    except ValueError:
        label = -1
    if not 0 <= label < num_classes:
        raise DataError(
            f"sample {name}: cls={sample['cls'][:20]!r} is not a class index of the {num_classes} classes in "
            "info.json: convert the data again"
        )
    return transform(load_rgb(name, data=sample[key])), label


class TarSamples(Dataset):
    """The samples of tar shards with random access (each file's offset read from the tar headers once):
    items ``(transform(image), label)``, as a map-style data set. The validation split, so that Lightning's
    sampler gives every rank the same number of batches, with no sample left out."""

    def __init__(self, shards: list[str], counts: list[int], transform: Callable, num_classes: int) -> None:
        self.transform, self.num_classes = transform, num_classes
        self.samples: list[tuple[str, str, dict[str, tuple[int, int]]]] = []  # (shard, key, ext -> (offset, size))
        for shard, count in zip(shards, counts):
            found: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with tarfile.open(shard, "r:") as tar:  # an uncompressed tar's headers: nothing is extracted
                    seen: set[str] = set()
                    for member in tar:
                        key, ext = _member_name(shard, member.name, seen) if member.isfile() else (None, None)
                        if key is not None and member.size <= MAX_MEMBER_BYTES:
                            found.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
            except (OSError, tarfile.TarError) as err:
                raise DataError(
                    f"cannot read the tar shard {shard} ({err}): replace it, or convert the data again"
                ) from None
            kept = {k: f for k, f in found.items() if "cls" in f and any(e in f for e in IMAGE_KEYS)}
            if len(kept) != count or len(found) != count:
                raise DataError(
                    f"{shard} holds {len(kept)} samples with an image (at most {MAX_MEMBER_BYTES >> 20} MiB) and a "
                    f"cls among {len(found)} keys, its info.json says {count}: convert the data again"
                )
            self.samples += [(shard, key, files) for key, files in kept.items()]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        shard, key, files = self.samples[index]
        with open(shard, "rb") as f:

            def read(ext: str) -> bytes:
                offset, size = files[ext]
                f.seek(offset)
                return f.read(size)

            sample = {
                "__url__": shard,
                "__key__": key,
                **{ext: read(ext) for ext in files if ext in (*IMAGE_KEYS, "cls")},
            }
        return _decode(sample, self.transform, self.num_classes)


class EpochLoader(DataLoader):
    """A `DataLoader` of a `ShardStream` that gives it the trainer's epoch (`epoch()`) as each epoch's
    iteration starts; a resumed run's first iteration has the saved epoch and position (`resume_at`)."""

    def __init__(self, dataset: ShardStream, epoch: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch = epoch
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches trained in it)

    def __iter__(self):
        # Lightning makes a resumed run's first iterator before its epoch counter is restored: the saved one
        self.dataset.epoch, self.dataset.start = self.resume_at or (self.epoch(), 0)
        self.resume_at = None
        return super().__iter__()  # the workers take their copy of the stream now


class WebDataModule(ClassificationDataModule):
    """ImageNet-1K (or any classification set) as WebDataset shards under ``data_dir``, described by its
    ``info.json`` (class names, each shard's sample count; `dynamixer.data.convert` writes it).

    ``train_shards`` and ``val_shards`` are brace patterns of shard files relative to ``data_dir`` (e.g.
    ``train-{000000..000127}.tar``); ``None`` takes the split's shards in ``info.json``. Only local files
    are read (no URLs, no ``pipe:``). See the module docstring for the order and the resume.
    """

    defaults = IMAGENET_DEFAULTS
    default_train_aug = IMAGENET_TRAIN_AUG

    def __init__(
        self,
        data_dir: Location[str],
        train_shards: str | None = None,
        val_shards: str | None = None,
        shuffle_buffer: int = 1000,
        **kwargs: Any,
    ) -> None:
        super().__init__(**{**self.defaults, **kwargs})
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.shuffle_buffer = int(shuffle_buffer)
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer={shuffle_buffer}: give 1 or more samples, e.g. 1000")
        info = self._read_info()
        self._classes = info["classes"]
        self._shards = {
            "train": self._listed(info, "train", train_shards),
            "val": self._listed(info, "val", val_shards),
        }

    def _read_info(self) -> dict[str, Any]:
        path = self.data_dir / WDS_INFO
        expected = (
            f"WebDataset shards with the {WDS_INFO} that `python -m dynamixer.data.convert <folder data set> "
            f"{self.data_dir} --to wds` writes (class names, each shard's sample count)"
        )
        if not path.is_file():
            raise DataError(f"no {path}: data=wds reads {expected}")
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_INFO_BYTES + 1)
            info = json.loads(raw) if len(raw) <= _MAX_INFO_BYTES else None
        except (OSError, ValueError, RecursionError) as err:
            raise DataError(f"{path} is not JSON ({err}): data=wds reads {expected}") from None
        classes = info.get("classes") if isinstance(info, dict) else None
        ok = (
            isinstance(info, dict)
            and info.get("format") == WDS_FORMAT
            and isinstance(classes, list)
            and all(isinstance(c, str) for c in classes)
            and len(set(classes)) == len(classes) >= 1
        )
        splits = info.get("splits") if ok else None
        if (
            not ok
            or not isinstance(splits, dict)
            or not all(
                isinstance(s, dict)
                and isinstance(s.get("shards"), list)
                and isinstance(s.get("counts"), list)
                and len(s["shards"]) == len(s["counts"])
                and all(isinstance(n, str) and "/" not in n and n not in ("", ".", "..") for n in s["shards"])
                and all(isinstance(c, int) and c >= 0 for c in s["counts"])
                for s in splits.values()
            )
            or any(len(set(s["shards"])) != len(s["shards"]) for s in splits.values())  # a shard read twice
            or len({n for s in splits.values() for n in s["shards"]}) != sum(len(s["shards"]) for s in splits.values())
        ):
            raise DataError(f"{path} is not an info file of format {WDS_FORMAT}: data=wds reads {expected}")
        return info

    def _listed(self, info: dict[str, Any], split: str, pattern: str | None) -> tuple[list[str], list[int]]:
        """The split's shard paths and sample counts: `pattern`'s files, or all of `info.json`'s."""
        known = info["splits"].get(split, {"shards": [], "counts": []})
        count = dict(zip(known["shards"], known["counts"]))
        names = expand_braces(pattern, f"data.{split}_shards") if pattern is not None else list(known["shards"])
        if len(set(names)) != len(names):
            raise DataError(f"data.{split}_shards={pattern} names a shard twice: give each shard once")
        unknown = [n for n in names if n not in count]
        if not names or unknown:
            raise DataError(
                f"data.{split}_shards={pattern}: {len(unknown)} of its {len(names)} shards are not {split} shards "
                f"of {self.data_dir / WDS_INFO} (e.g. {unknown[:3]}); it lists {known['shards'][:3]}... Give a "
                "brace pattern of shard files in data_dir, e.g. train-{000000..000127}.tar"
            )
        missing = [n for n in names if not (self.data_dir / n).is_file()]
        if missing:
            raise DataError(
                f"{len(missing)} shard(s) of data.{split}_shards are missing in {self.data_dir}, e.g. {missing[:3]}"
            )
        return [str(self.data_dir / n) for n in names], [count[n] for n in names]

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    def _content(self) -> dict[str, str]:
        shards = {Path(p).name: p for split in ("train", "val") for p in self._shards[split][0]}
        return {"classes": digest_of(self._classes), **files_identity(shards, SHARD_EDGE)}

    def _build_datasets(self) -> tuple[Any, TarSamples]:
        # the training streams are made per rank by its loader; the validation split is map-style
        return self._shards["train"], TarSamples(*self._shards["val"], self._eval_tf, self.num_classes)

    def _stream(self, world_size: int, rank: int) -> ShardStream:
        self.setup()
        shards, counts = self._shards["train"]
        return ShardStream(
            shards,
            counts,
            self._train_tf,
            self.seed,
            rank,
            world_size,
            self.num_workers,
            self.batch_size,
            self.shuffle_buffer,
            self.num_classes,
        )

    def train_dataloader(self) -> DataLoader:
        world_size, rank = self._ranks()
        stream = self._stream(world_size, rank)
        if stream.quota() < 1:
            raise DataError(
                f"{len(stream.shards)} training shards for {stream.streams} streams ({world_size} rank(s) x "
                f"{stream.workers} worker(s)) leave a stream less than one batch of {self.batch_size}: write more, "
                "smaller shards (python -m dynamixer.data.convert ... --shard-size), or use fewer data.num_workers"
            )
        trained, total = stream.quota() * stream.streams * self.batch_size, sum(stream.counts)
        if trained < 0.95 * total:
            rank_zero_warn(
                f"data=wds: an epoch trains {trained} of the {total} training samples: {len(stream.shards)} shards "
                f"dealt to {stream.streams} streams ({world_size} rank(s) x {stream.workers} worker(s)) give every "
                "stream only as many batches as the smallest deal holds. Write more shards of equal size "
                "(python -m dynamixer.data.convert ... --shard-size), or use fewer data.num_workers"
            )
        trainer = self.trainer
        loader = self._epoch_loader(stream, lambda: epoch_being_trained(trainer) if trainer is not None else 0)
        if self._resume is not None:
            loader.resume_at = self._resume["epoch"], self._resume["batches"]
            self._resume = None
        return loader

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set)  # map-style: Lightning gives each rank an equal share

    def _epoch_loader(self, stream: ShardStream, epoch: Callable[[], int]) -> EpochLoader:
        # new workers each epoch: they take their copy of the stream, with its epoch, when they start
        return EpochLoader(stream, epoch, **{**self._loader_args(), "persistent_workers": False})

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        return {**state, "num_workers": self.num_workers} if state else state

    def _check_resume(self, state: Mapping[str, Any], world_size: int) -> None:
        super()._check_resume(state, world_size)
        if state.get("num_workers") != self.num_workers:
            raise ConfigError(
                f"the checkpoint read its WebDataset shards with data.num_workers={state.get('num_workers')}, this "
                f"run has {self.num_workers}: the shards are dealt to ranks x workers streams, so the order would "
                f"differ. Resume with data.num_workers={state.get('num_workers')}"
            )
