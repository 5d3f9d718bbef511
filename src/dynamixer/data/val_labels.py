"""The labels of ImageNet's official flat validation folder (`val/ILSVRC2012_val_00000001.JPEG`, ...).

Two label files are read, both as plain text or data (nothing in them runs):

* Kaggle's `LOC_val_solution.csv`: `ImageId,PredictionString`, the string's first word the image's WNID.
* The ILSVRC2012 devkit: `data/ILSVRC2012_validation_ground_truth.txt` (one ILSVRC2012_ID a line, in the
  order of the sorted file names) with `data/meta.mat` mapping those IDs to WNIDs.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from dynamixer.bounded import check_mat_file, read_text
from dynamixer.errors import DataError

KAGGLE = "LOC_val_solution.csv"
DEVKIT_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
# where a label file is looked for when data.val_labels is not given, relative to data_dir and its parents
SEARCHED = (KAGGLE, f"ILSVRC2012_devkit_t12/data/{DEVKIT_TRUTH}")
_MAX_BYTES = 64 << 20  # ImageNet's are 2.3 MB (Kaggle) and 0.2 MB (devkit)


def find_label_file(data_dir: Path) -> Path | None:
    """The first of `SEARCHED` in `data_dir` or one of its two parents (Kaggle's `ILSVRC/Data/CLS-LOC`)."""
    for folder in (data_dir, *list(data_dir.parents)[:2]):
        for name in SEARCHED:
            if (folder / name).is_file():
                return folder / name
    return None


def _kaggle(path: Path) -> dict[str, str]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f.read(_MAX_BYTES).splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read {path} as Kaggle's LOC_val_solution.csv ({err})") from None
    if not rows or [c.strip() for c in rows[0][:2]] != ["ImageId", "PredictionString"]:
        raise DataError(f"{path} is not Kaggle's LOC_val_solution.csv: its header is not 'ImageId,PredictionString'")
    labels = {}
    for line, row in enumerate(rows[1:], start=2):
        words = row[1].split() if len(row) >= 2 else []
        if not words:
            raise DataError(f"{path}, line {line}: no WNID after the image id {row[:1]}; the file is damaged")
        labels[row[0].strip()] = words[0]
    return labels


def _devkit(path: Path, val_files: list[str]) -> dict[str, str]:
    from scipy.io import loadmat  # the devkit's MATLAB file: arrays only (loadmat runs no code)

    stems = sorted(os.path.splitext(name)[0] for name in val_files)
    expected = [f"ILSVRC2012_val_{i:08d}" for i in range(1, len(stems) + 1)]
    if stems != expected:  # the file labels names by their place: one missing and one extra would shift all
        odd = sorted(set(stems) ^ set(expected))[:3]
        raise DataError(
            f"{path} labels ILSVRC2012_val_00000001 ... in order, but the validation folder holds other names "
            f"(e.g. {odd}): it must hold exactly those files, or use LOC_val_solution.csv (data.val_labels=...)"
        )

    meta = path.with_name("meta.mat")
    if not meta.is_file():
        raise DataError(f"{path} needs the devkit's {meta.name} beside it (ILSVRC2012 IDs -> WNIDs); it is missing")
    check_mat_file(meta)  # what it declares is bounded before loadmat allocates it
    try:
        synsets = loadmat(meta, squeeze_me=True)["synsets"]
        wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
        ids = [int(line) for line in read_text(path, _MAX_BYTES).split()]
    except (OSError, ValueError, KeyError, IndexError, TypeError, NotImplementedError) as err:
        raise DataError(
            f"cannot read the devkit's {meta.name} and {path.name} ({err}): unpack the devkit again"
        ) from None
    if len(ids) != len(stems):
        raise DataError(
            f"{path} holds {len(ids)} labels for {len(stems)} images in the validation folder: the devkit's file "
            "labels the sorted file names in order, so the folder must hold all of them"
        )
    try:
        return {stem: wnid_of[i] for stem, i in zip(stems, ids)}
    except KeyError as err:
        raise DataError(f"{path} names ILSVRC2012_ID {err} that {meta} does not map to a WNID") from None


def read_val_labels(path: Path, val_files: list[str]) -> dict[str, str]:
    """Image name without extension -> WNID, from `path` (Kaggle's csv or the devkit's ground truth);
    `val_files` are the folder's image names (the devkit labels them by sorted order)."""
    if path.name == DEVKIT_TRUTH:
        return _devkit(path, val_files)
    return _kaggle(path)
