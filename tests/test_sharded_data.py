"""ImageNet as clusters hold it: Hugging Face datasets (parquet shards, save_to_disk) and WebDataset tar shards,
made by the converter from a folder data set of real images and read back as that folder data set reads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

from dynamixer.data import DataError, HFDataModule, ImageFolderDataModule, WebDataModule
from dynamixer.data.convert import main as convert_main
from dynamixer.data.convert import shard_plan
from dynamixer.data.wds import EpochLoader, ShardStream
from dynamixer.errors import ConfigError
from helpers import QUIET_FAST, run_dir, run_script, script_env

SMALL = {"img_size": 16, "batch_size": 4, "num_workers": 0}


def folder_labels(shard_sets: dict[str, Path]) -> tuple[list[str], dict[str, dict[str, int]]]:
    """The folder source's classes and, per split, image file name (unique in the tree) -> label."""
    classes, samples = ImageFolderDataModule(str(shard_sets["folder"]), num_workers=0).listing()
    return classes, {s: {Path(p).name: y for p, y in rows} for s, rows in samples.items()}


def hf_labels(dm: HFDataModule) -> dict[str, dict[str, int]]:
    dm.setup()
    found = {}
    for split, dataset in (("train", dm.train_set), ("val", dm.val_set)):
        rows = dataset.rows
        found[split] = {Path(r["image"]["path"]).name: r["label"] for r in rows}  # save_to_disk keeps the name
    return found


def wds_labels(folder: Path) -> dict[str, dict[str, int]]:
    found: dict[str, dict[str, int]] = {"train": {}, "val": {}}
    for shard in sorted(folder.glob("*.tar")):
        split = shard.name.split("-")[0]
        for sample in wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()):
            found[split][Path(json.loads(sample["json"])["path"]).name] = int(sample["cls"])
    return found


@pytest.mark.parametrize("source", ["parquet", "saved", "wds"])
def test_each_source_maps_every_image_to_the_folder_sources_class(shard_sets, source: str, tmp_path: Path) -> None:
    classes, expected = folder_labels(shard_sets)
    if source == "wds":
        dm = WebDataModule(str(shard_sets["wds"]), **SMALL)
        found = wds_labels(shard_sets["wds"])
    else:
        dm = HFDataModule(str(shard_sets[source]), cache_dir=str(tmp_path / "cache"), **SMALL)
        found = hf_labels(dm)
    assert dm.class_names == classes and dm.num_classes == 3
    assert found == expected and len(found["train"]) == 30 and len(found["val"]) == 6


def test_hf_serves_the_files_bytes_decoded_as_the_folder_source_does(shard_sets, tmp_path: Path) -> None:
    folder = ImageFolderDataModule(str(shard_sets["folder"]), **SMALL)
    hf = HFDataModule(str(shard_sets["parquet"]), cache_dir=str(tmp_path / "cache"), **SMALL)
    folder.setup()
    hf.setup()
    by_name = {Path(p).name: i for i, (p, _) in enumerate(folder.val_set.samples)}
    for i, row in enumerate(hf.val_set.rows):
        x_hf, y_hf = hf.val_set[i]
        x_folder, y_folder = folder.val_set[by_name[Path(row["image"]["path"]).name]]
        assert y_hf == y_folder and torch.equal(x_hf, x_folder)


def test_wds_validation_reads_each_tar_file_at_its_offset_as_the_folder_source_reads_it(shard_sets) -> None:
    folder = ImageFolderDataModule(str(shard_sets["folder"]), **SMALL)
    shards = WebDataModule(str(shard_sets["wds"]), **SMALL)
    folder.setup()
    shards.setup()
    assert len(shards.val_set) == len(folder.val_set) == 6
    by_name = {Path(p).name: i for i, (p, _) in enumerate(folder.val_set.samples)}
    for i, (shard, key, _) in enumerate(shards.val_set.samples):
        with tarfile.open(shard) as tar:
            name = json.loads(tar.extractfile(f"{key}.json").read())["path"]
        x, y = shards.val_set[i]
        x_folder, y_folder = folder.val_set[by_name[Path(name).name]]
        assert y == y_folder and torch.equal(x, x_folder)


def test_parquet_is_read_without_reaching_the_network(shard_sets, tmp_path: Path, connections) -> None:
    """In a fresh process whose Hub endpoint is a listener that counts connections: none is made."""
    code = (
        "from dynamixer.data import HFDataModule;"
        f"dm = HFDataModule({str(shard_sets['parquet'])!r}, cache_dir={str(tmp_path / 'cache')!r}, num_workers=0);"
        "dm.setup(); dm.train_set[0]; print(len(dm.train_set))"
    )
    env = {**script_env(), "HF_ENDPOINT": connections.url, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "30" and connections.connections == 0
    assert not (tmp_path / "hf_home").exists()  # nothing written to the Hub's cache either: only cache_dir


def test_hf_layouts_it_cannot_read_get_one_message_naming_what_was_found(shard_sets, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no parquet files") as err:
        HFDataModule(str(shard_sets["wds"]))
    assert "dataset_dict.json" in str(err.value) and "none" in str(err.value)
    with pytest.raises(DataError, match="data.image_key=img must name an Image column") as err:
        HFDataModule(str(shard_sets["saved"]), image_key="img")
    assert "'image': 'Image'" in str(err.value) and "'label': 'ClassLabel'" in str(err.value)
    with pytest.raises(DataError, match=r"has the splits \['train', 'validation'\], not \['val'\]"):
        HFDataModule(str(shard_sets["saved"]), val_split="val")


def streams(root: Path, world_size: int, workers: int, epoch: int, **kw) -> list[list[str]]:
    """The keys each (rank, worker) stream of a training epoch yields, in order."""
    dm = WebDataModule(str(root), **{**SMALL, "num_workers": workers})
    shards, counts = dm._shards["train"]
    keys = []
    for rank in range(world_size):
        stream = ShardStream(shards, counts, lambda img: img, 0, rank, world_size, workers, 2, 4, 3, **kw)
        stream.epoch = epoch
        for shard_ids in stream.dealt(epoch)[rank * max(1, workers) : (rank + 1) * max(1, workers)]:
            stages = wds.DataPipeline(wds.SimpleShardList([shards[i] for i in shard_ids]), wds.tarfile_to_samples())
            keys.append([s["__key__"] for s in stages])
    return keys


def test_wds_deals_every_shard_to_one_stream_of_one_rank_and_worker(shard_sets) -> None:
    dealt = streams(shard_sets["wds"], world_size=2, workers=2, epoch=0)
    keys = [k for stream in dealt for k in stream]
    assert len(dealt) == 4 and all(dealt) and len(keys) == len(set(keys)) == 30  # no overlap, none left out
    assert streams(shard_sets["wds"], 2, 2, epoch=0) == dealt  # a function of (seed, epoch)
    assert streams(shard_sets["wds"], 2, 2, epoch=1) != dealt  # dealt again each epoch


def batches(loader: EpochLoader) -> list[tuple[torch.Tensor, list[int]]]:
    return [(x, y.tolist()) for x, y in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_wds_epochs_repeat_from_seed_and_epoch_and_a_resume_continues_at_the_saved_batch(shard_sets, workers) -> None:
    epoch = {"now": 0}

    def loader(start: int = 0) -> EpochLoader:
        dm = WebDataModule(str(shard_sets["wds"]), shuffle_buffer=4, **{**SMALL, "num_workers": workers})
        made = dm.train_dataloader()
        made.epoch = lambda: epoch["now"]  # the trainer's epoch
        made.resume_at = (epoch["now"], start) if start else None
        return made

    first = batches(loader())
    assert len(first) == len(loader()) == (6 if workers else 7)  # 2 streams of 3 batches, or one of 7
    assert [y for _, y in batches(loader())] == [y for _, y in first]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, batches(loader())))  # augmentations too
    epoch["now"] = 1
    second = batches(loader())
    assert [y for _, y in second] != [y for _, y in first]
    for start in (1, 3, 4):
        resumed = batches(loader(start))
        assert len(resumed) == len(second) - start
        assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(resumed, second[start:]))
    again = loader(3)
    batches(again)
    assert len(batches(again)) == len(second)  # the next epoch starts at its beginning


def test_wds_resume_refuses_another_worker_count(shard_sets) -> None:
    dm = WebDataModule(str(shard_sets["wds"]), **{**SMALL, "num_workers": 2})
    state = {"epoch": 1, "batches": 2, "batch_size": 4, "world_size": 1, "num_workers": 0, "data": dm.identity()}
    with pytest.raises(ConfigError, match="data.num_workers=0"):
        dm.load_state_dict(state)


def test_wds_reads_only_the_shards_its_info_lists(shard_sets, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="are not train shards") as err:
        WebDataModule(str(shard_sets["wds"]), train_shards="pipe:touch {x,y}", **SMALL)
    assert "pipe:touch x" in str(err.value) or "pipe:touch" in str(err.value)
    hostile = tmp_path / "wds"
    hostile.mkdir()
    info = json.loads((shard_sets["wds"] / "info.json").read_text())
    info["splits"]["train"]["shards"][0] = "../../etc/passwd"
    (hostile / "info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="is not an info file"):
        WebDataModule(str(hostile), **SMALL)
    with pytest.raises(DataError, match="no .*info.json: data=wds reads WebDataset shards"):
        WebDataModule(str(shard_sets["folder"]), **SMALL)


def copy_of(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


def test_wds_opens_its_shards_itself_and_no_environment_rewrites_them_to_a_command(
    shard_sets, tmp_path: Path, monkeypatch
) -> None:
    marker = tmp_path / "ran"
    # webdataset's URL opener would rewrite each shard path into this shell command
    monkeypatch.setenv("GOPEN_REWRITE", f"{shard_sets['wds']}=pipe:touch {marker} #")
    dm = WebDataModule(str(shard_sets["wds"]), **SMALL)
    assert len(batches(dm.train_dataloader())) == 7 and len(list(dm.val_dataloader())) == 2
    assert not marker.exists()


def test_a_shard_that_holds_other_than_its_info_says_is_refused_naming_it(shard_sets, tmp_path: Path) -> None:
    data = copy_of(shard_sets["wds"], tmp_path)
    info = json.loads((data / "info.json").read_text())
    info["splits"]["train"]["counts"] = [c + 1 for c in info["splits"]["train"]["counts"]]
    (data / "info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"train-0000\d\d.tar holds \d samples, its info.json says \d"):
        batches(WebDataModule(str(data), **SMALL).train_dataloader())  # a stream that ends early
    info["splits"]["val"]["counts"][0] += 1
    (data / "info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="val-000000.tar holds 3 samples with an image"):
        WebDataModule(str(data), **SMALL).setup()


def test_a_class_index_outside_the_classes_is_refused_naming_the_sample(shard_sets, tmp_path: Path) -> None:
    data = copy_of(shard_sets["wds"], tmp_path)
    shard = data / "val-000000.tar"
    samples = list(wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()))
    with wds.TarWriter(str(shard)) as sink:
        for i, sample in enumerate(samples):
            kept = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
            sink.write(kept | ({"cls": b"7"} if i == 0 else {}))
    dm = WebDataModule(str(data), **SMALL)
    dm.setup()
    with pytest.raises(DataError, match=r"val-000000.tar:\w+: cls=b'7' is not a class index of the 3 classes"):
        dm.val_set[0]


def test_the_converter_cuts_a_split_into_shards_of_equal_counts() -> None:
    sizes = [100, 5000, 120, 90, 4000, 110, 130, 100, 95, 3000]  # 12,745 bytes
    plan = shard_plan(sizes, 3000)
    assert len(plan) == 5 and [len(r) for r in plan] == [2, 2, 2, 2, 2]
    assert [i for r in plan for i in r] == list(range(10))
    assert [len(r) for r in shard_plan(sizes[:7], 4000)] == [2, 3, 2]  # ceil(9,550 / 4,000) = 3, 7 / 3 each


def test_hf_refuses_a_saved_folder_that_names_files_outside_it_or_splits_of_other_classes(shard_sets, tmp_path) -> None:
    import datasets

    data = copy_of(shard_sets["saved"], tmp_path)
    state = data / "train" / "state.json"
    saved = json.loads(state.read_text())
    saved["_data_files"][0]["filename"] = "../../elsewhere.arrow"
    state.write_text(json.dumps(saved))
    with pytest.raises(DataError, match="names files outside the folder"):
        HFDataModule(str(data), **SMALL)

    rows = {"image": [{"bytes": b"x", "path": "a.JPEG"}], "label": [0]}
    other = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                rows, features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
            )
            for split, names in (("train", ["a", "b"]), ("validation", ["b", "a"]))
        }
    )
    other.save_to_disk(str(tmp_path / "other"))
    with pytest.raises(DataError, match="name other classes"):
        HFDataModule(str(tmp_path / "other"), **SMALL)


def test_too_few_shards_for_the_streams_get_one_message_naming_the_fix(shard_sets) -> None:
    dm = WebDataModule(str(shard_sets["wds"]), **{**SMALL, "num_workers": 8})
    with pytest.raises(DataError, match="9 training shards for 8 streams") as err:
        dm.train_dataloader()
    assert "--shard-size" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["parquet", "saved", "wds", "folder"])
def test_training_runs_end_to_end_through_each_source(shard_sets, source: str, tmp_path: Path, entry) -> None:
    data = {"parquet": "hf", "saved": "hf", "wds": "wds", "folder": "imagenet"}[source]
    args = [f"data={data}", f"data.data_dir={shard_sets[source]}", "data.batch_size=4", *QUIET_FAST, "run_name=r"]
    args += [f"data.cache_dir={tmp_path / 'cache'}"] if data == "hf" else []
    code, _, err = entry("train.py", args, tmp_path)
    assert code == 0, err
    results = json.loads((run_dir(tmp_path, "r") / "results.json").read_text())
    assert results["status"] == "finished" and results["global_step"] == 6
    assert torch.isfinite(torch.tensor(results["final"]["val/loss"]))


@pytest.mark.slow
def test_ddp_over_wds_shards_that_split_unevenly_evaluates_the_same_batches_on_every_rank(shard_sets, tmp_path) -> None:
    """Three validation shards of two images for two ranks: dealt by shard, one rank would have two batches
    and the other one, and the ranks would wait for each other at the batch ends forever."""
    data = tmp_path / "wds"
    convert_main([str(shard_sets["folder"]), str(data), "--to", "wds", "--shard-size", "2500"])
    assert json.loads((data / "info.json").read_text())["splits"]["val"]["counts"] == [2, 2, 2]
    args = ["data=wds", f"data.data_dir={data}", "data.batch_size=2", "hardware=cpu", "trainer.devices=2"]
    args += [*QUIET_FAST, "trainer.limit_val_batches=1.0", "trainer.max_epochs=1", "run_name=r"]
    run_script("train.py", args, tmp_path, timeout=300)
    results = json.loads((run_dir(tmp_path, "r") / "results.json").read_text())
    assert results["status"] == "finished" and results["global_step"] == 3


def test_the_converter_refuses_a_folder_that_holds_files_and_bad_sizes(shard_sets, tmp_path: Path, capsys) -> None:
    assert convert_main([str(shard_sets["folder"]), str(shard_sets["wds"]), "--to", "wds"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert convert_main([str(shard_sets["folder"]), str(tmp_path / "o"), "--to", "wds", "--shard-size", "lots"]) == 2
    assert "--shard-size=lots: give a size such as 500MB" in capsys.readouterr().err
    assert (
        convert_main([str(shard_sets["folder"]), str(tmp_path / "o"), "--to", "wds", "--shard-size", "0.0000001KB"])
        == 2
    )
    assert "--shard-size=0.0000001KB: give a size such as 500MB" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "none"), str(tmp_path / "o"), "--to", "parquet"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_converted_wds_shards_are_plain_tars_of_the_files(shard_sets) -> None:
    shard = sorted(shard_sets["wds"].glob("train-*.tar"))[0]
    with tarfile.open(shard) as tar:
        names = tar.getnames()
    assert names and all(n.rsplit(".", 1)[1] in ("jpg", "cls", "json") for n in names)
