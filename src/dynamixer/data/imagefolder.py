"""ImageNet-style folder data: ``data_dir/{train,val}/<class>/<image>``."""

from __future__ import annotations

import os
import unicodedata
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from dynamixer.data.base import ClassificationDataModule
from dynamixer.data.images import load_rgb
from dynamixer.errors import DataError

SPLITS = ("train", "val")
_VERIFY_CHUNK = 256  # files per verify task, so ImageNet's 1.3M files do not become 1.3M pending futures
_VERIFY_LISTED = 20


def _image_files(directory: str) -> Iterator[str]:
    """Image files under ``directory`` in sorted order, following symlinked folders.

    Each real folder is read once, so a symlink loop neither recurses forever nor lists an image twice.
    """
    visited = set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:
            dirs.clear()
            continue
        visited.add(real)
        dirs.sort()
        yield from (os.path.join(root, f) for f in sorted(files) if has_file_allowed_extension(f, IMG_EXTENSIONS))


def _has_image(directory: str) -> bool:
    """True if ``directory`` (searched recursively, stopping at the first hit) holds an image file."""
    return next(_image_files(directory), None) is not None


def _unreadable(paths: list[str]) -> list[tuple[str, str]]:
    """``(path, reason)`` for each of ``paths`` that ``load_rgb`` cannot decode."""
    bad = []
    for path in paths:
        try:
            load_rgb(path)
        except DataError as err:
            bad.append((path, str(err.__cause__)))
    return bad


def _scan_split(split_dir: Path) -> dict[str, str]:
    """Class name (NFC-normalised) -> its folder name on disk, sorted by class name, for one split.

    Raises ``DataError`` if the split is missing, has no class folders, has a class folder without
    images, or has two folders that differ only in Unicode normalisation.
    """
    if not split_dir.is_dir():
        raise DataError(
            f"missing split folder {split_dir}. Expected the ImageNet layout "
            f"{split_dir.parent}/{{train,val}}/<class>/<image>; create it or point data_dir at the right folder."
        )
    with os.scandir(split_dir) as entries:
        folders = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise DataError(
            f"no class folders in {split_dir}. Put each class's images in its own subfolder, "
            f"e.g. {split_dir}/n01440764/*.JPEG."
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
    classes = dict(sorted(classes.items()))
    empty = [c for c, folder in classes.items() if not _has_image(str(split_dir / folder))]
    if empty:
        raise DataError(
            f"{len(empty)} class folder(s) under {split_dir} hold no images "
            f"(extensions {', '.join(IMG_EXTENSIONS)}), e.g. {empty[:5]}. Add images or remove those folders."
        )
    return classes


class CheckedImageFolder(ImageFolder):
    """torchvision ``ImageFolder`` with a fixed class list, a loop-safe file listing and checked decoding.

    ``folders`` maps each class name, in label order, to its folder under ``root``.
    Items are ``(tensor (3, H, W), label)``, decoded by ``load_rgb``. A file that cannot be decoded raises
    ``DataError`` naming it; with ``skip_corrupt=True`` it is instead warned about,
    recorded in ``corrupt_files`` and replaced by the next readable sample (so a
    batch may hold a duplicate). ``corrupt_files`` is this process's; each skipped file is also appended to
    ``corrupt_log`` when given, a line a file, so what loader workers and other ranks find is counted too.
    """

    def __init__(
        self,
        root: str,
        folders: Mapping[str, str],
        transform: Callable,
        skip_corrupt: bool,
        corrupt_log: str | os.PathLike | None = None,
    ) -> None:
        self._folders = dict(folders)
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
        classes = list(self._folders)
        return classes, {c: i for i, c in enumerate(classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], **_: Any) -> list[tuple[str, int]]:
        # torchvision's extension arguments are ignored: the listing always keeps IMG_EXTENSIONS
        return [
            (path, class_to_idx[name])
            for name, folder in self._folders.items()
            for path in _image_files(os.path.join(directory, folder))
        ]

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
    """ImageNet-1K layout ``data_dir/train/<wnid>/*.JPEG`` and ``data_dir/val/<wnid>/*.JPEG``.

    The folder tree is checked at construction (both splits exist, hold class
    folders with images, and name the same classes) so ``num_classes`` is known
    before the model is built; file lists are read in ``setup``. Class names are the
    NFC forms of the folder names (so a split may spell one in NFD); labels index
    their sorted list. See ``CheckedImageFolder`` for ``skip_corrupt``. With
    ``verify=True``, ``setup`` decodes every file once with ``max(1, num_workers)``
    threads and raises one ``DataError`` listing the unreadable ones, or, with
    ``skip_corrupt=True``, drops them from the samples up front with a warning.
    """

    defaults = {"num_workers": 8}  # ImageNet decoding needs workers; the rest are the base defaults
    # the paper's augmentation (conf/data/imagenet.yaml states all of it): RandAugment and random erasing
    default_train_aug = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25}

    def __init__(
        self,
        data_dir: str,
        skip_corrupt: bool = False,
        verify: bool = False,
        corrupt_log: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**{**self.defaults, **kwargs})
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.skip_corrupt = bool(skip_corrupt)
        self.corrupt_log = corrupt_log
        self.verify = bool(verify)
        if not self.data_dir.is_dir():
            raise DataError(
                f"data_dir {self.data_dir} does not exist or is not a folder. Set data_dir to the "
                "dataset root holding train/ and val/ (ImageNet layout train/<wnid>/*.JPEG)."
            )
        self._folders = {s: _scan_split(self.data_dir / s) for s in SPLITS}
        train_classes, val_classes = (list(self._folders[s]) for s in SPLITS)
        if train_classes != val_classes:
            only_train = sorted(set(train_classes) - set(val_classes))
            only_val = sorted(set(val_classes) - set(train_classes))
            raise DataError(
                f"train/ and val/ under {self.data_dir} have different class folders "
                f"({len(train_classes)} vs {len(val_classes)}): only in train {only_train[:5]}, "
                f"only in val {only_val[:5]}. Both splits must contain the same class folders."
            )
        self._classes = train_classes

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

    def _build_datasets(self) -> tuple[CheckedImageFolder, CheckedImageFolder]:
        datasets = tuple(
            CheckedImageFolder(
                str(self.data_dir / split), self._folders[split], tf, self.skip_corrupt, self.corrupt_log
            )
            for split, tf in zip(SPLITS, (self._train_tf, self._eval_tf))
        )
        if self.verify:
            self._verify(datasets)
        return datasets

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
