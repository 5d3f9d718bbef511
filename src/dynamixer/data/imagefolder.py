"""ImageNet-style folder data: ``data_dir/{train,val}/<class>/<image>``."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from dynamixer.data.base import ClassificationDataModule, DataError

SPLITS = ("train", "val")


def _has_image(directory: str) -> bool:
    """True if ``directory`` (searched recursively, stopping at the first hit) holds an image file."""
    subdirs = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_file():
                if has_file_allowed_extension(entry.name, IMG_EXTENSIONS):
                    return True
            elif entry.is_dir():
                subdirs.append(entry.path)
    return any(_has_image(d) for d in subdirs)


def _scan_split(split_dir: Path) -> list[str]:
    """Sorted class-folder names of one split; raises ``DataError`` if missing or empty."""
    if not split_dir.is_dir():
        raise DataError(
            f"missing split folder {split_dir}. Expected the ImageNet layout "
            f"{split_dir.parent}/{{train,val}}/<class>/<image>; create it or point data_dir at the right folder."
        )
    with os.scandir(split_dir) as entries:
        classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(
            f"no class folders in {split_dir}. Put each class's images in its own subfolder, "
            f"e.g. {split_dir}/n01440764/*.JPEG."
        )
    empty = [c for c in classes if not _has_image(str(split_dir / c))]
    if empty:
        raise DataError(
            f"{len(empty)} class folder(s) under {split_dir} hold no images "
            f"(extensions {', '.join(IMG_EXTENSIONS)}), e.g. {empty[:5]}. Add images or remove those folders."
        )
    return classes


def _load_rgb(path: str) -> Image.Image:
    """Decode an image file fully as RGB; ``DataError`` naming the file if it cannot be read."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise DataError(
            f"cannot read image {path}: {err}. Replace or delete the file, "
            "or set skip_corrupt=True to skip unreadable images."
        ) from err


class CheckedImageFolder(ImageFolder):
    """torchvision ``ImageFolder`` with a fixed class list and checked decoding.

    Items are ``(tensor (3, H, W), label)``. A file that cannot be decoded raises
    ``DataError`` naming it; with ``skip_corrupt=True`` it is instead warned about,
    recorded in ``corrupt_files`` and replaced by the next readable sample (so a
    batch may hold a duplicate). ``corrupt_files`` is per process: with
    ``num_workers > 0`` the files are found in worker processes and only their
    warnings (printed by the workers) report them.
    """

    def __init__(self, root: str, classes: list[str], transform: Callable, skip_corrupt: bool) -> None:
        self._classes = classes
        super().__init__(root, transform=transform)
        self.skip_corrupt = skip_corrupt
        self.corrupt_files: set[str] = set()

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._classes, {c: i for i, c in enumerate(self._classes)}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        for offset in range(n):
            path, target = self.samples[(index + offset) % n]
            if path in self.corrupt_files:
                continue
            try:
                img = _load_rgb(path)
            except DataError as err:
                if not self.skip_corrupt:
                    raise
                self.corrupt_files.add(path)
                warnings.warn(f"skipping unreadable image {path}: {err.__cause__}")
                continue
            return self.transform(img), target
        raise DataError(f"no readable image under {self.root}; every file failed to decode.")


class ImageFolderDataModule(ClassificationDataModule):
    """ImageNet-1K layout ``data_dir/train/<wnid>/*.JPEG`` and ``data_dir/val/<wnid>/*.JPEG``.

    The folder tree is checked at construction (both splits exist, hold class
    folders with images, and name the same classes) so ``num_classes`` is known
    before the model is built; file lists are read in ``setup``. Labels index the
    sorted class-folder names. See ``CheckedImageFolder`` for ``skip_corrupt``.
    """

    defaults = {"num_workers": 8}  # ImageNet decoding needs workers; the rest are the base defaults

    def __init__(
        self,
        data_dir: str,
        skip_corrupt: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**{**self.defaults, **kwargs})
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.skip_corrupt = bool(skip_corrupt)
        if not self.data_dir.is_dir():
            raise DataError(
                f"data_dir {self.data_dir} does not exist or is not a folder. Set data_dir to the "
                "dataset root holding train/ and val/ (ImageNet layout train/<wnid>/*.JPEG)."
            )
        train_classes, val_classes = (_scan_split(self.data_dir / s) for s in SPLITS)
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
    def num_classes(self) -> int:
        return len(self._classes)

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    @property
    def corrupt_files(self) -> list[str]:
        """Unreadable files skipped so far in this process (see ``CheckedImageFolder``)."""
        found = set()
        for ds in (self.train_set, self.val_set):
            if ds is not None:
                found |= ds.corrupt_files
        return sorted(found)

    @property
    def corrupt_count(self) -> int:
        return len(self.corrupt_files)

    def _build_datasets(self) -> tuple[CheckedImageFolder, CheckedImageFolder]:
        return tuple(
            CheckedImageFolder(str(self.data_dir / split), self._classes, tf, self.skip_corrupt)
            for split, tf in zip(SPLITS, (self._train_tf, self._eval_tf))
        )
