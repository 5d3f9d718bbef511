"""Tests for the data layer: timm transforms, digits and image-folder data modules."""

from __future__ import annotations

import os
import pickle
import shutil
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from timm.data.auto_augment import AugmentOp, RandAugment

from dynamixer.data import DataError, DigitsDataModule, ImageFolderDataModule, build_transform, load_rgb
from dynamixer.errors import UserError
from helpers import WNIDS, write_image_tree

EVAL_KW = dict(crop_pct=0.875, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture
def tree(image_tree: Path) -> Path:
    return image_tree


def train_only(root: Path) -> Path:
    """A tree with train/ (one image a class) and no val/."""
    write_image_tree(root, train_per_class=1, val_per_class=0)
    shutil.rmtree(root / "val")
    return root


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    return dm


# --- transforms -------------------------------------------------------------------


def test_eval_transform_gives_square_crop_of_img_size():
    tf = build_transform(64, False, **EVAL_KW)
    out = tf(Image.new("RGB", (100, 60), (10, 200, 30)))
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32


def test_train_transform_uses_timm_randaugment():
    tf = build_transform(32, True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, **EVAL_KW)
    assert any(isinstance(t, RandAugment) for t in tf.transforms)
    assert tf(Image.new("RGB", (100, 60))).shape == (3, 32, 32)


def test_train_aug_from_dictconfig_and_unknown_key():
    aug = OmegaConf.create({"scale": [0.5, 1.0], "hflip": 0.0})
    dm = DigitsDataModule(train_aug=aug)
    assert dm.train_aug["scale"] == [0.5, 1.0] and dm.train_aug["hflip"] == 0.0
    with pytest.raises(ValueError, match="data.train_aug has unknown keys"):
        DigitsDataModule(train_aug={"mixup": 0.8})


# --- digits -----------------------------------------------------------------------


def test_digits_split_sizes_and_stratification(digits):
    assert (len(digits.train_set), len(digits.val_set)) == (1437, 360)
    assert digits.num_classes == 10 and digits.class_names == [str(d) for d in range(10)]
    assert set(digits.train_set.labels) == set(digits.val_set.labels) == set(range(10))


def test_digits_split_is_deterministic(digits):
    other = DigitsDataModule()
    other.setup()
    assert other.val_set.labels == digits.val_set.labels
    for i in (0, 100, 359):
        assert np.array_equal(np.asarray(other.val_set.images[i]), np.asarray(digits.val_set.images[i]))


def test_digits_batches(digits):
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) <= 9
    xv, _ = next(iter(digits.val_dataloader()))
    assert xv.shape == (32, 3, 16, 16)
    assert len(digits.val_dataloader()) == 12  # 360 / 32, last batch kept
    assert len(digits.train_dataloader()) == 1437 // 32  # drop_last


def test_digits_train_random_eval_deterministic(digits):
    torch.manual_seed(0)
    train_views = [digits.train_set[5][0] for _ in range(4)]
    assert any(not torch.equal(train_views[0], v) for v in train_views[1:])
    assert torch.equal(digits.val_set[5][0], digits.val_set[5][0])


def test_digits_epoch_covers_train_split(digits):
    n = sum(len(y) for _, y in digits.train_dataloader())
    assert n == 1437 // 32 * 32


# --- image folder -----------------------------------------------------------------


def test_imagefolder_batches(tree):
    dm = ImageFolderDataModule(str(tree), batch_size=4, num_workers=0, img_size=32)
    assert dm.num_classes == 3 and dm.class_names == list(WNIDS)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert set(y.tolist()) <= {0, 1, 2}
    xs, ys = zip(*dm.val_dataloader())
    assert torch.cat(xs).shape == (6, 3, 32, 32)
    assert torch.cat(ys).tolist() == [0, 0, 1, 1, 2, 2]
    assert dm.eval_transform()(Image.new("RGB", (100, 60))).shape == (3, 32, 32)


def test_imagefolder_missing_data_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="data_dir") as err:
        ImageFolderDataModule(str(missing))
    assert str(missing) in str(err.value)


def test_imagefolder_missing_val(tmp_path):
    root = train_only(tmp_path / "d")
    with pytest.raises(DataError) as err:
        ImageFolderDataModule(str(root))
    assert str(root / "val") in str(err.value)


def test_imagefolder_split_without_classes(tmp_path):
    root = train_only(tmp_path / "d")
    (root / "val").mkdir()
    with pytest.raises(DataError, match="no class folders") as err:
        ImageFolderDataModule(str(root))
    assert str(root / "val") in str(err.value)


def test_imagefolder_class_without_images(tree):
    (tree / "val" / WNIDS[1] / f"{WNIDS[1]}_0000.JPEG").unlink()
    (tree / "val" / WNIDS[1] / f"{WNIDS[1]}_0001.JPEG").unlink()
    (tree / "val" / WNIDS[1] / "notes.txt").write_text("not an image")
    dm = ImageFolderDataModule(str(tree))  # the class folders are read here, their files listed in setup
    with pytest.raises(DataError, match="hold no images") as err:
        dm.setup()
    assert str(tree / "val") in str(err.value) and WNIDS[1] in str(err.value)


def test_imagefolder_differing_classes(tmp_path):
    root = write_image_tree(tmp_path / "d", train_per_class=1, val_per_class=1, val_classes=[*WNIDS[:2], "n09999999"])
    with pytest.raises(DataError, match="different class folders") as err:
        ImageFolderDataModule(str(root))
    assert str(root) in str(err.value) and WNIDS[2] in str(err.value) and "n09999999" in str(err.value)


@pytest.fixture
def truncated(tree) -> Path:
    path = tree / "val" / WNIDS[0] / f"{WNIDS[0]}_0000.JPEG"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_image_raises(tree, truncated):
    dm = ImageFolderDataModule(str(tree), batch_size=2, num_workers=0, img_size=32)
    dm.setup()
    with pytest.raises(DataError, match="skip_corrupt") as err:
        dm.val_set[0]
    assert str(truncated) in str(err.value)


def test_truncated_image_skipped_and_counted(tree, truncated):
    dm = ImageFolderDataModule(str(tree), batch_size=2, num_workers=0, img_size=32, skip_corrupt=True)
    with pytest.warns(UserWarning, match=str(truncated)):
        ys = torch.cat([y for _, y in dm.val_dataloader()])
    assert ys.tolist() == [0, 0, 1, 1, 2, 2]  # the bad item is replaced by the next readable one
    assert dm.corrupt_count == 1 and dm.corrupt_files == [str(truncated)]
    torch.cat([y for _, y in dm.val_dataloader()])  # known-bad file skipped again, not re-counted
    assert dm.corrupt_count == 1


def test_train_split_smaller_than_batch(tree):
    dm = ImageFolderDataModule(str(tree), batch_size=64, num_workers=0, img_size=32)
    with pytest.raises(DataError, match="batch_size"):
        dm.train_dataloader()


def test_paper_randaugment_policy_survives_its_strongest_posterize():
    """rand-m9-mstd0.5-inc1 draws magnitudes up to 10, where increasing posterize keeps 0 bits; Pillow 13
    rejects that (ValueError), so the project pins Pillow < 13."""
    op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10, hparams={"magnitude_std": 0})
    out = op(Image.new("RGB", (40, 36), (120, 30, 200)))
    assert out.size == (40, 36) and out.getpixel((0, 0)) == (0, 0, 0)  # 0 bits kept: black


# --- bad images and folders ---------------------------------------------------------


def test_data_error_is_a_user_error_and_a_value_error():
    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)


@pytest.mark.parametrize("orientation", [6, 8])
def test_load_rgb_applies_exif_orientation(tmp_path, orientation):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[...] = (0, 0, 255)
    pixels[:10, :10] = (255, 0, 0)  # red top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    img = load_rgb(str(path))
    assert img.mode == "RGB" and img.size == (20, 40)
    # 6: shown rotated 90 degrees clockwise, the corner lands top-right; 8: counter-clockwise, bottom-left
    corner = (15, 5) if orientation == 6 else (5, 35)
    other = (5, 5) if orientation == 6 else (15, 35)
    assert img.getpixel(corner)[0] > 200 and img.getpixel(corner)[2] < 60
    assert img.getpixel(other)[0] < 60 and img.getpixel(other)[2] > 200


@pytest.mark.parametrize("save", ["I;16 png", "I;16B tiff", "I tiff"])
def test_load_rgb_scales_16_bit_greyscale(tmp_path, save):
    values = np.array([[0, 16448, 32768, 65535]] * 2, dtype=np.uint16)
    if save == "I;16 png":
        img, path = Image.fromarray(values), tmp_path / "grey.png"
    elif save == "I;16B tiff":
        img, path = Image.frombytes("I;16B", (4, 2), values.astype(">u2").tobytes()), tmp_path / "grey.tif"
    else:
        img, path = Image.fromarray(values.astype(np.int32)), tmp_path / "grey.tif"
    img.save(path)
    assert Image.open(path).mode == save.split()[0]
    out = np.asarray(load_rgb(str(path)))
    assert out.shape == (2, 4, 3)
    assert out[0, :, 0].tolist() == [0, 64, 128, 255] and (out == out[..., :1]).all()


def test_load_rgb_composites_transparency_over_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "rgba.png")
    img = load_rgb(str(tmp_path / "rgba.png"))
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((1, 0)) == (255, 0, 0)

    la = Image.new("LA", (1, 1), (0, 0))
    la.save(tmp_path / "la.png")
    assert load_rgb(str(tmp_path / "la.png")).getpixel((0, 0)) == (255, 255, 255)

    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 0])
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "pal.png", transparency=1)
    img = load_rgb(str(tmp_path / "pal.png"))
    assert img.getpixel((0, 0)) == (255, 0, 0) and img.getpixel((1, 0)) == (255, 255, 255)


def test_load_rgb_names_the_unreadable_file(tmp_path):
    path = tmp_path / "junk.JPEG"
    path.write_bytes(b"not an image")
    with pytest.raises(DataError, match="Replace or delete the file") as err:
        load_rgb(str(path))
    assert str(path) in str(err.value)


@pytest.fixture
def bomb(tree, monkeypatch) -> Path:
    """A 200x200 val image while Pillow's limit is lowered to 10000 pixels (it refuses over 20000)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    path = tree / "val" / WNIDS[0] / f"{WNIDS[0]}_0000.JPEG"
    Image.fromarray(np.random.default_rng(99).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(path)
    return path


def test_decompression_bomb_raises_with_the_fix(tree, bomb):
    with pytest.raises(DataError) as err:
        load_rgb(str(bomb))
    msg = str(err.value)
    assert str(bomb) in msg and "40000" in msg and "MAX_IMAGE_PIXELS" in msg
    assert "Resize" in msg and "delete" in msg
    dm = ImageFolderDataModule(str(tree), batch_size=2, num_workers=0, img_size=32)
    dm.setup()
    with pytest.raises(DataError, match="MAX_IMAGE_PIXELS.*data.skip_corrupt=true"):  # the data module's option
        dm.val_set[0]


def test_decompression_bomb_skipped_and_counted(tree, bomb):
    dm = ImageFolderDataModule(str(tree), batch_size=2, num_workers=0, img_size=32, skip_corrupt=True)
    with pytest.warns(UserWarning, match=str(bomb)):
        ys = torch.cat([y for _, y in dm.val_dataloader()])
    assert ys.tolist() == [0, 0, 1, 1, 2, 2]
    assert dm.corrupt_files == [str(bomb)]


def test_symlink_loop_is_listed_once_and_other_links_followed(tmp_path, tree):
    os.symlink(tree / "train" / WNIDS[0], tree / "train" / WNIDS[0] / "loop")
    (tmp_path / "extra").mkdir()
    Image.fromarray(np.full((40, 48, 3), 50, dtype=np.uint8)).save(tmp_path / "extra" / "more.JPEG")
    os.symlink(tmp_path / "extra", tree / "train" / WNIDS[1] / "extra")
    dm = ImageFolderDataModule(str(tree), batch_size=2, num_workers=0, img_size=32)
    dm.setup()
    paths = [p for p, _ in dm.train_set.samples]
    assert len({os.path.realpath(p) for p in paths}) == len(paths) == 13
    assert dm.train_set.targets == [0] * 4 + [1] * 5 + [2] * 4
    assert str(tree / "train" / WNIDS[1] / "extra" / "more.JPEG") in paths


def test_class_folder_with_only_a_symlink_loop_holds_no_images(tree):
    for image in (tree / "val" / WNIDS[2]).iterdir():
        image.unlink()
    os.symlink(tree / "val" / WNIDS[2], tree / "val" / WNIDS[2] / "loop")
    dm = ImageFolderDataModule(str(tree))  # the class folders are read here, their files listed in setup
    with pytest.raises(DataError, match="hold no images") as err:
        dm.setup()
    assert WNIDS[2] in str(err.value)


def test_class_names_match_across_unicode_normal_forms(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    root = write_image_tree(tmp_path / "d", ["bee", nfc], train_per_class=2, val_per_class=1, val_classes=["bee", nfd])
    dm = ImageFolderDataModule(str(root), batch_size=2, num_workers=0, img_size=32)
    assert dm.class_names == ["bee", nfc]
    dm.setup()
    assert dm.train_set.targets == [0, 0, 1, 1] and dm.val_set.targets == [0, 1]
    assert dm.val_set.samples[1][0].startswith(str(root / "val" / nfd))
    ys = torch.cat([y for _, y in dm.val_dataloader()])
    assert ys.tolist() == [0, 1]


def test_class_folders_equal_after_normalisation_in_one_split(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    root = write_image_tree(tmp_path / "d", [nfc, nfd], train_per_class=1, val_per_class=1, val_classes=[nfc])
    with pytest.raises(DataError, match="Unicode") as err:
        ImageFolderDataModule(str(root))
    assert ascii(nfc) in str(err.value) and ascii(nfd) in str(err.value)
    assert str(root / "train") in str(err.value)


@pytest.fixture
def many_corrupt(tree, truncated) -> list[Path]:
    """The truncated val image and 22 junk train images: 23 of 40 files are unreadable."""
    junk = [tree / "train" / WNIDS[2] / f"junk_{i:02d}.JPEG" for i in range(22)]
    for path in junk:
        path.write_bytes(b"not an image")
    return [truncated, *junk]


def test_verify_lists_all_unreadable_files_at_setup(tree, many_corrupt):
    dm = ImageFolderDataModule(str(tree), batch_size=2, num_workers=2, img_size=32, verify=True)
    with pytest.raises(DataError) as err:
        dm.setup()
    msg = str(err.value)
    assert "23 of 40" in msg and "and 3 more" in msg and "skip_corrupt" in msg
    listed = [line.strip().split(": ")[0] for line in msg.splitlines() if line.startswith(f"  {tree}")]
    assert listed == [str(p) for p in many_corrupt[1:21]]  # the first 20 in listing order: train before val


def test_verify_with_skip_corrupt_drops_unreadable_files_up_front(tree, many_corrupt):
    dm = ImageFolderDataModule(str(tree), batch_size=2, num_workers=0, img_size=32, verify=True, skip_corrupt=True)
    with pytest.warns(UserWarning, match="23 unreadable"):
        dm.setup()
    assert dm.corrupt_files == sorted(map(str, many_corrupt))
    assert len(dm.train_set) == 12 and len(dm.val_set) == 5 and dm.val_set.targets == [0, 1, 1, 2, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys = torch.cat([y for _, y in dm.val_dataloader()])
    assert ys.tolist() == [0, 1, 1, 2, 2] and dm.corrupt_count == 23


# --- CIFAR (the python version's folders) ------------------------------------------


def write_cifar10(root: Path, per_batch: int = 4) -> Path:
    """A tiny `cifar-10-batches-py` in the real format: pickled dicts of bytes keys, uint8 rows of 3072."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), b"labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = [
        n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    ]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    return root


def test_cifar10_folder_gives_its_images_labels_and_class_names(tmp_path: Path) -> None:
    from dynamixer.data import CIFARDataModule

    root = write_cifar10(tmp_path)
    batch = pickle.loads((root / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    dm = CIFARDataModule(data_dir=str(root), img_size=64, batch_size=4, num_workers=0)
    dm.setup()
    assert dm.num_classes == 10 and dm.class_names[:2] == ["airplane", "automobile"]
    assert (len(dm.train_set), len(dm.val_set)) == (20, 4)
    # pixel (row 0, col 1) of image 0: channel planes of 1024 values each, row-major
    first = np.asarray(dm.train_set.images[0])
    assert first.shape == (32, 32, 3) and list(first[0, 1]) == [batch[b"data"][0][c * 1024 + 1] for c in range(3)]
    assert dm.train_set.labels[:4] == batch[b"labels"]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 64, 64) and y.dtype == torch.int64


def test_a_cifar_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    from dynamixer.data import CIFARDataModule

    root = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Marker:
        def __reduce__(self):
            return Path.touch, (marker,)

    (root / "cifar-10-batches-py" / "batches.meta").write_bytes(pickle.dumps({b"label_names": Marker()}))
    with pytest.raises(DataError, match="not allowed in a CIFAR file"):
        CIFARDataModule(data_dir=str(root))
    assert not marker.exists()


def test_the_transfer_experiment_composes_with_the_release_recipe(tmp_path: Path) -> None:
    from helpers import compose_train_config

    cfg = compose_train_config(["experiment=cifar_transfer", "model.pretrained_file=w.ckpt"], output_dir=tmp_path)
    assert (cfg.model.model_name, cfg.model.img_size, cfg.data._target_) == (
        "dynamixer_s",
        224,
        "dynamixer.data.CIFARDataModule",
    )
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (0.01, 0.9, 5e-4)
    assert (cfg.module.backbone_lr_scale, cfg.scheduler.min_lr, cfg.trainer.max_epochs, cfg.data.batch_size) == (
        0.01,
        2e-4,
        60,
        128,
    )
