"""Data layer: transforms and Lightning data modules for image classification."""

from dynamixer.data.base import ClassificationDataModule
from dynamixer.data.cifar import CIFARDataModule
from dynamixer.data.digits import DigitsDataModule
from dynamixer.data.hf import HFDataModule
from dynamixer.data.imagefolder import ImageFolderDataModule
from dynamixer.data.images import load_rgb
from dynamixer.data.transforms import build_transform
from dynamixer.data.wds import WebDataModule
from dynamixer.errors import DataError

__all__ = [
    "CIFARDataModule",
    "ClassificationDataModule",
    "DataError",
    "DigitsDataModule",
    "HFDataModule",
    "ImageFolderDataModule",
    "WebDataModule",
    "build_transform",
    "load_rgb",
]
