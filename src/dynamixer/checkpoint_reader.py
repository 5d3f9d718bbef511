"""The one reader of our training checkpoints: a file from anywhere, validated field by field before any of
it is used, by us or by Lightning.

- Bounded before it is expanded: the file's pickle (its structure) is at most `MAX_PICKLE_BYTES`, tensors are
  mapped from the file, not read, and a walk of at most `MAX_NODES` values and `MAX_DEPTH` levels proves the
  rest plain data (shared references cannot make it longer).
- Each field that our code or Lightning restores is checked against the schema below (pydantic, strict):
  types, ranges, and the structures of their writers: the loops' progress against the state Lightning itself
  writes, the random states against the generators' layouts, the schedule against timm's scheduler. Fields
  that nothing restores are dropped (an unknown callback's state with a warning).
- No path or URL from the file reaches Lightning: a checkpoint callback's paths are kept only where they name
  a file of the folder the checkpoint was read from, and cleared otherwise.
A file that fails is one `CheckpointError` naming the field and the fix. `check_weights_fit` checks the
weights against a model before they are loaded.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Annotated, Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.functional_validators import AfterValidator, PlainValidator

from dynamixer.data.identity import DIGEST
from dynamixer.errors import CheckpointError
from dynamixer.machinery.callbacks import CHECKPOINT_FORMAT
from dynamixer.models.weights import differences, listed, read_file

log = logging.getLogger(__name__)

MAX_PICKLE_BYTES = 64 * 2**20  # a dynamixer_l checkpoint's is about 0.1 MiB
MAX_NODES = 2_000_000
MAX_DEPTH = 32
_TENSOR_DTYPES = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
}  # fmt: skip


def _refuse(source: str | os.PathLike, problem: str) -> CheckpointError:
    return CheckpointError(
        f"refused to resume or evaluate {source}: {problem}. Only checkpoints written by dynamixer's train.py are "
        "read; copy the run's checkpoint again, or use its last.prev.ckpt"
    )


# --- bounds before anything is expanded -----------------------------------------------------------------
def _check_pickle_size(path: str | os.PathLike) -> None:
    """A zip checkpoint's pickle is bounded (legacy files are refused by torch's mmap reader)."""
    try:
        with zipfile.ZipFile(path) as archive:
            sizes = [i.file_size for i in archive.infolist() if i.filename.endswith("data.pkl")]
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip: torch's reader says why it cannot be read
    if any(size > MAX_PICKLE_BYTES for size in sizes):
        raise _refuse(path, f"its structure (data.pkl, {max(sizes)} bytes) is over {MAX_PICKLE_BYTES} bytes")


def _check_plain(value: Any, source: str | os.PathLike) -> None:
    """Walk `value` (depth first, each visit counted, shared references again each time): plain values,
    tensors, tuples, lists and maps only, within `MAX_NODES` visits and `MAX_DEPTH` levels."""
    stack, visits = [(value, "checkpoint", 0)], 0
    while stack:
        node, where, depth = stack.pop()
        visits += 1
        if visits > MAX_NODES or depth > MAX_DEPTH:
            raise _refuse(source, f"it is larger or deeper than any checkpoint ({where}: over the bounds)")
        if isinstance(node, dict):
            stack.extend((v, f"{where}.{k}", depth + 1) for k, v in node.items())
            stack.extend((k, f"{where} key", depth + 1) for k in node if not isinstance(k, (str, int)))
        elif isinstance(node, (list, tuple)):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(node))
        elif isinstance(node, torch.Tensor):
            if node.dtype not in _TENSOR_DTYPES or node.layout != torch.strided or node.is_meta:
                raise _refuse(source, f"{where} is a tensor of kind {node.dtype}/{node.layout}")
        elif node is not None and not isinstance(node, (bool, int, float, str, bytes)):
            raise _refuse(source, f"{where} is a {type(node).__name__}")


# --- the schema ------------------------------------------------------------------------------------------
Count = Annotated[StrictInt, Field(ge=0, le=2**62)]
Positive = Annotated[StrictInt, Field(ge=1, le=2**31)]
Number = StrictInt | StrictFloat
Text = Annotated[StrictStr, Field(max_length=4096)]
Name = Annotated[StrictStr, Field(max_length=1024)]
RunId = Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{32}$")]
Digest = Annotated[StrictStr, Field(pattern=DIGEST)]


def _tensor(dtype: torch.dtype | None = None, shape: tuple[int, ...] | None = None, scalar: bool = False) -> Any:
    def check(value: Any) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"a tensor is expected, not a {type(value).__name__}")
        if dtype is not None and value.dtype != dtype:
            raise ValueError(f"a {dtype} tensor is expected, not {value.dtype}")
        if shape is not None and tuple(value.shape) != shape:
            raise ValueError(f"a tensor of shape {shape} is expected, not {tuple(value.shape)}")
        if scalar and value.numel() != 1:
            raise ValueError(f"a single value is expected, not a tensor of shape {tuple(value.shape)}")
        return value

    return Annotated[Any, PlainValidator(check)]


Tensor = _tensor()
Scalar = _tensor(scalar=True)


class _Strict(BaseModel):
    """Strict types; keys the schema does not name are dropped."""

    model_config = ConfigDict(strict=True, extra="ignore", arbitrary_types_allowed=True)


def _words(value: torch.Tensor, bound: int) -> torch.Tensor:
    if value.numel() and (int(value.min()) < 0 or int(value.max()) >= bound):
        raise ValueError(f"values outside [0, {bound})")
    return value


class PythonRandom(_Strict):
    version: Literal[3]
    state: _tensor(torch.int64, (625,))  # the Mersenne Twister's 624 words and its position
    gauss_next: StrictFloat | None

    @model_validator(mode="after")
    def _layout(self) -> PythonRandom:
        _words(self.state[:624], 2**32)
        if not 0 <= int(self.state[624]) <= 624:
            raise ValueError(f"the position {int(self.state[624])} is outside [0, 624]")
        return self


class NumpyRandom(_Strict):
    kind: Literal["MT19937"]
    keys: Annotated[_tensor(torch.int64, (624,)), AfterValidator(lambda v: _words(v, 2**32))]
    pos: Annotated[StrictInt, Field(ge=0, le=624)]
    has_gauss: Literal[0, 1]
    cached_gaussian: StrictFloat


class RandomStates(_Strict):
    python: PythonRandom
    numpy: NumpyRandom
    torch: _tensor(torch.uint8, (5056,))
    cuda: Annotated[list[_tensor(torch.uint8)], Field(max_length=1024)] | None = None


class DataPosition(_Strict):
    """Where training stands in the data (`ClassificationDataModule.state_dict`)."""

    epoch: Count
    batches: Count
    batch_size: Positive
    world_size: Positive
    num_workers: Count | None = None  # data=wds: its shards are dealt to ranks x workers streams
    # `dynamixer.data.identity`; absent from checkpoints written before it (a resume refuses them, see
    # `ClassificationDataModule._check_resume`; evaluation reads them)
    data: Annotated[dict[Name, Digest], Field(max_length=1_000_000)] | None = None


class CheckpointCallbackState(_Strict):
    """`ModelCheckpoint.state_dict()`; its paths are checked against the folder read from (`_own_paths`)."""

    monitor: Text | None
    best_model_score: Scalar | None
    best_model_path: Text
    current_score: Scalar | None = None
    dirpath: Text | None = None
    best_k_models: Annotated[dict[Text, Scalar | Number], Field(max_length=10_000)] = {}
    kth_best_model_path: Text = ""
    kth_value: Scalar | Number | None = None
    last_model_path: Text = ""


class EarlyStoppingState(_Strict):
    wait_count: Count
    stopped_epoch: Count
    best_score: Scalar
    patience: Count


class MetricsHistoryState(_Strict):
    history: Annotated[list[dict[Text, Number]], Field(max_length=1_000_000)]


class ScalerState(_Strict):
    """torch's `GradScaler.state_dict()` (Lightning's `MixedPrecision` with fp16)."""

    scale: Annotated[Number, Field(gt=0)]
    growth_factor: Annotated[Number, Field(gt=1)]
    backoff_factor: Annotated[Number, Field(gt=0, lt=1)]
    growth_interval: Positive
    _growth_tracker: Count = 0


class OptimizerState(_Strict):
    state: Annotated[dict[Count, dict[Text, Tensor | Number | StrictBool | None]], Field(max_length=1_000_000)]
    param_groups: Annotated[list[dict[Text, Any]], Field(min_length=1, max_length=1024)]

    @model_validator(mode="after")
    def _groups(self) -> OptimizerState:
        for i, group in enumerate(self.param_groups):
            params = group.get("params")
            if not isinstance(params, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in params):
                raise ValueError(f"param_groups[{i}].params is not a list of parameter indexes")
            for key, value in group.items():
                if isinstance(value, torch.Tensor) and value.numel() != 1:
                    raise ValueError(f"param_groups[{i}].{key} is a tensor of shape {tuple(value.shape)}")
        return self


_CALLBACK_STATES: dict[str, type[_Strict]] = {
    "ModelCheckpoint": CheckpointCallbackState,
    "ResumableCheckpoint": CheckpointCallbackState,
    "EarlyStopping": EarlyStoppingState,
    "MetricsHistory": MetricsHistoryState,
}
_DATA_POSITION = re.compile(r"[A-Za-z_][A-Za-z0-9_]*DataModule")
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)\S{0,64}")


def _loops(state: Any, template: Any, where: str) -> Any:
    """`state` checked against the loops' state of a fresh trainer of this Lightning (`template`): the same keys
    (extra ones dropped), counts where it has counts (0 or more), flags where it has flags."""
    if isinstance(template, dict):
        if not isinstance(state, dict):
            raise ValueError(f"{where} is a {type(state).__name__}, not a map")
        missing = [k for k in template if k not in state]
        if missing:
            raise ValueError(f"{where} has no {missing[0]!r}")
        return {k: _loops(state[k], v, f"{where}.{k}") for k, v in template.items()}
    if isinstance(template, bool):
        if not isinstance(state, bool):
            raise ValueError(f"{where}={state!r} is not true or false")
    elif isinstance(template, int):
        if not isinstance(state, int) or isinstance(state, bool) or not 0 <= state <= 2**62:
            raise ValueError(f"{where}={state!r} is not a count (0 or more)")
    return state


def _own_paths(state: CheckpointCallbackState, folder: Path) -> dict[str, Any]:
    """A checkpoint callback's state with each path kept only where it names a `.ckpt` file of `folder` (the
    folder the checkpoint was read from), as that file; the others cleared (a URL, another folder)."""

    def own(path: str) -> str:
        if not path or "://" in path or "::" in path or not path.endswith(".ckpt"):
            return ""
        try:
            inside = Path(path).parent.resolve() == folder
        except (OSError, RuntimeError, ValueError):
            inside = False
        return str(folder / Path(path).name) if inside else ""

    values = state.model_dump()
    ours = own(str(Path(state.dirpath or "") / "x.ckpt")) != ""
    values["dirpath"] = str(folder) if ours else ""
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        values[key] = own(values[key]) if ours else ""
    values["best_k_models"] = {own(k): v for k, v in state.best_k_models.items() if ours and own(k)}
    top_k = values["best_k_models"]
    if top_k and not (values["kth_best_model_path"] in top_k and values["best_model_path"] in top_k):
        # Lightning pops the k-th of its top k and compares scores: a record that names other files is cleared
        values.update(best_k_models={}, kth_best_model_path="", best_model_path="")
    if not values["best_model_path"]:
        values["best_model_score"] = None
    if values["kth_value"] is None:
        del values["kth_value"]
    return values


def _validated(model: Any, value: Any, field: str) -> Any:
    """`value` validated as `model` (a pydantic model or type), or a ValueError naming `field`."""
    try:
        return TypeAdapter(model).validate_python(value)
    except ValidationError as err:
        first = err.errors()[0]
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
        raise ValueError(f"{field}{loc}: {first['msg']}") from None


def validate(raw: Any, source: str | os.PathLike) -> dict[str, Any]:
    """The fields of a loaded checkpoint that are restored, validated (see the module's docstring)."""
    from dynamixer.machinery.lightning_internals import loops_state_template

    _check_plain(raw, source)
    if not isinstance(raw, dict):
        raise _refuse(source, "it is not a map of fields")
    version = raw.get("dynamixer_format")
    if version != CHECKPOINT_FORMAT:
        found = "no format version (a checkpoint of another program, or of dynamixer before format 1)"
        raise CheckpointError(
            f"{source} has {found if version is None else f'format {version!r}'}, this dynamixer reads format "
            f"{CHECKPOINT_FORMAT}: use a dynamixer version that wrote it, or, for weights alone, "
            "model.pretrained_file=<file>"
        )
    folder = Path(source).parent.resolve()
    try:
        lightning = raw.get("pytorch-lightning_version")
        match = _VERSION.fullmatch(lightning) if isinstance(lightning, str) else None
        if match is None or int(match[1]) < 2:
            raise ValueError(f"pytorch-lightning_version={lightning!r} is not a Lightning 2 version")
        checked: dict[str, Any] = {
            "dynamixer_format": CHECKPOINT_FORMAT,
            "pytorch-lightning_version": lightning,
            "epoch": _validated(Count, raw.get("epoch"), "epoch"),
            "global_step": _validated(Count, raw.get("global_step"), "global_step"),
            "state_dict": _validated(dict[Name, Tensor], raw.get("state_dict"), "state_dict"),
            "hyper_parameters": _validated(dict[StrictStr, Any], raw.get("hyper_parameters", {}), "hyper_parameters"),
            "provenance": _validated(dict[StrictStr, Any], raw.get("provenance", {}), "provenance"),
            "loops": _loops(raw.get("loops"), loops_state_template(), "loops"),
            "optimizer_states": [
                s.model_dump()
                for s in _validated(list[OptimizerState], raw.get("optimizer_states", []), "optimizer_states")
            ],
            # not restored: a timm schedule is a function of its settings (the run config, compared at a resume)
            # and the step, and its load_state_dict would set any attribute the file names
            "lr_schedulers": [],
            "rng_states_per_rank": [
                s.model_dump(exclude={"cuda"} if s.cuda is None else set())
                for s in _validated(
                    Annotated[list[RandomStates], Field(min_length=1, max_length=65536)],
                    raw.get("rng_states_per_rank"),
                    "rng_states_per_rank",
                )
            ],
            "callbacks": _callbacks(raw.get("callbacks", {}), folder),
        }
        if raw.get("run_id") is not None:  # the run that saved it (dynamixer.machinery.run_folder)
            checked["run_id"] = _validated(RunId, raw["run_id"], "run_id")
        if isinstance(raw.get("hparams_name"), str):
            checked["hparams_name"] = raw["hparams_name"][:256]
        for key, value in raw.items():
            if isinstance(key, str) and _DATA_POSITION.fullmatch(key):
                checked[key] = _validated(DataPosition, value, key).model_dump(exclude_none=True) if value else {}
        if "MixedPrecision" in raw:
            checked["MixedPrecision"] = _validated(ScalerState, raw["MixedPrecision"], "MixedPrecision").model_dump()
    except ValueError as err:
        raise _refuse(source, str(err)) from None
    return checked


def _callbacks(states: Any, folder: Path) -> dict[str, Any]:
    if not isinstance(states, dict):
        raise ValueError("callbacks is not a map of callback states")
    kept = {}
    for key, state in states.items():
        name = str(key).split("{", 1)[0]
        schema = _CALLBACK_STATES.get(name)
        if schema is None:
            log.warning("the checkpoint's state of the callback %s is not restored: no callback of dynamixer's", name)
            continue
        validated = _validated(schema, state, f"callbacks.{name}")
        kept[key] = _own_paths(validated, folder) if schema is CheckpointCallbackState else validated.model_dump()
    return kept


def read_checkpoint(path: str | os.PathLike, mmap: bool = True) -> dict[str, Any]:
    """One of our training checkpoints, read as data only and validated (see the module's docstring)."""
    _check_pickle_size(path)
    return validate(read_file(path, mmap=mmap), path)


def check_weights_fit(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """The weights `state` are those of a model whose own state dict is `expected` (names and shapes; e.g. a
    model built on the meta device, before anything is allocated); else one `CheckpointError`."""
    found = differences(state, expected)
    if any(found):
        raise CheckpointError(
            f"the weights in {source} are not those of the model its config describes: {listed(*found)}. The file "
            "was changed after train.py wrote it: use the run's own copy"
        )


class RestoredStateCheck(Callback):
    """Before Lightning restores the optimizer state of `checkpoint` (read from `source`): it is the state of
    this run's optimizers, which its validated config built (`on_fit_start` comes after they are built and
    before their state is loaded): the same groups and parameters, each state tensor of its parameter's shape,
    the same settings but the lr, which the schedule sets at every step (finite and >= 0)."""

    def __init__(self, source: str, checkpoint: dict[str, Any]) -> None:
        self.source, self.checkpoint = source, checkpoint

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        saved, self.checkpoint = self.checkpoint["optimizer_states"], None
        if len(saved) != len(trainer.optimizers):
            raise _refuse(self.source, f"it has {len(saved)} optimizer states, this run {len(trainer.optimizers)}")
        for i, (state, optimizer) in enumerate(zip(saved, trainer.optimizers)):
            self._check(f"optimizer_states[{i}]", state, optimizer)

    def _check(self, where: str, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
        live = optimizer.state_dict()["param_groups"]
        if len(state["param_groups"]) != len(live):
            raise _refuse(
                self.source, f"{where} has {len(state['param_groups'])} parameter groups, this run {len(live)}"
            )
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for g, (group, ours) in enumerate(zip(state["param_groups"], live)):
            for key in sorted(group.keys() | ours.keys()):
                old, new = group.get(key), ours.get(key)
                if key == "lr":
                    ok = isinstance(old, (int, float)) and not isinstance(old, bool) and 0 <= old < float("inf")
                else:  # typed: an int is not a float, a tuple of betas is compared as a list
                    ok = typed_text(old) == typed_text(new)
                if not ok:
                    raise _refuse(
                        self.source, f"{where}.param_groups[{g}].{key}={old!r}, where this run's optimizer has {new!r}"
                    )
        for index, values in state["state"].items():
            if index >= len(params):
                raise _refuse(self.source, f"{where}.state[{index}] is of no parameter ({len(params)} in all)")
            for key, value in values.items():
                shape = tuple(params[index].shape) if isinstance(value, torch.Tensor) and value.ndim else ()
                if isinstance(value, torch.Tensor) and tuple(value.shape) not in (shape, ()):
                    raise _refuse(
                        self.source,
                        f"{where}.state[{index}].{key} has the shape {tuple(value.shape)}, its parameter {shape}",
                    )


def typed_text(value: Any) -> str:
    """`value` as a text where 1 and 1.0 differ, and a tuple equals a list."""
    return json.dumps(value, sort_keys=True, default=repr)
