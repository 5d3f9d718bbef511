"""Convert a folder data set into the shards a cluster holds: parquet (`data=hf`) or WebDataset tars (`data=wds`).

    python -m dynamixer.data.convert /data/imagenet /scratch/imagenet-parquet --to parquet --shard-size 500MB
    python -m dynamixer.data.convert /data/imagenet /scratch/imagenet-wds --to wds --shard-size 1GB

The source is read as `data=imagenet` reads it (`ImageFolderDataModule`: class folders, or the flat `val/`
with its label file). Each image's file is stored as it is (its bytes, not decoded again), with its label and
its path relative to the source. The training split is shuffled once (`--seed`) before it is cut into shards,
so every shard mixes the classes; the validation split keeps its order.

* parquet: `<out>/data/{train,validation}-00000-of-000NN.parquet`, the Hub's layout, with the `Image` and
  `ClassLabel` features `datasets` reads back.
* wds: `<out>/{train,val}-000000.tar`, ... (samples `<key>.jpg`, `<key>.cls`, `<key>.json`) and `<out>/info.json`
  with the class names and each shard's sample count.

A split is cut into `ceil(its bytes / --shard-size)` shards of equal sample counts (within one).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from dynamixer.errors import EXIT_USER_ERROR, DataError, UserError

WDS_INFO = "info.json"
WDS_FORMAT = "dynamixer-wds/1"
PARQUET_SPLITS = {"train": "train", "val": "validation"}  # our split -> the Hub's name
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(text: str) -> int:
    """`500MB`, `1GB`, `1.5GB`, `1000000` -> bytes."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?B?)\s*", text.upper())
    size = int(float(found[1]) * _UNITS[found[2]]) if found else 0
    if size < 1:
        raise DataError(f"--shard-size={text}: give a size such as 500MB or 1GB (a byte or more)")
    return size


def shard_plan(sizes: Sequence[int], shard_bytes: int) -> list[range]:
    """Consecutive runs of the samples, as many as `shard_bytes` asks for the whole (`ceil(total / shard_bytes)`),
    of equal counts (within one): a WebDataset epoch trains as many batches as its smallest deal of shards."""
    n = len(sizes)
    shards = max(1, min(n, -(-sum(sizes) // shard_bytes)))
    bounds = [round(i * n / shards) for i in range(shards + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _wds_extension(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return {"jpeg": "jpg", "tif": "tiff"}.get(ext, ext)


def as_dataset(rows: list, classes: list[str], root: Path):
    """`(path, label)` rows of a folder data set as a `datasets.Dataset` (an `Image` and a `ClassLabel` of
    `classes`): each image's bytes, with its path relative to `root`."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": Path(p).read_bytes(), "path": os.path.relpath(p, root)} for p, _ in rows],
            "label": [label for _, label in rows],
        },
        features=features,
    )


def _write_parquet(out: Path, split: str, samples: list, shards: list[range], classes, root: Path) -> list[str]:
    names, progress = [], tqdm(total=len(samples), desc=f"{split} -> parquet", unit="image")
    for n, shard in enumerate(shards):
        table = as_dataset([samples[i] for i in shard], classes, root)
        name = f"data/{PARQUET_SPLITS[split]}-{n:05d}-of-{len(shards):05d}.parquet"
        table.to_parquet(str(out / name))
        names.append(name)
        progress.update(len(shard))
    progress.close()
    return names


def _write_wds(out: Path, split: str, samples: list, shards: list[range], root: Path) -> list[str]:
    import webdataset as wds

    names, progress = [], tqdm(total=len(samples), desc=f"{split} -> wds", unit="image")
    for n, shard in enumerate(shards):
        name = f"{split}-{n:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for i in shard:
                path, label = samples[i]
                rel = os.path.relpath(path, root)
                sink.write(
                    {
                        "__key__": f"{split}{i:08d}",
                        _wds_extension(path): Path(path).read_bytes(),
                        "cls": str(label).encode(),
                        "json": json.dumps({"path": rel, "label": label}).encode(),
                    }
                )
                progress.update()
        names.append(name)
    progress.close()
    return names


def convert(source: Path, out: Path, to: str, shard_bytes: int, seed: int = 0, val_labels: str | None = None) -> dict:
    """Write the shards of `source` into the new folder `out`; returns what was written (splits -> shard names
    and counts, and the class names)."""
    from dynamixer.data.imagefolder import ImageFolderDataModule

    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty: give a new or empty folder for the shards (nothing is overwritten)")
    data = ImageFolderDataModule(str(source), val_labels=val_labels, num_workers=0)
    classes, samples = data.listing()
    order = list(range(len(samples["train"])))
    random.Random(seed).shuffle(order)
    samples["train"] = [samples["train"][i] for i in order]
    (out / "data" if to == "parquet" else out).mkdir(parents=True, exist_ok=True)
    written: dict = {"classes": classes, "splits": {}}
    for split, rows in samples.items():
        shards = shard_plan([os.path.getsize(p) for p, _ in rows], shard_bytes)
        if to == "parquet":
            names = _write_parquet(out, split, rows, shards, classes, data.data_dir)
        else:
            names = _write_wds(out, split, rows, shards, data.data_dir)
        written["splits"][split] = {"shards": names, "counts": [len(s) for s in shards]}
    if to == "wds":
        (out / WDS_INFO).write_text(json.dumps({"format": WDS_FORMAT, **written}, indent=1))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dynamixer.data.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", type=Path, help="the folder data set (train/ and val/)")
    parser.add_argument("out", type=Path, help="a new folder for the shards")
    parser.add_argument("--to", choices=("parquet", "wds"), required=True)
    parser.add_argument("--shard-size", default="1GB", help="the most bytes of images a shard holds (default 1GB)")
    parser.add_argument("--seed", type=int, default=0, help="the one shuffle of the training split (default 0)")
    parser.add_argument("--val-labels", default=None, help="the flat val/ folder's label file, if not beside it")
    args = parser.parse_args(argv)
    try:
        written = convert(args.source, args.out, args.to, parse_size(args.shard_size), args.seed, args.val_labels)
    except UserError as err:
        print(f"Error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as err:  # a source file that cannot be read, an output folder without room or permission
        print(
            f"Error: cannot convert: {err.filename or args.out}: {err.strerror or err}. Check that the source can be "
            "read and that the output folder has room and can be written",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    for split, info in written["splits"].items():
        print(f"{split}: {sum(info['counts'])} images in {len(info['shards'])} shard(s) under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
