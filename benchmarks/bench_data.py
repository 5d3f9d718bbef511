"""Data-loader throughput: images/s through the ImageNet transform pipeline, per worker count.

Writes a small ImageNet-style JPEG tree (`train/` and `val/`, a few classes, images larger than the
crop, sizes like ImageNet's), builds `dynamixer.data.ImageFolderDataModule` with the paper's training
augmentation (RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25) and its evaluation transform
(resize + 224 centre crop), and times full passes of the loaders for each worker count.

    python benchmarks/bench_data.py --workers 0 1 2 --images 256 --json benchmarks/results/data_cpu.json
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

from dynamixer.data import ImageFolderDataModule
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=256, help="JPEGs per split")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--passes", type=int, default=3, help="timed passes per setting (after one warm-up pass)")
    ap.add_argument("--data-dir", type=Path, default=None, help="reuse/write the JPEG tree here (default: a temp dir)")
    ap.add_argument(
        "--auto-augment", default=PAPER_TRAIN_AUG["auto_augment"], help="RandAugment policy of the train split"
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or Path(tmp)
        if not (root / "train").is_dir():
            write_jpeg_tree(root, args.images)
        rows = []
        for workers in args.workers:
            dm = ImageFolderDataModule(
                str(root),
                batch_size=args.batch_size,
                num_workers=workers,
                img_size=args.img_size,
                crop_pct=0.9,
                train_aug={**PAPER_TRAIN_AUG, "auto_augment": args.auto_augment},
            )
            for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
                rates = time_loader(loader, args.passes + 1)[1:]  # first pass: warm-up (page cache, workers)
                med = statistics.median(rates)
                rows.append(
                    {
                        "split": split,
                        "workers": workers,
                        "images_per_s": med,
                        "images_per_s_range": [min(rates), max(rates)],
                        "images_per_s_per_worker": med / max(workers, 1),
                    }
                )
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpus": os.cpu_count(),
        "load_average_1_5_15min_at_end": os.getloadavg(),
        "results": rows,
    }
    print(
        f"\nImageNet pipeline, {args.img_size}px crops from 375-500px JPEGs, batch {args.batch_size}, "
        f"{os.cpu_count()} CPUs; load average {report['load_average_1_5_15min_at_end']}"
    )
    print(f"{'split':<6} {'workers':>7} {'img/s':>8} {'(min-max)':>17} {'img/s/worker':>13}")
    for r in rows:
        lo, hi = r["images_per_s_range"]
        print(
            f"{r['split']:<6} {r['workers']:>7} {r['images_per_s']:8.1f} {f'({lo:.1f}-{hi:.1f})':>17} "
            f"{r['images_per_s_per_worker']:13.1f}"
        )
    write_report(report, args.json)
    return report


if __name__ == "__main__":
    main()
