"""ImageNet-style folder data: ``data_dir/{train,val}/<class>/<image>``, or the official flat ``val/``."""

from __future__ import annotations

import os
import unicodedata
import warnings
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from dynamixer.data.base import (
    IMAGENET_DEFAULTS,
    IMAGENET_TRAIN_AUG,
    ClassificationDataModule,
    rank_zero_first,
    stop_together,
)
from dynamixer.data.file_index import FileIndex, describe_differences, images_under
from dynamixer.data.identity import WHOLE, file_digest
from dynamixer.data.images import load_rgb
from dynamixer.data.val_labels import SEARCHED, find_label_file, read_val_labels
from dynamixer.errors import DataError
from dynamixer.schema import Location, Speed

SPLITS = ("train", "val")
_VERIFY_CHUNK = 256  # files per verify task, so ImageNet's 1.3M files do not become 1.3M pending futures
_VERIFY_LISTED = 20


def _unreadable(paths: list[str]) -> list[tuple[str, str]]:
    """``(path, reason)`` for each of ``paths`` that ``load_rgb`` cannot decode."""
    bad = []
    for path in paths:
        try:
            load_rgb(path)
        except DataError as err:
            bad.append((path, str(err.__cause__)))
    return bad


def _describe(folder: Path) -> str:
    """What `folder` holds, for a message: a few of its entries, or that it is missing or empty."""
    if not folder.is_dir():
        return f"{folder} does not exist"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    more = f", ... ({len(names)} in all)" if len(names) > 8 else ""
    return f"{folder} holds {', '.join(names[:8]) or 'nothing'}{more}"


def _class_folders(split_dir: Path) -> dict[str, str]:
    """Class name (NFC-normalised) -> its folder name on disk, sorted by class name, for one split: its
    top-level folders (one listing of the split folder; their images are listed by the file index).

    Raises ``DataError`` if the split has no class folders or two folders that differ only in Unicode
    normalisation.
    """
    with os.scandir(split_dir) as entries:
        folders = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise DataError(
            f"no class folders in {split_dir} ({_describe(split_dir)}). Put each class's images in its own "
            f"subfolder, e.g. {split_dir}/n01440764/*.JPEG."
        )
    classes: dict[str, str] = {}
    for folder in folders:
        name = unicodedata.normalize("NFC", folder)
        if name in classes:
            raise DataError(
                f"class folders {classes[name]!r} and {folder!r} under {split_dir} are one name in two "
                f"Unicode normal forms ({classes[name]!a} vs {folder!a}). Merge them into one folder."
            )
        classes[name] = folder
    return dict(sorted(classes.items()))


def _is_flat(split_dir: Path) -> bool:
    """True for ImageNet's official validation folder: image files at its top, no class folders."""
    with os.scandir(split_dir) as entries:
        found = [(e.is_dir(), has_file_allowed_extension(e.name, IMG_EXTENSIONS)) for e in entries]
    return any(image for _, image in found) and not any(folder for folder, _ in found)


class CheckedImageFolder(ImageFolder):
    """torchvision ``ImageFolder`` over a given listing, with checked decoding.

    ``classes`` are the class names in label order, ``samples`` the ``(path, label)`` pairs (from the file
    index, ``dynamixer.data.file_index``). Items are ``(tensor (3, H, W), label)``, decoded by ``load_rgb``.
    A file that cannot be decoded raises ``DataError`` naming it; with ``skip_corrupt=True`` it is instead
    warned about, recorded in ``corrupt_files`` and replaced by the next readable sample (so a batch may hold
    a duplicate). ``corrupt_files`` is this process's; each skipped file is also appended to
    ``corrupt_log`` when given, a line a file, so what loader workers and other ranks find is counted too.
    """

    def __init__(
        self,
        root: str,
        classes: list[str],
        samples: list[tuple[str, int]],
        transform: Callable,
        skip_corrupt: bool,
        corrupt_log: str | os.PathLike | None = None,
    ) -> None:
        self._listing = list(classes), list(samples)
        super().__init__(root, transform=transform, loader=load_rgb)
        self.skip_corrupt = skip_corrupt
        self.corrupt_log = corrupt_log
        self.corrupt_files: set[str] = set()

    def _record(self, paths: Collection[str]) -> None:
        self.corrupt_files.update(paths)
        if self.corrupt_log is not None and paths:
            # one short append a line: whole lines, whichever worker or rank writes at the same time
            with open(self.corrupt_log, "a") as log:
                log.write("".join(f"{path}\n" for path in paths))

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = self._listing[0]
        return classes, {c: i for i, c in enumerate(classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], **_: Any) -> list[tuple[str, int]]:
        return self._listing[1]

    def drop(self, paths: Collection[str]) -> None:
        """Remove ``paths`` from the samples and record them in ``corrupt_files``."""
        self._record([path for path, _ in self.samples if path in paths])
        self.samples = self.imgs = [s for s in self.samples if s[0] not in paths]
        self.targets = [target for _, target in self.samples]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        for offset in range(n):
            path, target = self.samples[(index + offset) % n]
            if path in self.corrupt_files:
                continue
            try:
                img = self.loader(path)
            except DataError as err:
                if not self.skip_corrupt:
                    raise DataError(f"{err}, or set data.skip_corrupt=true to skip unreadable images") from err
                self._record([path])
                warnings.warn(f"skipping unreadable image {path}: {err.__cause__}", stacklevel=2)
                continue
            return self.transform(img), target
        raise DataError(f"no readable image under {self.root}; every file failed to decode.")


class ImageFolderDataModule(ClassificationDataModule):
    """ImageNet-1K as folders: ``data_dir/train/<wnid>/*.JPEG`` and either ``data_dir/val/<wnid>/*.JPEG`` or
    the official flat ``data_dir/val/*.JPEG`` with its label file (``dynamixer.data.val_labels``: Kaggle's
    ``LOC_val_solution.csv`` or the devkit's ground truth, found beside the data or given as ``val_labels``).

    The class folders are read at construction (one listing of each split folder), so ``num_classes`` is
    known before the model is built. Their files are listed in ``setup`` into the file index
    (``dynamixer.data.file_index``): with ``index_file`` set, rank 0 lists them once and writes it, every
    rank and every restart reads it, and a restart refuses a data set that changed. Class names are the NFC
    forms of the folder names (so a split may spell one in NFD); labels index their sorted list. See
    ``CheckedImageFolder`` for ``skip_corrupt``. With ``verify=True``, ``setup`` decodes every file once with
    ``max(1, num_workers)`` threads and raises one ``DataError`` listing the unreadable ones, or, with
    ``skip_corrupt=True``, drops them from the samples up front with a warning.
    """

    defaults = IMAGENET_DEFAULTS
    default_train_aug = IMAGENET_TRAIN_AUG

    def __init__(
        self,
        data_dir: Location[str],
        skip_corrupt: bool = False,
        verify: Speed[bool] = False,
        corrupt_log: Location[str | None] = None,
        index_file: Location[str | None] = None,
        val_labels: Location[str | None] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**{**self.defaults, **kwargs})
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.skip_corrupt = bool(skip_corrupt)
        self.corrupt_log = corrupt_log
        self.verify = bool(verify)
        self.index_file = None if index_file is None else Path(index_file).expanduser().absolute()
        expected = (
            "Expected train/<class>/<image> and either val/<class>/<image> or ImageNet's flat val/<image> with "
            "LOC_val_solution.csv or the devkit beside it (data.val_labels=<file>). Parquet shards or a "
            "save_to_disk folder: data=hf; WebDataset tar shards: data=wds"
        )
        if not self.data_dir.is_dir():
            raise DataError(
                f"data_dir {self.data_dir} does not exist or is not a folder. Set data_dir to the data set's root "
                "(ImageNet layout: train/<wnid>/*.JPEG and val/)"
            )
        missing = [str(self.data_dir / s) for s in SPLITS if not (self.data_dir / s).is_dir()]
        if missing:
            raise DataError(f"missing split folder {' and '.join(missing)}: {_describe(self.data_dir)}. {expected}")
        self._folders = {"train": _class_folders(self.data_dir / "train")}
        self._classes = list(self._folders["train"])
        self.val_labels: Path | None = None
        val_dir = self.data_dir / "val"
        if val_labels is not None or _is_flat(val_dir):
            self.val_labels = Path(val_labels).expanduser().absolute() if val_labels else find_label_file(self.data_dir)
            if self.val_labels is None or not self.val_labels.is_file():
                raise DataError(
                    f"{val_dir} holds images without class folders (ImageNet's official validation layout), but "
                    f"no label file was found ({self.val_labels or ', '.join(SEARCHED)} beside the data). "
                    "Give data.val_labels=<LOC_val_solution.csv or ILSVRC2012_validation_ground_truth.txt>"
                )
            return
        self._folders["val"] = _class_folders(val_dir)
        val_classes = list(self._folders["val"])
        if self._classes != val_classes:
            only_train = sorted(set(self._classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(self._classes))
            raise DataError(
                f"train/ and val/ under {self.data_dir} have different class folders "
                f"({len(self._classes)} vs {len(val_classes)}): only in train {only_train[:5]}, "
                f"only in val {only_val[:5]}. Both splits must contain the same class folders."
            )

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    @property
    def corrupt_files(self) -> list[str]:
        """Unreadable files skipped so far: by this process, by ``verify``, and (with ``corrupt_log``) by every
        loader worker and rank of the run (see ``CheckedImageFolder``)."""
        found = set()
        for ds in (self.train_set, self.val_set):
            if ds is not None:
                found |= ds.corrupt_files
        if self.corrupt_log is not None and os.path.isfile(self.corrupt_log):
            with open(self.corrupt_log) as log:
                found |= {line.rstrip("\n") for line in log if line.strip()}
        return sorted(found)

    @property
    def corrupt_count(self) -> int:
        return len(self.corrupt_files)

    def _file_index(self) -> FileIndex:
        """The listing of both splits: built, or (with ``index_file``) made or checked by rank 0 and then read
        by every other rank, each checking it against the data it sees."""
        roots = {split: self.data_dir / split for split in SPLITS}
        if self.index_file is None:
            return FileIndex.build(roots)
        path, made = self.index_file, []

        def on_rank_zero() -> None:
            if path.is_file():
                index = FileIndex.read(path)
                if set(index.splits) != set(SPLITS):
                    raise DataError(
                        f"{path} is the index of another data set (splits {sorted(index.splits)}). "
                        "Delete it to list this one, or set data.index_file to another file"
                    )
                changed, differ = index.refresh(roots)
                if differ:
                    raise DataError(
                        f"the data changed since this run listed it ({describe_differences(roots, differ)})\n"
                        "A resumed run trains on the data it started with: restore those files, or start a new "
                        "run (a new run folder) to train on the changed data"
                    )
                if changed:
                    index.write(path)
            else:
                index = FileIndex.build(roots)
                index.write(path)
            made.append(index)

        rank_zero_first(on_rank_zero)
        if made:
            stop_together(None)
            return made[0]
        if not path.is_file():
            stop_together(
                f"rank 0 wrote the data index {path}, but this node does not see it: put paths.output_dir (or "
                "data.index_file) on a file system every node shares"
            )
        try:
            index = FileIndex.read(path)
            _, differ = index.refresh(roots)  # a node's own copy of the data: listed again where its times differ
        except (DataError, OSError) as err:  # told to every rank, which would otherwise wait for this one
            stop_together(f"cannot read the data index rank 0 wrote: {err}")
        stop_together(
            f"the data it sees is not what rank 0 listed ({describe_differences(roots, differ)}). Give every "
            "rank the same data (data.data_dir) and start again"
            if differ
            else None
        )
        return index

    def _samples(self, index: FileIndex) -> dict[str, list[tuple[str, int]]]:
        """``(path, label)`` of each split, from the index."""
        label = {name: i for i, name in enumerate(self._classes)}
        samples = {}
        for split, folders in self._folders.items():
            root = self.data_dir / split
            listed = {name: list(images_under(index.splits[split], folder)) for name, folder in folders.items()}
            empty = [name for name, files in listed.items() if not files]
            if empty:
                raise DataError(
                    f"{len(empty)} class folder(s) under {root} hold no images "
                    f"(extensions {', '.join(IMG_EXTENSIONS)}), e.g. {empty[:5]}. Add images or remove those folders."
                )
            prefix = f"{root}{os.sep}"  # 1.3M Path joins would take seconds
            samples[split] = [(prefix + rel, label[name]) for name, files in listed.items() for rel in files]
        if self.val_labels is not None:
            samples["val"] = self._flat_val_samples(index, label)
        return samples

    def _flat_val_samples(self, index: FileIndex, label: dict[str, int]) -> list[tuple[str, int]]:
        root = self.data_dir / "val"
        files = [name for name, *_ in index.splits["val"][""]["files"]]
        wnids = read_val_labels(self.val_labels, files)
        unlabelled = [f for f in files if os.path.splitext(f)[0] not in wnids]
        unknown = sorted({w for w in wnids.values() if w not in label})
        if unlabelled or unknown:
            raise DataError(
                f"{self.val_labels} does not label the validation folder {root}: "
                f"{len(unlabelled)} of its {len(files)} images have no label (e.g. {unlabelled[:3]}), "
                f"{len(unknown)} labels are no class folder of train/ (e.g. {unknown[:3]}). Give the label file of "
                "these images (data.val_labels=<file>)"
            )
        return [(f"{root}{os.sep}{f}", label[wnids[os.path.splitext(f)[0]]]) for f in files]

    def listing(self) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
        """The class names and each split's ``(path, label)`` samples, as training reads them."""
        return self.class_names, self._samples(self._file_index())

    def _build_datasets(self) -> tuple[CheckedImageFolder, CheckedImageFolder]:
        self._index = self._file_index()
        samples = self._samples(self._index)
        datasets = tuple(
            CheckedImageFolder(
                str(self.data_dir / split), self._classes, samples[split], tf, self.skip_corrupt, self.corrupt_log
            )
            for split, tf in zip(SPLITS, (self._train_tf, self._eval_tf))
        )
        if self.verify:
            self._verify(datasets)
        return datasets

    def _content(self) -> dict[str, str]:
        self.setup()  # the listing, with each file's digest
        labels = {} if self.val_labels is None else {"val labels": file_digest(self.val_labels, WHOLE)}
        return {**self._index.identity(), **labels}

    def _verify(self, datasets: tuple[CheckedImageFolder, ...]) -> None:
        paths = [path for ds in datasets for path, _ in ds.samples]
        # under DDP each rank decodes its share and all learn what every rank found: the ranks drop the same
        # files (their samplers need the same data set) or stop together with the same message
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        share = paths[rank::world]
        chunks = [share[i : i + _VERIFY_CHUNK] for i in range(0, len(share), _VERIFY_CHUNK)]
        with ThreadPoolExecutor(max(1, self.num_workers)) as pool:
            found = [item for items in pool.map(_unreadable, chunks) for item in items]
        if distributed:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, found)
            found = [item for items in gathered for item in items]
        bad = dict(sorted(found))
        if not bad:
            return
        if not self.skip_corrupt:
            listed = "".join(f"\n  {path}: {reason}" for path, reason in list(bad.items())[:_VERIFY_LISTED])
            more = f"\n  ... and {len(bad) - _VERIFY_LISTED} more" if len(bad) > _VERIFY_LISTED else ""
            raise DataError(
                f"{len(bad)} of {len(paths)} images under {self.data_dir} cannot be read:{listed}{more}\n"
                "Replace or delete these files, or set data.skip_corrupt=true to leave them out."
            )
        for ds in datasets:
            ds.drop(bad.keys())
        warnings.warn(
            f"verify=True found {len(bad)} unreadable image(s) under {self.data_dir}; skipping them, "
            f"e.g. {list(bad)[:5]}",
            stacklevel=2,
        )
