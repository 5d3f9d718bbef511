"""Image transforms: a thin wrapper over ``timm.data.create_transform``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.data import create_transform
from torchvision import transforms as T

TRAIN_AUG_KEYS = frozenset(
    {
        "scale",
        "ratio",
        "hflip",
        "auto_augment",
        "color_jitter",
        "re_prob",
        "re_mode",
        "re_count",
        "train_interpolation",
    }
)


class Normalize(T.Normalize):
    """torchvision's `Normalize` (the same arithmetic, in place on its copy) with `std` checked once, not on
    every image: torchvision's test of `std == 0` is a host read per image, in the main process when the
    loader has no workers. `(C, H, W)` float tensor in and out."""

    def __init__(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor, inplace=False):
        super().__init__(mean, std, inplace)
        # float64, as torchvision's python floats: converted to the image's dtype once, as it converts them
        self._mean = torch.as_tensor(mean, dtype=torch.float64).view(-1, 1, 1)
        self._std = torch.as_tensor(std, dtype=torch.float64).view(-1, 1, 1)
        if (self._std == 0).any():
            raise ValueError(f"std={std} holds a zero: normalising would divide by it")

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        mean = self._mean.to(tensor.device, tensor.dtype)
        std = self._std.to(tensor.device, tensor.dtype)
        return (tensor if self.inplace else tensor.clone()).sub_(mean).div_(std)


def _with_our_normalize(transform: T.Compose) -> T.Compose:
    """`transform` with each of torchvision's `Normalize` replaced by ours (the same values)."""
    transform.transforms = [
        Normalize(t.mean, t.std, t.inplace) if type(t) is T.Normalize else t for t in transform.transforms
    ]
    return transform


def build_transform(
    img_size: int,
    is_training: bool,
    *,
    crop_pct: float,
    interpolation: str,
    mean: Sequence[float],
    std: Sequence[float],
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    auto_augment: str | None = None,
    color_jitter: float | Sequence[float] | None = 0.4,
    re_prob: float = 0.0,
    re_mode: str = "pixel",
    re_count: int = 1,
    train_interpolation: str = "random",
) -> T.Compose:
    """PIL image -> normalised float tensor ``(3, img_size, img_size)``.

    Training: timm's RandomResizedCrop (``scale``, ``ratio``, ``train_interpolation``),
    horizontal flip, RandAugment/AutoAugment (``auto_augment``, e.g.
    ``"rand-m9-mstd0.5-inc1"``; timm then drops colour jitter), colour jitter and
    random erasing. Evaluation: resize the short side to ``img_size / crop_pct``
    with ``interpolation``, then centre-crop ``img_size``; ``crop_pct`` is unused
    in training and every augmentation argument is unused in evaluation.
    """
    mean = tuple(float(m) for m in mean)
    std = tuple(float(s) for s in std)
    if not is_training:
        return _with_our_normalize(
            create_transform(
                int(img_size),
                is_training=False,
                crop_pct=float(crop_pct),
                interpolation=interpolation,
                mean=mean,
                std=std,
            )
        )
    if isinstance(color_jitter, Sequence):
        color_jitter = tuple(float(c) for c in color_jitter)
    return _with_our_normalize(
        create_transform(
            int(img_size),
            is_training=True,
            scale=tuple(float(s) for s in scale),
            ratio=tuple(float(r) for r in ratio),
            hflip=float(hflip),
            auto_augment=auto_augment or None,
            color_jitter=color_jitter or None,  # 0 means off, not ColorJitter(0, 0, 0)
            re_prob=float(re_prob),
            re_mode=re_mode,
            re_count=int(re_count),
            interpolation=train_interpolation,
            mean=mean,
            std=std,
        )
    )


def padded_crop_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """PIL image -> `(3, img_size, img_size)`: resize, random crop with padding of `img_size / 8`,
    horizontal flip, normalise (the release's transfer recipe for CIFAR)."""
    return T.Compose(
        [
            T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomCrop(img_size, padding=img_size // 8),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            Normalize(tuple(mean), tuple(std)),
        ]
    )
