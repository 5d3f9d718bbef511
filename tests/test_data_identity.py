"""A resume trains on the data it started with, known by its content: other images under the same file names
and sizes, or another conversion with the same shard names and counts, are refused; the same data moved
elsewhere (a copy on a node's local disk) is accepted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dynamixer.data.identity import differences, file_digest
from helpers import QUIET_FAST, WNIDS

SOURCES = {"folder": "imagenet", "wds": "wds", "parquet": "hf", "saved": "hf"}


def run_args(source: str, data: Path, epochs: int, *extra: str) -> list[str]:
    args = [f"data={SOURCES[source]}", f"data.data_dir={data}", "data.batch_size=4", *QUIET_FAST, "run_name=r"]
    return [*args, f"trainer.max_epochs={epochs}", "trainer.limit_train_batches=2", *extra]


def replace_content(source: str, data: Path, shard_sets: dict[str, Path]) -> None:
    """The same names and sizes, other content. Folders: two classes' images swapped file by file (each file
    keeps its name, the sizes made equal). Shards: another conversion of the same images (another order),
    with the same shard names and counts."""
    from dynamixer.data.convert import convert

    if source == "folder":
        a, b = (sorted((data / "train" / wnid).iterdir()) for wnid in WNIDS[:2])
        for x, y in zip(a, b):  # each file is written anew and renamed over the old one, as rsync and tar do
            bx, by = x.read_bytes(), y.read_bytes()
            size = max(len(bx), len(by))  # JPEG decoders stop at the end marker: padding keeps the images
            for path, content in ((x, by), (y, bx)):
                path.with_suffix(".new").write_bytes(content.ljust(size, b"\0"))
                path.with_suffix(".new").replace(path)
        return
    names = sorted(p.relative_to(data) for p in data.rglob("*") if p.is_file())
    shutil.rmtree(data)
    convert(shard_sets["folder"], data, source, {"wds": 4_000, "parquet": 20_000}[source], seed=1)
    assert sorted(p.relative_to(data) for p in data.rglob("*") if p.is_file()) == names


@pytest.mark.parametrize("source", ["folder", "folder-index", "wds", "parquet"])
def test_a_resume_refuses_other_images_under_the_same_names(shard_sets, source, tmp_path, entry, user_error) -> None:
    source, indexed = source.split("-")[0], source.endswith("-index")
    data = tmp_path / "data" / source
    shutil.copytree(shard_sets[source], data)
    extra = [f"data.cache_dir={tmp_path / 'cache'}"] if source == "parquet" else []
    extra += [f"data.index_file={tmp_path / 'index.json.gz' if indexed else 'null'}"] if source == "folder" else []
    code, _, err = entry("train.py", run_args(source, data, 1, *extra), tmp_path)
    assert code == 0, err
    replace_content(source, data, shard_sets)
    message = user_error("train.py", run_args(source, data, 2, "ckpt_path=auto", "extend=true", *extra), tmp_path)
    if indexed:  # the restart's check of the index sees the folders whose files were replaced
        assert "the data changed since this run listed it" in message, message
        assert f"train/{WNIDS[0]}: other images under the same names" in message, message
    else:
        assert "not the data set this run trained on" in message and "changed" in message, message
        named = f"train/{WNIDS[0]}" if source == "folder" else ("train-" if source == "wds" else "data/train-")
        assert named in message, message


@pytest.mark.parametrize("source", ["folder", "wds", "saved"])
def test_a_resume_accepts_the_same_data_moved_elsewhere(shard_sets, source, tmp_path, entry) -> None:
    data = tmp_path / "data" / source
    shutil.copytree(shard_sets[source], data)
    index = [f"data.index_file={tmp_path / 'index.json.gz'}"] if source == "folder" else []
    code, _, err = entry("train.py", run_args(source, data, 1, *index), tmp_path)
    assert code == 0, err
    moved = tmp_path / "local_disk" / source
    shutil.move(data, moved)  # and, for folders, no index any more: listed and digested again
    code, _, err = entry("train.py", run_args(source, moved, 2, "ckpt_path=auto", "extend=true"), tmp_path)
    assert code == 0, err


def test_a_checkpoint_without_a_data_identity_is_evaluated_but_not_resumed(digits_run, tmp_path, user_error) -> None:
    """Checkpoints written before the identity was recorded: test.py's reader takes them, a resume refuses."""
    import torch

    from dynamixer.run.checkpoints import load_model

    folder = tmp_path / "logs" / "train" / "runs" / "r"
    shutil.copytree(digits_run, folder)
    path = folder / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["DigitsDataModule"]["data"]
    torch.save(checkpoint, path)
    load_model(str(path))  # evaluation, prediction and export read it
    message = user_error(
        "train.py", [*QUIET_FAST, "run_name=r", "ckpt_path=auto", "trainer.max_epochs=3", "extend=true"], tmp_path
    )
    assert "records no identity of the data" in message and "model.pretrained_file" in message, message


def test_a_files_digest_covers_its_size_and_both_ends(tmp_path: Path) -> None:
    path = tmp_path / "f"
    body = bytes(range(256)) * 64  # 16 KiB
    path.write_bytes(body)
    first = file_digest(path, 1024)
    for changed in (b"x" + body[1:], body[:-1] + b"x", body + b"\0"):
        path.write_bytes(changed)
        assert file_digest(path, 1024) != first
    path.write_bytes(body[:8000] + b"x" + body[8001:])  # the middle of a file over twice the edge: not read
    assert file_digest(path, 1024) == first
    assert file_digest(path, 1 << 20) != file_digest(tmp_path / "gone", 1 << 20)


def test_differences_name_what_changed_went_missing_and_is_new() -> None:
    found = differences({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "9", "d": "4"})
    assert found == "1 changed (b); 1 missing (c); 1 new (d)"
    assert differences({"a": "1"}, {"a": "1"}) is None
