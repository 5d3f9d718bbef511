"""A property-based harness over what we read from outside: each format is mutated at random (Hypothesis) and
read the way a run reads it; the outcome is success or one user's error (exit 2 with one message through an
entry point), never another exception, and always within a time bound.

Covered: every field of a training checkpoint (then restored the way Lightning and dynamixer restore it),
the values of a stored run config of every kind (then its model built on the meta device), the file index,
YAML of sweep folders, brace patterns of shards, Kaggle's label file, CIFAR's batch files, the info.json of
WebDataset shards, the members of a tar shard, the `datasets` features in parquet metadata, and the options
of train.py, test.py, predict.py and export.py.
The budget is `FUZZ_SCALE` times each test's examples: 1 in the quick tier, 3 with DYNAMIXER_FUZZ=ci (CI).
The sequence is derandomized: a run repeats the cases of the run before, and CI explores more of them.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dynamixer.bounded import parse_yaml, pattern_count
from dynamixer.checkpoint_reader import validate
from dynamixer.errors import UserError
from helpers import QUIET_FAST, compose_train_config, read_checkpoint

FUZZ_SCALE = 3 if os.environ.get("DYNAMIXER_FUZZ") == "ci" else 1
SECONDS = 30  # one case, read and restored: a bound far above what any takes (a parse that expands hangs)


def fuzz(examples: int, shrink: bool = True):
    """Hypothesis' settings for `examples` cases (times `FUZZ_SCALE`); no line tracing of a failure (its explain
    phase makes a failing training run take minutes), and without `shrink` its case is reported as found."""
    phases = [Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if shrink else [])]
    return settings(
        max_examples=examples * FUZZ_SCALE,
        deadline=None,
        derandomize=True,
        phases=phases,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


TENSORS = st.builds(
    lambda shape, dtype: torch.zeros(shape, dtype=dtype),
    st.lists(st.integers(0, 3), max_size=3).map(tuple),
    st.sampled_from([torch.float32, torch.int64, torch.uint8, torch.bool, torch.float16]),
)
HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([-1, 0, 1, 2, 624, 625, 10**6]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["local:///", "http://127.0.0.1:9/x", "../../x.ckpt", "${oc.env:HOME}", "~", "", "evil"]),
    st.lists(st.integers(-3, 3), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(-2, 2), max_size=3),
    TENSORS,
)


def paths_of(node: Any, prefix: tuple = (), skip: tuple[str, ...] = ()) -> list[tuple]:
    """Every path to a value in `node` (maps and lists), but below the keys in `skip`."""
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            if key not in skip:
                found += paths_of(value, (*prefix, key), skip)
    elif isinstance(node, list):
        for i, value in enumerate(node[:3]):
            found += paths_of(value, (*prefix, i), skip)
    return found


def mutate(root: Any, path: tuple, op: str, value: Any) -> Any:
    """`root` with the value at `path` replaced by `value`, deleted, or given an extra key."""
    root = copy.copy(root)
    if not path:
        return value
    *parents, last = path
    node = root
    for key in parents:
        child = copy.copy(node[key])
        node[key] = child
        node = child
    if op == "delete" and isinstance(node, dict):
        del node[last]
    elif op == "extra" and isinstance(node[last], dict):
        node[last] = {**node[last], "extra": value}
    else:
        node[last] = value
    return root


MUTATION = st.tuples(st.sampled_from(["replace", "replace", "delete", "extra"]), HOSTILE)


@pytest.fixture(scope="module")
def raw_checkpoint(digits_run: Path) -> dict:
    return read_checkpoint(digits_run / "checkpoints" / "last.ckpt")


def restore(checked: dict, folder: Path) -> None:
    """What a resume does with a validated checkpoint, short of training: the random states, each callback's
    state, the loops' progress in a fresh trainer, the data position, the stored run and its model (meta)."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    from dynamixer.callbacks import MetricsHistory
    from dynamixer.machinery.lightning_internals import loops_state_template  # noqa: F401  (the trainer below)
    from dynamixer.machinery.rng import rng_states, set_rng_states
    from dynamixer.run.build import instantiate_checked
    from dynamixer.run.stored_config import read_stored_run
    from helpers import cpu_trainer

    before = rng_states()
    try:
        set_rng_states(checked["rng_states_per_rank"][0])
    finally:
        set_rng_states(before)
    for key, state in checked["callbacks"].items():
        name = key.split("{")[0]
        callback = {"MetricsHistory": MetricsHistory, "EarlyStopping": lambda: EarlyStopping("val/loss")}.get(
            name, lambda: ModelCheckpoint(dirpath=folder)
        )()
        callback.load_state_dict(state)
    trainer = cpu_trainer(folder)
    for loop in ("fit_loop", "validate_loop", "test_loop", "predict_loop"):
        getattr(trainer, loop).load_state_dict(checked["loops"][loop])
    stored = read_stored_run(checked, str(folder / "last.ckpt"))
    with torch.device("meta"):
        instantiate_checked(stored.model, num_classes=stored.num_classes, _convert_="all")


@fuzz(60)
@given(data=st.data())
def test_any_field_of_a_checkpoint_is_read_and_restored_or_one_error(raw_checkpoint, tmp_path_factory, data) -> None:
    paths = paths_of(raw_checkpoint, skip=("state_dict", "state", "hyper_parameters"))
    path = data.draw(st.sampled_from(paths), label="path")
    op, value = data.draw(MUTATION, label="mutation")
    crafted = mutate(raw_checkpoint, path, op, value)
    folder = tmp_path_factory.getbasetemp() / "fuzz_checkpoint"
    folder.mkdir(exist_ok=True)
    start = time.monotonic()
    try:
        restore(validate(crafted, folder / "last.ckpt"), folder)
    except UserError:
        pass
    assert time.monotonic() - start < SECONDS


@fuzz(60)
@given(data=st.data())
def test_any_value_of_a_stored_run_config_builds_its_model_or_is_one_error(raw_checkpoint, tmp_path_factory, data):
    hparams = raw_checkpoint["hyper_parameters"]
    paths = [("hyper_parameters", *p) for p in paths_of(hparams) if p[:1] in (("run_config",), ("data_info",), ())]
    path = data.draw(st.sampled_from(paths), label="path")
    op, value = data.draw(MUTATION.filter(lambda m: not isinstance(m[1], torch.Tensor)), label="mutation")
    crafted = mutate(raw_checkpoint, path, op, value)
    folder = tmp_path_factory.getbasetemp() / "fuzz_stored"
    folder.mkdir(exist_ok=True)
    try:
        restore(validate(crafted, folder / "last.ckpt"), folder)
    except UserError:
        pass


@fuzz(100)
@given(text=st.one_of(st.text(max_size=200), st.sampled_from(["&a [1]", "*a", "[&x [1, 2], *x]", "a: !!python/none"])))
def test_any_yaml_text_is_plain_data_or_a_yaml_error(text: str) -> None:
    try:
        parsed = parse_yaml(text)
    except yaml.YAMLError:
        return
    json.dumps(parsed, default=str)  # plain data: maps, lists, scalars


BRACES = st.lists(
    st.one_of(
        st.sampled_from(["a", "-", ".tar", "{", "}", ",", "\\", "{1..3}", "{a..c}", "{0..10..5}", "{x,y}"]),
        st.text(alphabet="ab{},.0123", max_size=3),
    ),
    max_size=8,
).map("".join)


@fuzz(200)
@given(pattern=BRACES)
def test_a_brace_pattern_is_counted_at_or_above_what_it_expands_to(pattern: str) -> None:
    from braceexpand import UnbalancedBracesError, braceexpand

    try:
        expanded = list(braceexpand(pattern))
    except UnbalancedBracesError:
        return
    assert pattern_count(pattern) >= len(expanded)


@pytest.fixture(scope="module")
def index_payload(tmp_path_factory) -> dict:
    from dynamixer.data.file_index import FileIndex
    from helpers import write_image_tree

    tree = write_image_tree(tmp_path_factory.mktemp("fuzz_index") / "data", train_per_class=2, val_per_class=1)
    path = tmp_path_factory.getbasetemp() / "fuzz_index" / "index.json.gz"
    FileIndex.build({"train": tree / "train", "val": tree / "val"}).write(path)
    return json.loads(gzip.decompress(path.read_bytes()))


@fuzz(60)
@given(data=st.data())
def test_any_file_index_is_read_or_refused_naming_it(index_payload, tmp_path_factory, data) -> None:
    from dynamixer.data import file_index

    path = data.draw(st.sampled_from(paths_of(index_payload)), label="path")
    op, value = data.draw(MUTATION.filter(lambda m: not isinstance(m[1], torch.Tensor)), label="mutation")
    crafted = mutate(index_payload, path, op, value)
    if isinstance(crafted, dict) and isinstance(crafted.get("splits"), dict) and data.draw(st.booleans()):
        try:  # a well-formed digest of the crafted lists: their names and counts are what is checked then
            crafted["digest"] = file_index._digest(crafted["splits"])
        except Exception:
            pass
    target = tmp_path_factory.getbasetemp() / "fuzz_index" / "crafted.json.gz"
    target.write_bytes(gzip.compress(json.dumps(crafted).encode()))
    try:
        file_index.FileIndex.read(target)
    except UserError as err:
        assert str(target) in str(err)


@fuzz(60)
@given(rows=st.lists(st.text(alphabet='ImageId,PredictionString n0123456789_ \t"', max_size=40), max_size=6))
def test_any_label_file_is_read_or_refused_naming_it(tmp_path_factory, rows: list[str]) -> None:
    from dynamixer.data.val_labels import read_val_labels

    path = tmp_path_factory.getbasetemp() / "LOC_val_solution.csv"
    path.write_text("\n".join(rows))
    try:
        labels = read_val_labels(path, [])
    except UserError as err:
        assert str(path) in str(err)
    else:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items())


OPTIONS = {
    "model.segments": st.one_of(st.integers(-1, 9), st.sampled_from(["[1,2,4,8]", "[0]", "x", "null", "1.5"])),
    "model.reduced_dim": st.one_of(st.integers(-1, 5), st.sampled_from(["[2]", "y", "null"])),
    "data.batch_size": st.one_of(st.integers(-2, 40), st.sampled_from(["0.5", "x", "null"])),
    "optimizer.lr": st.one_of(st.floats(-1, 1, allow_nan=False), st.sampled_from(["x", "null", "inf", "nan"])),
    "trainer.max_epochs": st.one_of(st.integers(-2, 2), st.sampled_from(["x", "1.5"])),
    "trainer.limit_val_batches": st.sampled_from(["1", "0", "-1", "1.5", "x"]),
    "trainer.accelerator": st.sampled_from(["cpu", "x", "1"]),
    "module.ema_decay": st.one_of(st.floats(-1, 2, allow_nan=False), st.sampled_from(["null", "x"])),
    "module.label_smoothing": st.one_of(st.floats(-1, 2, allow_nan=False), st.sampled_from(["x"])),
    "scheduler.warmup_epochs": st.one_of(st.integers(-2, 3), st.sampled_from(["x", "null"])),
    "callbacks.stop_on_signal.every_n_steps": st.one_of(st.integers(-1, 3), st.sampled_from(["x", "true"])),
    "seed": st.one_of(st.integers(-(2**40), 2**40), st.sampled_from(["x", "1.5", "null"])),
    "data.classes": st.sampled_from(["[5,6,7]", "[5]", "[10]", "[-1,2]", "[]", "x", "[1,1]"]),
}


@fuzz(3, shrink=False)
@given(choices=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.just(None), min_size=1, max_size=3), data=st.data())
def test_train_py_options_run_or_end_in_one_message(tmp_path_factory, entry, choices, data) -> None:
    short = {"trainer.max_epochs": "1", "trainer.limit_train_batches": "1", "trainer.limit_val_batches": "1"}
    chosen = {key: str(data.draw(OPTIONS[key], label=key)) for key in sorted(choices)}
    overrides = [f"{key}={value}" for key, value in {**short, **chosen}.items()]
    code, _, err = entry("train.py", [*QUIET_FAST, *overrides], tmp_path_factory.mktemp("fuzz_train"))
    assert code in (0, 2), (overrides, err[-3000:])
    if code == 2:
        assert err.startswith("Error: ") and "Traceback" not in err, (overrides, err[-3000:])


ARRAYS = st.builds(
    lambda shape, dtype: np.zeros(shape, dtype=dtype),
    st.lists(st.integers(0, 3), max_size=3).map(tuple),
    st.sampled_from([np.uint8, np.int64, np.float32, np.bool_, np.uint16]),
)
PLAIN = HOSTILE.filter(lambda v: not isinstance(v, torch.Tensor)) | ARRAYS | st.binary(max_size=8)


def cifar_files() -> dict[str, Any]:
    """A whole CIFAR-10 python folder of two images a batch, as unpickled: what each file holds."""
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 9], b"batch_label": b"training batch"}
    return {"batches.meta": {b"label_names": [str(i).encode() for i in range(10)]}} | {
        name: batch for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    }


@fuzz(60)
@given(data=st.data())
def test_any_cifar_file_is_read_or_refused_naming_it(tmp_path_factory, data) -> None:
    import pickle

    from dynamixer.data import CIFARDataModule

    files = cifar_files()
    name = data.draw(st.sampled_from(sorted(files)), label="file")
    path = data.draw(st.sampled_from(paths_of(files[name])), label="path")
    op, value = data.draw(st.tuples(st.sampled_from(["replace", "delete", "extra"]), PLAIN), label="mutation")
    files[name] = mutate(files[name], path, op, value)
    folder = tmp_path_factory.mktemp("fuzz_cifar") / "cifar-10-batches-py"
    folder.mkdir()
    for file, content in files.items():
        (folder / file).write_bytes(pickle.dumps(content, protocol=2))
    try:
        CIFARDataModule(str(folder), img_size=8, batch_size=1, num_workers=0).setup()
    except UserError as err:
        assert "cifar-10-batches-py" in str(err)


@pytest.fixture(scope="module")
def wds_set(shard_sets) -> dict[str, Any]:
    return json.loads((shard_sets["wds"] / "info.json").read_text())


@fuzz(60)
@given(data=st.data())
def test_any_info_json_of_shards_is_read_or_refused_naming_it(shard_sets, wds_set, tmp_path_factory, data) -> None:
    import shutil

    from dynamixer.data import WebDataModule

    path = data.draw(st.sampled_from(paths_of(wds_set)), label="path")
    op, value = data.draw(MUTATION.filter(lambda m: not isinstance(m[1], torch.Tensor)), label="mutation")
    folder = tmp_path_factory.mktemp("fuzz_info") / "wds"
    shutil.copytree(shard_sets["wds"], folder)
    (folder / "info.json").write_text(json.dumps(mutate(wds_set, path, op, value)))
    try:
        dm = WebDataModule(str(folder), img_size=8, batch_size=2, num_workers=0)
        dm.identity()
        dm.setup()
    except UserError as err:
        assert str(folder) in str(err)


MEMBER_NAMES = st.one_of(
    st.sampled_from(["a.jpg", "a.cls", "a.json", "b.jpg", "b.cls", "a.__url__", "__key__.cls", "../x.jpg", "a"]),
    st.text(alphabet="ab._/-", max_size=8),
)
MEMBER_DATA = st.one_of(
    st.sampled_from([b"0", b"1", b"9", b"-1", b"99", b"x", b""]),
    st.binary(max_size=64),
    st.sampled_from(["photo"]),  # a real JPEG
)


@fuzz(60)
@given(members=st.lists(st.tuples(MEMBER_NAMES, MEMBER_DATA), max_size=6))
def test_any_tar_shard_is_read_or_refused_naming_it(shard_sets, tmp_path_factory, members) -> None:
    import io
    import tarfile

    from dynamixer.data.wds import _counted, _decode

    photo = next(shard_sets["folder"].glob("train/*/*.JPEG")).read_bytes()
    shard = tmp_path_factory.mktemp("fuzz_tar") / "train-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, content in members:
            content = photo if content == "photo" else content
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    count = len({n.rsplit(".", 1)[0] for n, _ in members if "." in n})
    try:
        for sample in _counted([str(shard)], {str(shard): count}):
            _decode(sample, lambda image: image, 3)
    except UserError as err:
        assert str(shard) in str(err)


@fuzz(40)
@given(data=st.data())
def test_any_parquet_schema_metadata_is_read_or_refused_naming_it(shard_sets, tmp_path_factory, data) -> None:
    import shutil

    import pyarrow.parquet as pq

    from dynamixer.data import HFDataModule

    folder = tmp_path_factory.mktemp("fuzz_parquet") / "hf"
    shutil.copytree(shard_sets["parquet"], folder)
    target = sorted(folder.glob("data/*.parquet"))[data.draw(st.integers(0, 1), label="file")]
    table = pq.read_table(target)
    features = json.loads(table.schema.metadata[b"huggingface"])
    path = data.draw(st.sampled_from(paths_of(features)), label="path")
    op, value = data.draw(MUTATION.filter(lambda m: not isinstance(m[1], torch.Tensor)), label="mutation")
    crafted = json.dumps(mutate(features, path, op, value)).encode()
    pq.write_table(table.replace_schema_metadata({b"huggingface": crafted}), target)
    try:
        HFDataModule(str(folder), img_size=8, batch_size=2, num_workers=0, cache_dir=str(folder / "cache")).setup()
    except UserError as err:
        assert str(folder) in str(err)


EVALUATION_OPTIONS = {
    "test.py": {
        "weights": st.sampled_from(["ema", "raw", "both", "", "null", "1"]),
        "data.batch_size": st.one_of(st.integers(-1, 3), st.sampled_from(["x", "null"])),
        "trainer.limit_val_batches": st.sampled_from(["1", "0", "-1", "0.5", "x"]),
    },
    "predict.py": {
        "weights": st.sampled_from(["ema", "raw", "x"]),
        "top_k": st.one_of(st.integers(-1, 12), st.sampled_from(["x", "null", "2.5"])),
        "batch_size": st.one_of(st.integers(-1, 3), st.sampled_from(["x", "null"])),
        "inputs": st.sampled_from(["{images}", "{images}/a.png", "{missing}", "{checkpoint}", "''"]),
    },
    "export.py": {
        "weights": st.sampled_from(["ema", "raw", "x"]),
        "onnx": st.sampled_from(["false", "x", "null", "1"]),
        "out_dir": st.sampled_from(["{out}", "{checkpoint}", "''", "{images}"]),
    },
}


@pytest.mark.parametrize("script", sorted(EVALUATION_OPTIONS))
@fuzz(4, shrink=False)
@given(ckpt=st.sampled_from(["{checkpoint}", "{missing}", "{images}", "''"]), data=st.data())
def test_evaluation_entry_points_options_run_or_end_in_one_message(
    digits_run, tmp_path_factory, entry, script, ckpt, data
) -> None:
    from PIL import Image

    cwd = tmp_path_factory.mktemp("fuzz_eval")
    (cwd / "images").mkdir()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(cwd / "images" / "a.png")
    places = {
        "checkpoint": digits_run / "checkpoints" / "last.ckpt",
        "missing": cwd / "gone.ckpt",
        "images": cwd / "images",
        "out": cwd / "exported",
    }
    options = EVALUATION_OPTIONS[script]
    required = {"predict.py": ["inputs"], "export.py": ["out_dir"]}.get(script, [])
    chosen = {
        key: data.draw(options[key] if key in required else st.one_of(st.none(), options[key]), label=key)
        for key in sorted(options)
    }
    values = {k: str(v).format(**places) for k, v in chosen.items() if v is not None}
    overrides = [f"ckpt_path={ckpt.format(**places)}", *(f"{k}={v}" for k, v in values.items())]
    code, _, err = entry(script, overrides, cwd)
    assert code in (0, 2), (script, overrides, err[-3000:])
    if code == 2:
        assert err.startswith("Error: ") and "Traceback" not in err, (script, overrides, err[-3000:])


@fuzz(25)
@given(path=st.text(alphabet="/ab'\"\\${}=,: []()\n", max_size=24) | st.none())
def test_the_checkpoint_rank_0_hands_its_ranks_reads_back_exactly(path: str | None) -> None:
    """`ckpt_path` as rank 0 gives it to the ranks it starts (`launch.override`), after the user's own."""
    from dynamixer.utils.launch import override

    assert compose_train_config(["ckpt_path=auto", override("ckpt_path", path)]).ckpt_path == path
