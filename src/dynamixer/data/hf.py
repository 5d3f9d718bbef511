"""Hugging Face `datasets` data: a `save_to_disk` folder, or a folder of parquet shards (the Hub's ImageNet-1k).

Both are read from local files only and served with random access (memory-mapped Arrow), so the training
order, the per-sample augmentation seeds and an exact mid-epoch resume work as for folders
(`dynamixer.data.sampling`). Parquet shards are converted once to Arrow in `cache_dir` by `datasets` itself
(rank 0 first, the other ranks then open the same cache); a `save_to_disk` folder is opened in place.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dynamixer.bounded import read_text
from dynamixer.data.base import IMAGENET_DEFAULTS, IMAGENET_TRAIN_AUG, ClassificationDataModule, rank_zero_first
from dynamixer.data.identity import SHARD_EDGE, digest_of, files_identity
from dynamixer.data.images import load_rgb
from dynamixer.errors import DataError
from dynamixer.schema import Location

# where the splits' parquet files are, relative to data_dir: the Hub's data/train-00000-of-00294.parquet,
# a folder a split, or one file a split
PARQUET_PATTERNS = ("**/{split}-*.parquet", "**/{split}/*.parquet", "**/{split}.parquet")


def _parquet_files(data_dir: Path, split: str) -> list[Path]:
    for pattern in PARQUET_PATTERNS:
        files = sorted(data_dir.glob(pattern.format(split=split)))
        if files:
            return files
    return []


def _features(files: list[Path]) -> Any:
    """The `datasets` features the parquet files of one split declare in their metadata, the same in each."""
    import datasets
    import pyarrow.parquet as pq

    found = {}
    for path in files:
        try:
            found[path] = datasets.Features.from_arrow_schema(pq.read_schema(path))
        except Exception as err:  # noqa: BLE001  `datasets` parses the file's JSON of feature types, untyped errors
            raise DataError(
                f"cannot read the features of the parquet file {path} ({type(err).__name__}: {str(err)[:200]}): "
                "download it again"
            ) from None
    first = found[files[0]]
    other = [str(p) for p, f in found.items() if f != first]
    if other:
        raise DataError(
            f"the parquet files {other[:3]} declare other features than {files[0]}: the files of a split must be "
            "of one data set. Download them again"
        )
    return first


class EncodedImages(Dataset):
    """A `datasets.Dataset` whose image column holds encoded files: items ``(transform(image), label)``, the
    image decoded by ``load_rgb`` (``(3, H, W)`` after the transform), the label an int."""

    def __init__(self, rows: Any, image_key: str, label_key: str, transform: Any, name: str) -> None:
        import datasets

        self.rows = rows.select_columns([image_key, label_key]).cast_column(image_key, datasets.Image(decode=False))
        self.image_key, self.label_key, self.transform, self.name = image_key, label_key, transform, name

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.rows[index]
        image = row[self.image_key]
        data = image.get("bytes") if isinstance(image, dict) else None
        if not isinstance(data, bytes):
            # a row that only names a file would read wherever it points: not served
            raise DataError(f"{self.name}[{index}] holds no image bytes. Store the images' bytes in the data set")
        return self.transform(load_rgb(f"{self.name}[{index}]", data=data)), int(row[self.label_key])


class HFDataModule(ClassificationDataModule):
    """ImageNet-1K (or any image classification set) in `datasets`' formats under ``data_dir``:

    * a `DatasetDict.save_to_disk` folder (``dataset_dict.json``), opened in place, or
    * parquet shards of each split (``PARQUET_PATTERNS``: ``data/train-*.parquet``, ...), converted once to
      Arrow in ``cache_dir`` (``None``: `datasets`' own cache).

    ``image_key`` names an ``Image`` column, ``label_key`` a ``ClassLabel`` column, whose names are the class
    names; ``train_split`` and ``val_split`` the splits (the Hub's ImageNet-1k calls its val ``validation``).
    The features are read at construction (one file), the data in ``setup``.
    """

    defaults = IMAGENET_DEFAULTS
    default_train_aug = IMAGENET_TRAIN_AUG

    def __init__(
        self,
        data_dir: Location[str],
        image_key: str = "image",
        label_key: str = "label",
        train_split: str = "train",
        val_split: str = "validation",
        cache_dir: Location[str | None] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**{**self.defaults, **kwargs})
        import datasets

        self.data_dir = Path(data_dir).expanduser().absolute()
        self.image_key, self.label_key = image_key, label_key
        self.splits = {"train": train_split, "val": val_split}
        self.cache_dir = None if cache_dir is None else str(Path(cache_dir).expanduser().absolute())
        self._saved = (self.data_dir / "dataset_dict.json").is_file()
        if self._saved:
            self._check_saved_names()
            try:
                self._opened = datasets.load_from_disk(str(self.data_dir))
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise DataError(
                    f"cannot open {self.data_dir} as a save_to_disk folder ({err}): save it again"
                ) from None
            missing = [s for s in self.splits.values() if s not in self._opened]
            if missing:
                raise DataError(
                    f"{self.data_dir} (saved with save_to_disk) has the splits {sorted(self._opened)}, not {missing}: "
                    "set data.train_split and data.val_split to two of them"
                )
            features = {s: self._opened[name].features for s, name in self.splits.items()}
        else:
            self._files = {s: _parquet_files(self.data_dir, name) for s, name in self.splits.items()}
            missing = [self.splits[s] for s, files in self._files.items() if not files]
            if missing:
                found = sorted(str(p.relative_to(self.data_dir)) for p in self.data_dir.glob("**/*.parquet"))[:8]
                raise DataError(
                    f"data_dir={self.data_dir} is no Hugging Face data set of the splits {missing}: no "
                    f"dataset_dict.json (a save_to_disk folder) and no parquet files for them "
                    f"({', '.join(PARQUET_PATTERNS)}); parquet files found: {found or 'none'}. Point data_dir at "
                    "the data set's folder, or set data.train_split / data.val_split to its split names"
                )
            folders = {split: sorted({str(f.parent) for f in files}) for split, files in self._files.items()}
            if any(len(f) > 1 for f in folders.values()):
                raise DataError(
                    f"the parquet files of a split lie in more than one folder under {self.data_dir} ({folders}): "
                    "a second copy would count each image twice. Point data_dir at one copy"
                )
            features = {split: _features(files) for split, files in self._files.items()}
        self._classes = self._check_features(features["train"])
        if self._check_features(features["val"]) != self._classes:
            raise DataError(
                f"the {train_split} and {val_split} splits of {self.data_dir} name other classes (data.label_key="
                f"{self.label_key}): their labels would mean different things. Use splits of one data set"
            )

    def _check_saved_names(self) -> None:
        """The splits and Arrow files a save_to_disk folder names must be plain names inside it: `datasets`
        joins them to the folder as they are (`../` would map a file from elsewhere)."""
        try:
            splits = json.loads(read_text(self.data_dir / "dataset_dict.json", 1 << 20)).get("splits")
            files = [
                entry.get("filename")
                for split in splits
                for entry in json.loads(read_text(self.data_dir / split / "state.json", 1 << 24))["_data_files"]
            ]
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise DataError(f"{self.data_dir} is no readable save_to_disk folder ({err}): save it again") from None
        plain = all(
            isinstance(n, str) and n not in ("", ".", "..") and "/" not in n and "\\" not in n
            for n in [*splits, *files]
        )
        if not plain:
            raise DataError(
                f"{self.data_dir}'s dataset_dict.json or state.json names files outside the folder "
                f"({[*splits, *files][:5]}): save the data set again with save_to_disk"
            )

    def _check_features(self, features: Any) -> list[str]:
        import datasets

        kinds = {name: type(f).__name__ for name, f in features.items()}
        image, label = features.get(self.image_key), features.get(self.label_key)
        if not isinstance(image, datasets.Image) or not isinstance(label, datasets.ClassLabel):
            raise DataError(
                f"{self.data_dir} has the columns {kinds}: data.image_key={self.image_key} must name an Image "
                f"column and data.label_key={self.label_key} a ClassLabel column (its names are the class names). "
                "Set them to the right columns"
            )
        return list(label.names)

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    def _open(self) -> dict[str, Any]:
        if self._saved:  # as plain rows: a stored format (torch, arrow, ...) is not applied
            return {s: self._opened[name].with_format(None) for s, name in self.splits.items()}
        import datasets

        opened: dict[str, Any] = {}

        def convert() -> None:
            try:
                for split, files in self._files.items():
                    opened[split] = datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=self.cache_dir)
            except PermissionError as err:
                raise DataError(
                    f"cannot write the Arrow cache of {self.data_dir} ({err}): set data.cache_dir to a folder with "
                    "room for a copy of the data set that this job may write"
                ) from None

        rank_zero_first(convert)  # the other ranks open the cache it made
        if not opened:
            convert()
        return opened

    def _content(self) -> dict[str, str]:
        """The parquet files, or the Arrow files of a save_to_disk folder (`datasets` names them in each split's
        state.json, checked by `_check_saved_names`), by content; with the class names."""
        if self._saved:
            named = {
                f"{name}/{Path(f['filename']).name}": f["filename"]
                for name in self.splits.values()
                for f in self._opened[name].cache_files
            }
        else:
            named = {str(f.relative_to(self.data_dir)): str(f) for split in self._files.values() for f in split}
        return {"classes": digest_of(self._classes), **files_identity(named, SHARD_EDGE)}

    def _build_datasets(self) -> tuple[EncodedImages, EncodedImages]:
        import pyarrow.compute

        opened = self._open()
        for split, rows in opened.items():
            if not len(rows):
                continue
            labels = rows.data.column(self.label_key)
            bounds = pyarrow.compute.min_max(labels)
            low, high = bounds["min"].as_py(), bounds["max"].as_py()
            if labels.null_count or low < 0 or high >= self.num_classes:
                raise DataError(
                    f"the {self.splits[split]} split of {self.data_dir} holds labels from {low} to {high} "
                    f"({labels.null_count} missing), outside 0..{self.num_classes - 1} (an unlabelled test split has "
                    "-1): choose a labelled split"
                )
        tfs = {"train": self._train_tf, "val": self._eval_tf}
        return tuple(
            EncodedImages(opened[s], self.image_key, self.label_key, tfs[s], f"{self.data_dir.name}/{self.splits[s]}")
            for s in ("train", "val")
        )
