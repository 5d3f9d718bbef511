"""predict.py end to end: a tiny digits checkpoint, a few validation digits saved as PNG files, and
`predict.py ckpt_path=... inputs=<folder or file>` run as a script (printed lines, predictions.json, the same
top-1 as the model itself, and clear errors for missing paths)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from dynamixer.data import DigitsDataModule
from dynamixer.run import load_model
from helpers import QUIET_TRAIN, run_dir, run_script

pytestmark = pytest.mark.slow  # trains models or runs the scripts

NUM_IMAGES = 6
TOP_K = 5  # predict.yaml's default
CLASS_NAMES = [str(d) for d in range(10)]
# `<file>: <class> <prob>, <class> <prob>, ...` (probabilities printed with 3 decimals)
LINE = re.compile(r"^(?P<file>.+\.png): (?P<top>.+)$")
PAIR = re.compile(r"^(?P<cls>\S+) (?P<prob>\d+\.\d{3})$")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("predict")


@pytest.fixture(scope="module")
def checkpoint(workdir) -> Path:
    """A dynamixer_tiny checkpoint trained for a few steps (2 short epochs) on the digits."""
    run_script(
        "train.py",
        [
            *QUIET_TRAIN,
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=8",
            "trainer.limit_val_batches=1",
            "scheduler.warmup_epochs=0",
            "run_name=tiny",
        ],
        cwd=workdir,
    )
    results = json.loads((run_dir(workdir, "tiny") / "results.json").read_text())
    ckpt = Path(results["last_checkpoint"])
    assert ckpt.is_file()
    return ckpt


@pytest.fixture(scope="module")
def digits(workdir) -> tuple[Path, list[Path], list[int]]:
    """The first validation digits as PNG files (32x32 RGB, twice the model's size: predict.py resizes them):
    folder, files, labels."""
    datamodule = DigitsDataModule(img_size=32)
    datamodule.setup()
    folder = workdir / "digits"
    folder.mkdir()
    files, labels = [], []
    for i in range(NUM_IMAGES):
        image, label = datamodule.val_set.images[i], datamodule.val_set.labels[i]
        assert image.size == (32, 32) and image.mode == "RGB"
        path = folder / f"val{i:02d}_label{label}.png"
        image.save(path)
        files.append(path)
        labels.append(label)
    (folder / "notes.txt").write_text("not an image: predict.py skips it\n")
    return folder, files, labels


def predict(workdir: Path, ckpt: Path | str, inputs: Path | str, run_name: str, check: bool = True):
    return run_script(
        "predict.py",
        [f"ckpt_path={ckpt}", f"inputs={inputs}", f"run_name={run_name}"],
        cwd=workdir,
        check=check,
        timeout=300,
    )


def printed_predictions(stdout: str) -> list[tuple[str, list[tuple[str, float]]]]:
    """The prediction lines of predict.py's output: (file, [(class, prob), ...])."""
    found = []
    for line in stdout.splitlines():
        match = LINE.match(line.strip())
        if not match:
            continue
        pairs = [PAIR.match(p.strip()) for p in match["top"].split(",")]
        assert all(pairs), f"malformed prediction line: {line!r}"
        found.append((match["file"], [(p["cls"], float(p["prob"])) for p in pairs]))
    return found


def check_top(top: list[tuple[str, float]], rounding: float = 0.0) -> None:
    """TOP_K distinct digit classes, probabilities in [0, 1], sorted (descending), summing to at most 1."""
    classes, probs = [c for c, _ in top], [p for _, p in top]
    assert len(top) == TOP_K
    assert len(set(classes)) == TOP_K and set(classes) <= set(CLASS_NAMES)
    assert all(0.0 <= p <= 1.0 for p in probs)
    assert probs == sorted(probs, reverse=True)
    assert sum(probs) <= 1.0 + rounding * TOP_K


def read_predictions(workdir: Path, run_name: str) -> dict:
    path = run_dir(workdir, run_name, task="predict") / "predictions.json"
    assert path.is_file(), f"no predictions.json in {path.parent}"
    return json.loads(path.read_text())


def reference(ckpt: Path, files: list[Path]) -> torch.Tensor:
    """Softmax of the checkpoint's EMA model on the files, transformed as the data module's validation images."""
    model, stored = load_model(str(ckpt), "ema")
    info = stored.data_info
    assert info["class_names"] == CLASS_NAMES
    transform = DigitsDataModule(img_size=info["img_size"]).eval_transform()
    images = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        return model(images).softmax(-1)


def test_predict_a_folder_prints_and_writes_the_top5_of_every_image(workdir, checkpoint, digits):
    folder, files, _ = digits
    proc = predict(workdir, checkpoint, folder, "folder")

    printed = printed_predictions(proc.stdout)
    assert [Path(f).name for f, _ in printed] == [f.name for f in files], proc.stdout  # one line per image, sorted
    for _, top in printed:
        check_top(top, rounding=5e-4)

    written = read_predictions(workdir, "folder")
    assert written["checkpoint"] == str(checkpoint) and written["weights"] == "ema"
    predictions = written["predictions"]
    assert [Path(p["file"]).name for p in predictions] == [f.name for f in files]
    for p, (_, top) in zip(predictions, printed):
        check_top([(t["class"], t["prob"]) for t in p["top"]])
        assert all(t["class"] == CLASS_NAMES[t["index"]] for t in p["top"])  # class names from the data module
        assert [t["class"] for t in p["top"]] == [c for c, _ in top]
        assert [t["prob"] for t in p["top"]] == pytest.approx([q for _, q in top], abs=5.1e-4)

    # the same top-1 (and probabilities) as the checkpoint's EMA model on the transformed images
    probs = reference(checkpoint, files)
    for p, row in zip(predictions, probs):
        top1 = p["top"][0]
        assert top1["index"] == int(row.argmax()) or row.max() - row[top1["index"]] < 1e-6  # (a tie at most)
        assert [t["prob"] for t in p["top"]] == pytest.approx(
            row.sort(descending=True).values[:TOP_K].tolist(), abs=1e-5
        )


def test_predict_one_file(workdir, checkpoint, digits):
    _, files, _ = digits
    proc = predict(workdir, checkpoint, files[2], "one_file")

    printed = printed_predictions(proc.stdout)
    assert len(printed) == 1 and Path(printed[0][0]) == files[2], proc.stdout
    check_top(printed[0][1], rounding=5e-4)

    (prediction,) = read_predictions(workdir, "one_file")["predictions"]
    assert Path(prediction["file"]) == files[2]
    top = prediction["top"]
    check_top([(t["class"], t["prob"]) for t in top])
    probs = reference(checkpoint, [files[2]])[0]
    assert top[0]["index"] == int(probs.argmax()) or probs.max() - probs[top[0]["index"]] < 1e-6
    assert [t["prob"] for t in top] == pytest.approx(probs.sort(descending=True).values[:TOP_K].tolist(), abs=1e-5)


def error_lines(proc, path: Path) -> list[str]:
    """Lines of the output naming `path`, other than Hydra's echo of the command's overrides."""
    output = proc.stdout + proc.stderr
    return [line for line in output.splitlines() if str(path) in line and "overrides" not in line]


def test_predict_a_missing_inputs_path_fails_naming_it(workdir, checkpoint):
    missing = workdir / "no_such_folder"
    proc = predict(workdir, checkpoint, missing, "missing_inputs", check=False)
    assert proc.returncode != 0
    assert error_lines(proc, missing), f"no message names {missing}:\n{proc.stdout}\n{proc.stderr}"
    assert not printed_predictions(proc.stdout)


def test_predict_a_missing_checkpoint_fails_naming_it(workdir, digits):
    folder, _, _ = digits
    missing = workdir / "no_such.ckpt"
    proc = predict(workdir, missing, folder, "missing_ckpt", check=False)
    assert proc.returncode != 0
    assert error_lines(proc, missing), f"no message names {missing}:\n{proc.stdout}\n{proc.stderr}"
    assert not printed_predictions(proc.stdout)


def test_predict_a_folder_with_a_corrupt_file_classifies_the_others_and_lists_it(workdir, checkpoint, digits):
    folder, files, _ = digits
    mixed = workdir / "mixed"
    mixed.mkdir()
    for f in files:
        (mixed / f.name).write_bytes(f.read_bytes())
    broken = mixed / files[0].name
    broken.write_bytes(broken.read_bytes()[:40])  # cut: the header only
    proc = predict(workdir, checkpoint, mixed, "mixed")
    assert {Path(p[0]).name for p in printed_predictions(proc.stdout)} == {f.name for f in files[1:]}
    written = read_predictions(workdir, "mixed")
    assert [Path(p["file"]).name for p in written["predictions"]] == [f.name for f in files[1:]]
    (bad,) = written["unreadable"]
    assert Path(bad["file"]) == broken and "cannot read image" in bad["error"]
    assert str(broken) in proc.stderr and "skip_corrupt" not in proc.stderr  # predict.py has no such option
