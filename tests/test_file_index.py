"""The file index: a folder data set listed once per run, read back by restarts, refused when it changed."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import scipy.io

from dynamixer.data import DataError, ImageFolderDataModule, file_index
from helpers import QUIET_FAST, WNIDS, flatten_val, run_dir, run_script, write_photo_tree


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return write_photo_tree(tmp_path / "imagenet")


def samples(dm: ImageFolderDataModule) -> tuple[list, list]:
    dm.setup()
    return [(os.path.relpath(p, dm.data_dir), y) for p, y in dm.train_set.samples], [
        (os.path.relpath(p, dm.data_dir), y) for p, y in dm.val_set.samples
    ]


def test_a_restart_reads_the_index_and_lists_no_folder(photos: Path, tmp_path: Path, monkeypatch) -> None:
    index = tmp_path / "run" / "data_index.json.gz"
    first = samples(ImageFolderDataModule(str(photos), index_file=str(index)))
    assert first == samples(ImageFolderDataModule(str(photos)))  # the same listing as without an index
    assert json.loads(gzip.decompress(index.read_bytes()))["counts"]["train"][0] == 4 * len(WNIDS)

    def no_listing(path: str) -> None:
        raise AssertionError(f"listed {path}")

    monkeypatch.setattr(file_index, "_list_folder", no_listing)
    assert samples(ImageFolderDataModule(str(photos), index_file=str(index))) == first


def test_a_restart_refuses_a_data_set_that_changed_naming_the_folder(photos: Path, tmp_path: Path) -> None:
    index = tmp_path / "data_index.json.gz"
    samples(ImageFolderDataModule(str(photos), index_file=str(index)))
    shutil.copy(photos / "train" / WNIDS[0] / f"{WNIDS[0]}_train_0000.JPEG", photos / "train" / WNIDS[1] / "new.JPEG")
    with pytest.raises(DataError, match="changed since this run listed it") as err:
        ImageFolderDataModule(str(photos), index_file=str(index)).setup()
    assert f"train/{WNIDS[1]}: 4 images and 0 folders then, 5 and 0 now" in str(err.value)
    assert "start a new run" in str(err.value)


def test_a_copy_of_the_data_is_listed_again_once_and_accepted(photos: Path, tmp_path: Path) -> None:
    index = tmp_path / "data_index.json.gz"
    first = samples(ImageFolderDataModule(str(photos), index_file=str(index)))
    copy = tmp_path / "local_disk" / "imagenet"
    shutil.copytree(photos, copy)
    later = time.time_ns() + 10**9
    for folder, _, _ in os.walk(copy):
        os.utime(folder, ns=(later, later))  # a copy that keeps no folder times (cp -r, rsync without -t)
    assert samples(ImageFolderDataModule(str(copy), index_file=str(index))) == first
    saved = json.loads(gzip.decompress(index.read_bytes()))["splits"]["train"][WNIDS[0]]["mtime_ns"]
    assert saved == later  # written again: the next restart lists nothing


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[:100]),
        lambda p: p.write_bytes(b"not gzip"),
        lambda p: p.write_bytes(gzip.compress(json.dumps(_with_file(p, "../../etc/passwd")).encode())),
        lambda p: p.write_bytes(gzip.compress(json.dumps(_with_file(p, "extra.JPEG")).encode())),  # digest
        lambda p: p.write_bytes(gzip.compress(json.dumps(_with_file(p, f"{WNIDS[0]}_train_0000.JPEG")).encode())),
        lambda p: p.write_bytes(gzip.compress(b"[" * 100_000 + b"]" * 100_000)),
    ],
    ids=["truncated", "not-gzip", "path-outside", "edited", "a-file-twice", "nested-deep"],
)
def test_a_damaged_or_hostile_index_is_refused_naming_it(photos: Path, tmp_path: Path, damage) -> None:
    index = tmp_path / "data_index.json.gz"
    samples(ImageFolderDataModule(str(photos), index_file=str(index)))
    damage(index)
    with pytest.raises(DataError, match="is not a whole data-set index") as err:
        ImageFolderDataModule(str(photos), index_file=str(index)).setup()
    assert str(index) in str(err.value) and "Delete it" in str(err.value)


def _with_file(path: Path, name: str) -> dict:
    payload = json.loads(gzip.decompress(path.read_bytes()))
    payload["splits"]["train"][WNIDS[0]]["files"].append([name, 1])
    if name != "extra.JPEG":
        payload["digest"] = file_index._digest(payload["splits"])  # a well-formed digest: the names are refused
    return payload


def test_the_official_flat_val_folder_reads_kaggles_labels_and_the_devkits_alike(photos: Path, tmp_path: Path) -> None:
    folder_val = [(Path(p).name, y) for p, y in (samples(ImageFolderDataModule(str(photos)))[1])]
    flat = flatten_val(photos)
    label = {w: i for i, w in enumerate(sorted(WNIDS))}
    expected = [(name, label[wnid]) for name, wnid in flat]
    assert sorted(y for _, y in expected) == sorted(y for _, y in folder_val)

    kaggle = photos.parent / "LOC_val_solution.csv"  # where Kaggle puts it: beside ILSVRC/Data/CLS-LOC
    kaggle.write_text(
        "ImageId,PredictionString\n" + "".join(f"{n[:-5]},{w} 1 2 30 40 {w} 3 4 5 6\n" for n, w in flat[::-1])
    )
    kaggle_val = [(Path(p).name, y) for p, y in samples(ImageFolderDataModule(str(photos)))[1]]
    assert kaggle_val == expected
    kaggle.unlink()

    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    ids = {w: 100 + i for i, w in enumerate(reversed(WNIDS))}  # the devkit's IDs are not the sorted order
    synsets = [(i, w, "words", "gloss", 0) for w, i in ids.items()] + [(1001, "n00001740", "entity", "", 3)]
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"), ("num_children", "O")]
    scipy.io.savemat(devkit / "meta.mat", {"synsets": __import__("numpy").array(synsets, dtype=dtype)})
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for _, w in flat))
    devkit_val = [
        (Path(p).name, y)
        for p, y in samples(
            ImageFolderDataModule(str(photos), val_labels=str(devkit / "ILSVRC2012_validation_ground_truth.txt"))
        )[1]
    ]
    assert devkit_val == expected


def test_the_devkits_labels_need_the_official_file_names(photos: Path, tmp_path: Path) -> None:
    flat = flatten_val(photos)
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    truth = devkit / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("1\n" * len(flat))
    (photos / "val" / flat[2][0]).rename(photos / "val" / "ILSVRC2012_val_00000099.JPEG")  # one gone, one extra
    with pytest.raises(DataError, match="holds other names") as err:
        ImageFolderDataModule(str(photos), val_labels=str(truth)).setup()
    assert "ILSVRC2012_val_00000003" in str(err.value) and "ILSVRC2012_val_00000099" in str(err.value)


def test_a_flat_val_folder_without_labels_gets_one_message_naming_what_to_give(photos: Path) -> None:
    flatten_val(photos)
    with pytest.raises(DataError, match="no label file was found") as err:
        ImageFolderDataModule(str(photos))
    assert "data.val_labels=" in str(err.value) and "LOC_val_solution.csv" in str(err.value)


def test_a_layout_that_is_no_folder_data_set_names_what_was_found(tmp_path: Path) -> None:
    (tmp_path / "train-00000-of-00004.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="missing split folder") as err:
        ImageFolderDataModule(str(tmp_path))
    assert "train-00000-of-00004.parquet" in str(err.value) and "data=hf" in str(err.value)


@pytest.mark.slow
def test_under_ddp_rank_0_lists_once_and_a_changed_data_set_stops_every_rank_with_one_message(photos, tmp_path) -> None:
    args = ["data=imagenet", f"data.data_dir={photos}", "data.batch_size=2", "hardware=cpu", "trainer.devices=2"]
    args += [*QUIET_FAST, "run_name=r", "trainer.max_epochs=1"]
    run_script("train.py", args, tmp_path)
    index = run_dir(tmp_path, "r") / "data_index.json.gz"
    written = index.stat().st_mtime_ns, index.stat().st_ino
    assert json.loads(gzip.decompress(index.read_bytes()))["counts"]["train"][0] == 4 * len(WNIDS)

    def longer(epochs: int) -> list[str]:
        return [*(a for a in args if a != "trainer.max_epochs=1"), f"trainer.max_epochs={epochs}", "ckpt_path=auto"]

    run_script("train.py", [*longer(2), "extend=true"], tmp_path)  # a restart: the index is read, not rewritten
    assert (index.stat().st_mtime_ns, index.stat().st_ino) == written

    (photos / "train" / WNIDS[2] / f"{WNIDS[2]}_train_0000.JPEG").unlink()
    proc = run_script("train.py", [*longer(3), "extend=true"], tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    messages = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(messages) == 1 and "changed since this run listed it" in messages[0], proc.stderr[-3000:]
    assert f"train/{WNIDS[2]}: 4 images" in proc.stderr and "Traceback" not in proc.stderr
