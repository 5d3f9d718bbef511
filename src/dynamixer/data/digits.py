"""scikit-learn's 8x8 handwritten digits as a small in-memory image dataset."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from dynamixer.data.base import ClassificationDataModule, InMemoryImages
from dynamixer.data.identity import digest_of
from dynamixer.errors import DataError

NUM_IMAGES = 1797  # in scikit-learn's digits


class DigitsDataModule(ClassificationDataModule):
    """``sklearn.datasets.load_digits`` (1,797 images, classes "0".."9"), no download.

    Each 8x8 image (values 0..16) is scaled to 0..255, upsampled bilinearly to
    ``img_size`` and stored as an RGB PIL image. A stratified split
    (``val_fraction``, ``split_seed``) gives 1,437 train / 360 val images with the
    defaults. Defaults: mean/std 0.5 (maps [0, 1] to [-1, 1]); ``crop_pct=1.0`` so
    evaluation keeps the whole digit; mild training augmentation (see
    ``default_train_aug``). ``classes`` keeps a subset of the digits (the same split, filtered),
    labelled 0..k-1 in increasing order: e.g. pre-training on 0-4 and fine-tuning on 5-9.
    """

    # constructor defaults of ClassificationDataModule that differ for digits
    defaults = {
        "batch_size": 32,
        "num_workers": 0,
        "img_size": 16,  # that of model=dynamixer_tiny, the default run's
        "crop_pct": 1.0,
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
    }
    default_train_aug = {"scale": (0.85, 1.0), "hflip": 0.0, "auto_augment": None, "color_jitter": 0.0, "re_prob": 0.0}

    def __init__(
        self,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        classes: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**{**self.defaults, **kwargs})
        # the split is stratified over the ten digits: each split needs an image of each
        smallest = 10 / NUM_IMAGES
        if not smallest <= float(val_fraction) <= 1.0 - smallest:
            raise DataError(
                f"data.val_fraction={val_fraction} leaves fewer images than the 10 digits in the training or the "
                f"validation split, and the split gives each class at least one: use a value between "
                f"{smallest:.4f} and {1 - smallest:.4f}, e.g. data.val_fraction=0.2"
            )
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.digits = sorted(int(c) for c in classes) if classes is not None else list(range(10))
        if not self.digits or any(not 0 <= d <= 9 for d in self.digits) or len(set(self.digits)) < len(self.digits):
            raise DataError(f"data.classes={list(classes)}: give distinct digits 0-9, e.g. [5, 6, 7, 8, 9]")

    @property
    def class_names(self) -> list[str]:
        return [str(d) for d in self.digits]

    def _content(self) -> dict[str, str]:
        digits = load_digits()
        return {"digits": digest_of([digits.images.tobytes(), digits.target.tobytes()])}

    def _build_datasets(self) -> tuple[InMemoryImages, InMemoryImages]:
        digits = load_digits()
        pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        images = [
            Image.fromarray(p).resize((self.img_size, self.img_size), Image.Resampling.BILINEAR).convert("RGB")
            for p in pixels
        ]
        label_of = {d: i for i, d in enumerate(self.digits)}  # the chosen digits, labelled 0..k-1
        labels = [label_of.get(int(t), -1) for t in digits.target]
        train_idx, val_idx = train_test_split(
            np.arange(len(labels)),
            test_size=self.val_fraction,
            random_state=self.split_seed,
            stratify=digits.target,
        )
        train_idx, val_idx = ([i for i in idx if labels[i] >= 0] for idx in (train_idx, val_idx))
        return tuple(
            InMemoryImages([images[i] for i in idx], [labels[i] for i in idx], tf)
            for idx, tf in ((train_idx, self._train_tf), (val_idx, self._eval_tf))
        )
