"""Data-loader throughput per source, and the cost of listing a folder data set with and without its index.

Writes a small ImageNet-style JPEG tree (`train/` and `val/`, a few classes, images larger than the
crop, sizes like ImageNet's), converts it to parquet and WebDataset shards (`dynamixer.data.convert`),
builds each source's data module (`data=imagenet`, `data=hf`, `data=wds`) with the paper's training
augmentation (RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25) and its evaluation transform
(resize + 224 centre crop), and times full passes of the loaders for each worker count; each source's
rate is also given against the folder source's in the same run.

With `--listing N`, it also writes a tree of N tiny files (100 a class folder) and times the setup of
`ImageFolderDataModule` without a file index (every rank of every start lists every file), at the first
start with one (list and write it), and at a restart (read it, stat the folders).

    python benchmarks/bench_data.py --workers 0 1 2 --images 256 --json benchmarks/results/data_cpu.json
    python benchmarks/bench_data.py --sources folder --workers 0 --images 8 --listing 100000
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dynamixer.data import HFDataModule, ImageFolderDataModule, WebDataModule
from dynamixer.data.convert import convert
from reporting import write_report

PAPER_TRAIN_AUG = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "re_mode": "pixel"}


def write_jpeg_tree(root: Path, images: int, classes: int = 4, seed: int = 0) -> None:
    """`images` JPEGs per split, 375-500 px sides (ImageNet's typical), smooth noise so they compress
    like photos, quality 90."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for i in range(images):
            h, w = rng.integers(375, 501, size=2)
            low = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            img = Image.fromarray(low).resize((int(w), int(h)), Image.Resampling.BICUBIC)
            noise = rng.integers(-12, 13, size=(int(h), int(w), 3))
            img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f"img{i:05d}.JPEG", quality=90)


def time_loader(loader, passes: int) -> list[float]:
    """Images/s of each full pass over `loader` (worker start-up included in the first, not after)."""
    rates = []
    for _ in range(passes):
        t0 = time.perf_counter()
        n = 0
        for x, _y in loader:
            n += x.shape[0]
        rates.append(n / (time.perf_counter() - t0))
    return rates


def write_listing_tree(root: Path, files: int, per_class: int = 100) -> None:
    """`files` one-byte `.JPEG` files in class folders of `per_class` under `root/train`, one a class in
    `root/val`: what a listing reads (names and sizes), not images."""
    for c in range(files // per_class):
        for split, count in (("train", per_class), ("val", 1)):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"{i:04d}.JPEG").write_bytes(b"x")


def time_listing(root: Path, index_file: Path, repeats: int) -> dict:
    """Median seconds of construction + setup: without an index, first start with one, restart with it."""

    def setup(index: Path | None, fresh: bool) -> float:
        if fresh and index is not None:
            index.unlink(missing_ok=True)
        t0 = time.perf_counter()
        ImageFolderDataModule(str(root), num_workers=0, index_file=index).setup()
        return time.perf_counter() - t0

    setup(None, False)  # the page cache holds the folders for every measurement alike
    timed = {
        "no_index_s": [setup(None, False) for _ in range(repeats)],
        "first_start_s": [setup(index_file, True) for _ in range(repeats)],
        "restart_s": [setup(index_file, False) for _ in range(repeats)],
    }
    row = {key: statistics.median(values) for key, values in timed.items()}
    row["first_start_vs_no_index"] = row["first_start_s"] / row["no_index_s"]
    row["restart_vs_no_index"] = row["restart_s"] / row["no_index_s"]
    row["index_bytes"] = index_file.stat().st_size
    return row


def sources(root: Path, shards: Path, names: list[str], images: int, **common) -> dict:
    """Each asked source's data module factory (by worker count) over the same JPEGs."""
    made = {}
    if "folder" in names:
        made["folder"] = lambda workers: ImageFolderDataModule(str(root), num_workers=workers, **common)
    shard_bytes = max(1, sum(p.stat().st_size for p in (root / "train").glob("*/*.JPEG")) // 16)  # 16 a split
    if "parquet" in names:
        if not (shards / "parquet").is_dir():
            convert(root, shards / "parquet", "parquet", shard_bytes)
        made["parquet"] = lambda workers: HFDataModule(
            str(shards / "parquet"), cache_dir=str(shards / "cache"), num_workers=workers, **common
        )
    if "wds" in names:
        if not (shards / "wds").is_dir():
            convert(root, shards / "wds", "wds", shard_bytes)
        made["wds"] = lambda workers: WebDataModule(str(shards / "wds"), num_workers=workers, **common)
    return made


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sources", nargs="+", choices=("folder", "parquet", "wds"), default=["folder", "parquet", "wds"])
    ap.add_argument("--images", type=int, default=256, help="JPEGs per split")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--passes", type=int, default=3, help="timed passes per setting (after one warm-up pass)")
    ap.add_argument("--data-dir", type=Path, default=None, help="reuse/write the JPEG tree here (default: a temp dir)")
    ap.add_argument(
        "--auto-augment", default=PAPER_TRAIN_AUG["auto_augment"], help="RandAugment policy of the train split"
    )
    ap.add_argument("--listing", type=int, default=0, help="also time listing a tree of this many files (0: not)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or Path(tmp) / "jpeg"
        if not (root / "train").is_dir():
            write_jpeg_tree(root, args.images)
        common = dict(
            batch_size=args.batch_size,
            img_size=args.img_size,
            crop_pct=0.9,
            train_aug={**PAPER_TRAIN_AUG, "auto_augment": args.auto_augment},
        )
        rows = []
        for source, make in sources(root, Path(tmp) / "shards", args.sources, args.images, **common).items():
            for workers in args.workers:
                dm = make(workers)
                for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
                    rates = time_loader(loader, args.passes + 1)[1:]  # first pass: warm-up (page cache, workers)
                    med = statistics.median(rates)
                    per_core = med / max(workers, 1)
                    rows.append(
                        {
                            "source": source,
                            "split": split,
                            "workers": workers,
                            "images_per_s": med,
                            "images_per_s_range": [min(rates), max(rates)],
                            "images_per_s_per_worker": per_core,
                            "ms_per_image_per_core": 1000 / per_core,
                        }
                    )
        folder = {(r["split"], r["workers"]): r["images_per_s"] for r in rows if r["source"] == "folder"}
        for r in rows:
            if (r["split"], r["workers"]) in folder:
                r["vs_folder"] = r["images_per_s"] / folder[(r["split"], r["workers"])]
        listing = None
        if args.listing:
            write_listing_tree(Path(tmp) / "listing", args.listing)
            listing = {"files": args.listing, **time_listing(Path(tmp) / "listing", Path(tmp) / "index.json.gz", 3)}
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpus": os.cpu_count(),
        "load_average_1_5_15min_at_end": os.getloadavg(),
        "results": rows,
        "listing": listing,
    }
    print(
        f"\nImageNet pipeline, {args.img_size}px crops from 375-500px JPEGs, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs; load average {report['load_average_1_5_15min_at_end']}"
    )
    print(
        f"{'source':<8} {'split':<6} {'workers':>7} {'img/s':>8} {'(min-max)':>17} {'ms/img/core':>12} {'/folder':>8}"
    )
    for r in rows:
        lo, hi = r["images_per_s_range"]
        print(
            f"{r['source']:<8} {r['split']:<6} {r['workers']:>7} {r['images_per_s']:8.1f} {f'({lo:.1f}-{hi:.1f})':>17} "
            f"{r['ms_per_image_per_core']:12.2f} {r.get('vs_folder', float('nan')):8.2f}"
        )
    if listing:
        print(
            f"\nlisting {listing['files']} files: no index {listing['no_index_s']:.2f} s, first start "
            f"{listing['first_start_s']:.2f} s ({listing['first_start_vs_no_index']:.2f}x), restart "
            f"{listing['restart_s']:.3f} s ({listing['restart_vs_no_index']:.3f}x); "
            f"index {listing['index_bytes']} bytes"
        )
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
