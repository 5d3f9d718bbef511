"""CIFAR-10 and CIFAR-100 from their standard python folders (`cifar-10-batches-py`, `cifar-100-python`)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dynamixer.data.base import ClassificationDataModule, InMemoryImages
from dynamixer.data.identity import WHOLE, files_identity
from dynamixer.data.transforms import padded_crop_transform
from dynamixer.errors import ConfigError, DataError
from dynamixer.schema import Location

# folder, training files, test file, meta file, label key, label-names key
LAYOUTS = {
    "cifar-10-batches-py": (
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    "cifar-100-python": (["train"], "test", "meta", b"fine_labels", b"fine_label_names"),
}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays, nothing else: reading a data file never runs code."""

    # numpy's array reconstruction, and the bytes encoding of files pickled with protocol 2 by Python 3
    ALLOWED = {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR file")
        return super().find_class(module, name)


def _load(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return _ArraysOnly(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise DataError(
            f"cannot read the CIFAR file {path}: {err}. Download the python version of the "
            "data set again (cifar-10-python.tar.gz / cifar-100-python.tar.gz) and unpack it"
        ) from None


class CIFARDataModule(ClassificationDataModule):
    """CIFAR-10/100 (`data_dir` holds `cifar-10-batches-py/` or `cifar-100-python/`, or is one of them):
    50,000 training and 10,000 test images of 32x32, served at `img_size` (the release fine-tunes at 224).

    Training: resize to `img_size`, random crop with padding of `img_size / 8`, horizontal flip (the
    release's transfer recipe). Evaluation on the test split: resize to `img_size`.
    """

    defaults = {"batch_size": 128, "num_workers": 8, "crop_pct": 1.0}

    def __init__(self, data_dir: Location[str], **kwargs: Any) -> None:
        if kwargs.get("train_aug"):
            raise ConfigError(
                f"data.train_aug={dict(kwargs['train_aug'])} does not apply to data=cifar: its training transform is "
                "the release's transfer recipe (padded random crop and flip); remove data.train_aug"
            )
        super().__init__(**{**self.defaults, **kwargs})
        root = Path(data_dir).expanduser().absolute()
        folders = [root] if root.name in LAYOUTS else [root / name for name in LAYOUTS]
        found = [f for f in folders if f.is_dir()]
        if len(found) != 1:
            raise DataError(
                f"data_dir={root} holds {'both CIFAR folders' if found else 'no CIFAR folder'}: point it at a "
                f"folder with exactly one of {', '.join(LAYOUTS)} (the unpacked python version of the data set)"
            )
        self.folder = found[0]
        self._train_files, self._test_file, meta, self._label_key, names_key = LAYOUTS[self.folder.name]
        found = _load(self.folder / meta)
        names = found.get(names_key) if isinstance(found, dict) else None
        if not isinstance(names, list) or not names or not all(isinstance(n, bytes) for n in names):
            raise DataError(
                f"the CIFAR file {self.folder / meta} names no classes ({names_key.decode()}: a list of names): "
                "download the python version of the data set again and unpack it"
            )
        self._classes = [n.decode(errors="replace") for n in names]
        self._train_tf = padded_crop_transform(self.img_size, self.mean, self.std)

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    def _split(self, files: list[str], transform) -> InMemoryImages:
        pixels, labels = [], []
        for name in files:
            path = self.folder / name
            batch = _load(path)
            data = batch.get(b"data") if isinstance(batch, dict) else None
            found = batch.get(self._label_key) if isinstance(batch, dict) else None
            ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            ok = ok and isinstance(found, list) and len(found) == len(data)
            ok = ok and all(isinstance(y, int) and 0 <= y < len(self._classes) for y in found)
            if not ok:
                raise DataError(
                    f"the CIFAR file {path} is no batch of {len(self._classes)} classes (uint8 images of 3x32x32, a "
                    "class index of each): download the python version of the data set again and unpack it"
                )
            pixels.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += found
        return InMemoryImages([Image.fromarray(p) for p in np.concatenate(pixels)], labels, transform)

    def _content(self) -> dict[str, str]:
        return files_identity({name: self.folder / name for name in [*self._train_files, self._test_file]}, WHOLE)

    def _build_datasets(self) -> tuple[InMemoryImages, InMemoryImages]:
        return self._split(self._train_files, self._train_tf), self._split([self._test_file], self._eval_tf)
