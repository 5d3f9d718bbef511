"""The Hydra config groups compose, instantiate, and hold the paper's recipe value by value."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from dynamixer.data import ImageFolderDataModule
from dynamixer.errors import HardwareError
from dynamixer.utils.launch import check_devices, cpu_bf16_warning
from helpers import CONF_DIR, compose_job_config, compose_train_config, write_image_tree

CONF = CONF_DIR
GROUPS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for group in ("model", "data", "optimizer", "scheduler", "trainer", "hardware", "logger", "callbacks", "debug")
    + ("sweep", "experiment", "module", "module/mixup")
}


def compose_train(*overrides: str) -> DictConfig:
    return compose_train_config(overrides)


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group: str, option: str, tmp_path: Path) -> None:
    """Every option of every group is chosen, and the whole job config it gives resolves (no dangling
    interpolation anywhere, the hydra resolvers of a job included)."""
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_job_config([f"{group}={option}"], tmp_path)
    assert HydraConfig.get().runtime.choices[group] == option
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["model"]["model_name"].startswith("dynamixer_")


@pytest.mark.parametrize("data", ["imagenet", "hf", "wds"])
def test_the_imagenet_experiments_take_each_imagenet_source_with_the_recipe(data: str, tmp_path: Path) -> None:
    cfg = OmegaConf.to_container(
        compose_job_config(["experiment=dynamixer_s_imagenet", f"data={data}"], tmp_path), resolve=True
    )["data"]
    target = {"imagenet": "ImageFolderDataModule", "hf": "HFDataModule", "wds": "WebDataModule"}[data]
    assert cfg["_target_"] == f"dynamixer.data.{target}"
    assert (cfg["batch_size"], cfg["crop_pct"], cfg["img_size"]) == (256, 0.9, 224)  # the experiment's
    assert cfg["train_aug"]["auto_augment"] == "rand-m9-mstd0.5-inc1" and cfg["train_aug"]["re_prob"] == 0.25


@pytest.mark.parametrize("option", GROUPS["model"])
def test_every_model_config_exposes_the_ablation_axes(option: str, tmp_path: Path) -> None:
    model = compose_job_config([f"model={option}"], tmp_path).model
    assert {"segments", "reduced_dim", "img_size", "drop_path_rate"} <= set(model)
    assert model.model_name == option


@pytest.mark.parametrize("option", [o for o in GROUPS["data"] if o != "imagenet_loader"])  # not the base
def test_data_configs_state_the_same_defaults_as_their_classes(option: str) -> None:
    """A data module built from Python (no config) is the one its conf/data file describes: every value the
    file states (not an interpolation) equals the class's own default, its train_aug included."""
    import inspect

    from hydra.utils import get_class

    from dynamixer.data.transforms import build_transform

    stated = OmegaConf.to_container(compose_train_config([f"data={option}"]).data)  # with its base's keys
    cls = get_class(stated.pop("_target_"))
    defaults = {
        p.name: p.default
        for klass in reversed(cls.__mro__)
        if "__init__" in vars(klass)
        for p in inspect.signature(klass.__init__).parameters.values()
        if p.default is not inspect.Parameter.empty
    }
    defaults.update(cls.defaults)
    aug = inspect.signature(build_transform).parameters.values()
    default_aug = {p.name: p.default for p in aug if p.kind == p.KEYWORD_ONLY and p.default is not p.empty}
    default_aug.update(cls.default_train_aug)

    def plain(value):  # YAML lists against tuples
        return list(value) if isinstance(value, tuple) else value

    differ = [
        (key, value, defaults.get(key, "no default"))
        for key, value in stated.items()
        if key != "train_aug"
        and not (isinstance(value, str) and "${" in value)
        and (key not in defaults or value != plain(defaults[key]))
    ]
    differ += [
        (f"train_aug.{key}", value, default_aug.get(key, "no default"))
        for key, value in (stated.get("train_aug") or {}).items()
        if key not in default_aug or value != plain(default_aug[key])
    ]
    assert differ == [], f"conf/data/{option}.yaml and {cls.__name__}'s defaults disagree: {differ}"


def test_default_run_instantiates_the_tiny_model_on_digits() -> None:
    cfg = compose_train()
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model, num_classes=datamodule.num_classes, _convert_="all")
    assert datamodule.num_classes == 10 and datamodule.img_size == cfg.model.img_size == 16
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    scheduler = instantiate(cfg.scheduler)(optimizer, steps_per_epoch=10, max_epochs=cfg.trainer.max_epochs)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.scheduler.warmup_lr)
    assert scheduler.t_initial == 10 * cfg.trainer.max_epochs


@pytest.mark.parametrize(
    "override,value", [("model.segments=2", [2, 2, 2, 2]), ("model.segments=[2,4,4,8]", [2, 4, 4, 8])]
)
def test_segments_override_reaches_every_op(override: str, value: list[int]) -> None:
    cfg = compose_train(override, "model.reduced_dim=3")
    model = instantiate(cfg.model, num_classes=10, _convert_="all")
    for stage, segments in zip(model.stages, value):
        for block in stage.blocks:
            for op in (block.token_mixer.mix_h, block.token_mixer.mix_w):
                assert (op.segments, op.reduced_dim) == (segments, 3)


def test_eight_gpus_compose_and_fail_clearly_without_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_train("model=dynamixer_s", "trainer.devices=8")
    assert cfg.trainer.devices == 8 and cfg.model.model_name == "dynamixer_s" and cfg.data.img_size == 224
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(HardwareError, match=r"8 GPU\(s\), but this machine has 0.*hardware=cpu trainer.devices=8"):
        check_devices(cfg.trainer)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    check_devices(cfg.trainer)  # an 8-GPU machine runs it as written
    check_devices(compose_train("hardware=cpu", "trainer.devices=2").trainer)  # CPU DDP is asked for explicitly


@pytest.mark.parametrize(
    ("capability", "avx512_bf16", "amx", "precision", "accelerator", "warned"),
    [
        ("AVX2", False, False, "bf16-mixed", "cpu", True),  # this project's Zen 3 machine: every mm emulated
        ("AVX512", False, False, "bf16-true", "auto", True),
        ("AVX512", True, False, "bf16-mixed", "cpu", False),
        ("AVX512", False, True, "bf16-mixed", "cpu", False),
        ("AVX2", False, False, "32", "cpu", False),
        ("AVX2", False, False, "bf16-mixed", "gpu", False),
        ("SVE256", False, False, "bf16-mixed", "cpu", False),  # ARM: not judged
    ],
)
def test_bf16_on_a_cpu_without_native_bf16_is_said_once_at_the_start(
    capability, avx512_bf16, amx, precision, accelerator, warned, monkeypatch, tmp_path, entry
) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = cpu_bf16_warning({"precision": precision, "accelerator": accelerator})
    assert (message is not None) == warned
    if warned:
        assert f"trainer.precision={precision}" in message and capability in message
        assert "trainer.precision=32" in message
    if warned and accelerator == "cpu":  # through train.py: said once, and the run trains
        args = ["debug=fast", "hardware=cpu", f"trainer.precision={precision}", "trainer.max_epochs=1"]
        code, out, err = entry("train.py", [*args, "callbacks.progress_bar=null"], tmp_path)
        assert code == 0, err[-3000:]
        assert (out + err).count("emulates every bf16 matrix product") == 1, (out + err)[-3000:]


# docs/paper.md section 4, per variant: batch per GPU, drop path, crop pct.
PAPER = {"s": (256, 0.1, 0.9), "m": (128, 0.1, 0.9), "l": (64, 0.3, 0.875)}


@pytest.mark.parametrize("variant", sorted(PAPER))
def test_imagenet_experiments_hold_the_paper_recipe(variant: str, tmp_path: Path) -> None:
    cfg = compose_train(f"experiment=dynamixer_{variant}_imagenet")
    batch, drop_path, crop_pct = PAPER[variant]
    expected = {
        "model.model_name": f"dynamixer_{variant}",
        "model.img_size": 224,
        "model.drop_path_rate": drop_path,
        "data._target_": "dynamixer.data.ImageFolderDataModule",
        "data.img_size": 224,
        "data.batch_size": batch,
        "data.crop_pct": crop_pct,
        "data.interpolation": "bicubic",
        "data.train_aug.auto_augment": "rand-m9-mstd0.5-inc1",
        "data.train_aug.color_jitter": 0.4,
        "data.train_aug.re_prob": 0.25,
        "data.train_aug.re_mode": "pixel",
        "data.train_aug.train_interpolation": "random",
        "data.train_aug.hflip": 0.5,
        "trainer.accelerator": "gpu",
        "trainer.devices": 8,
        "trainer.strategy": "ddp",
        "trainer.max_epochs": 310,
        "trainer.precision": "16-mixed",
        "trainer.gradient_clip_val": None,
        "optimizer._target_": "torch.optim.AdamW",
        "optimizer.lr": 2e-3,
        "optimizer.weight_decay": 0.05,
        "scheduler.warmup_epochs": 20,
        "scheduler.cooldown_epochs": 10,
        "scheduler.warmup_lr": 1e-6,
        "scheduler.min_lr": 1e-5,
        "module.label_smoothing": 0.1,
        "module.ema_decay": 0.99996,
        "module.mixup.mixup_alpha": 0.8,
        "module.mixup.cutmix_alpha": 1.0,
        "module.mixup.prob": 1.0,
        "module.mixup.switch_prob": 0.5,
        "module.mixup.mode": "batch",
        "module.mixup.label_smoothing": 0.1,
        "callbacks.model_checkpoint.monitor": "val/ema_acc1",
        "seed": 42,
    }
    actual = {key: OmegaConf.select(cfg, key) for key in expected}
    assert actual == expected
    assert cfg.data.batch_size * cfg.trainer.devices == {"s": 2048, "m": 1024, "l": 512}[variant]
    # mean/std are left to the data module, whose defaults are ImageNet's
    assert "mean" not in cfg.data and "std" not in cfg.data
    datamodule = ImageFolderDataModule(data_dir=str(write_image_tree(tmp_path)))
    assert (datamodule.mean, datamodule.std) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


# docs/paper.md section 3: segments and reduced dims per stage, parameters with 1000 classes
ARCHITECTURE = {
    "s": ([8, 16, 16, 16], [2, 2, 2, 2], 26_265_960),
    "m": ([8, 8, 16, 16], [2, 2, 2, 2], 57_128_264),
    "l": ([8, 16, 16, 16], [8, 8, 8, 8], 97_818_088),
}


@pytest.mark.parametrize("variant", sorted(ARCHITECTURE))
def test_model_configs_build_the_paper_variants(variant: str) -> None:
    """The model configs leave the architecture to the registry; what they build is the paper's."""
    cfg = compose_train(f"model=dynamixer_{variant}")
    model = instantiate(cfg.model, num_classes=1000, _convert_="all")
    segments, reduced_dim, params = ARCHITECTURE[variant]
    ops = [stage.blocks[0].token_mixer.mix_w for stage in model.stages]
    assert [op.segments for op in ops] == segments and [op.reduced_dim for op in ops] == reduced_dim
    assert sum(p.numel() for p in model.parameters()) == params


def test_precision_and_compile_options_reach_the_trainer_and_module(tmp_path: Path) -> None:
    from dynamixer.run import build

    cfg = compose_train_config(["trainer.precision=bf16-mixed", "module.compile=true"], output_dir=tmp_path)
    _, module = build(cfg)
    assert module.hparams.compile is True and module.model._compiled_call_impl is None  # compiled in configure_model
    trainer = instantiate(cfg.trainer, logger=False, accelerator="cpu")
    assert type(trainer.precision_plugin).__name__ == "MixedPrecision" and trainer.precision == "bf16-mixed"
    module.configure_model()
    assert module.model._compiled_call_impl is not None


def test_last_checkpoint_by_steps_or_time_reaches_the_callback(tmp_path: Path) -> None:
    def last_checkpoint(*overrides: str):
        return instantiate(compose_train_config(overrides, output_dir=tmp_path).callbacks.last_checkpoint)

    by_steps = last_checkpoint("callbacks.last_checkpoint.every_n_train_steps=10")
    assert (by_steps._every_n_train_steps, by_steps._every_n_epochs) == (10, 0)
    assert last_checkpoint()._every_n_epochs == 1  # default: every epoch
    imagenet = last_checkpoint("experiment=dynamixer_s_imagenet")
    assert imagenet._train_time_interval == timedelta(minutes=30) and imagenet._every_n_epochs == 0


@pytest.mark.parametrize(
    "preset,axis,values", [("segments", "model.segments", "1,2,4,8"), ("mixing", "model.mixing", "dynamic,static")]
)
def test_ablation_presets_hold_their_sweep_on_imagenet_and_on_digits(preset: str, axis: str, values: str) -> None:
    """`experiment=ablation_<preset>`: the S recipe on the stated 100-epoch schedule; `sweep=<preset>`: the same
    grid on the default digits run. 3 seeds each, as Hydra sweeper params."""
    imagenet = compose_train_config([f"experiment=ablation_{preset}"], with_hydra=True)
    digits = compose_train_config([f"sweep={preset}"], with_hydra=True)
    for cfg in (imagenet, digits):
        assert dict(cfg.hydra.sweeper.params) == {axis: values, "seed": "0,1,2"}
    assert imagenet.model.model_name == "dynamixer_s" and imagenet.data._target_.endswith("ImageFolderDataModule")
    assert imagenet.trainer.max_epochs == 100 and imagenet.scheduler.warmup_epochs == 5
    assert imagenet.scheduler.cooldown_epochs == 0 and imagenet.task_name == f"ablation_{preset}"
    full = compose_train("experiment=dynamixer_s_imagenet")
    assert imagenet.optimizer == full.optimizer and imagenet.data.train_aug == full.data.train_aug  # the recipe
    assert digits.model.model_name == "dynamixer_tiny" and digits.data._target_.endswith("DigitsDataModule")


def test_parallel_launcher_and_optuna_search_compose() -> None:
    cfg = compose_train_config(["hydra/launcher=parallel", "sweep=search"], with_hydra=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
    assert set(cfg.hydra.sweeper.params) == {"optimizer.lr", "optimizer.weight_decay", "model.drop_path_rate"}
    assert cfg.hydra.sweeper.max_failure_rate == 1.0  # a failed trial does not end the search


RECIPE_KEYS = [
    "model.model_name", "model.img_size", "model.drop_path_rate", "data.batch_size", "trainer.devices",
    "trainer.num_nodes", "trainer.precision", "optimizer._target_", "optimizer.lr", "optimizer.weight_decay",
    "optimizer.betas", "scheduler.warmup_epochs", "scheduler.warmup_lr", "trainer.max_epochs",
    "scheduler.cooldown_epochs", "scheduler.min_lr", "module.label_smoothing", "module.mixup.mixup_alpha",
    "module.mixup.cutmix_alpha", "module.mixup.prob", "module.mixup.switch_prob", "module.ema_decay",
    "data.crop_pct", "data.interpolation", "data.train_aug.scale", "data.train_aug.hflip",
    "data.train_aug.auto_augment", "data.train_aug.re_prob", "data.train_aug.train_interpolation", "seed",
]  # fmt: skip
RECIPES = ["dynamixer_s_imagenet", "dynamixer_m_imagenet", "dynamixer_l_imagenet", "dynamixer_s_imagenet_short"]


def recipe_table(tmp_path: Path) -> str:
    """docs/recipes.md's table of the ImageNet experiments: each key's value as the composed job config has it."""
    configs = [compose_job_config([f"experiment={name}"], tmp_path / name) for name in RECIPES]
    lines = ["| key | " + " | ".join(f"`{name}`" for name in RECIPES) + " |", "|---" * (len(RECIPES) + 1) + "|"]
    for key in RECIPE_KEYS:
        values = [
            OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(c, key)}), resolve=True)["v"]
            for c in configs
        ]
        lines.append(f"| `{key}` | " + " | ".join(f"`{v}`" for v in values) + " |")
    return "\n".join(lines)


def test_the_recipes_page_shows_each_imagenet_recipe_as_composed(tmp_path: Path) -> None:
    """The experiment files override only what differs: docs/recipes.md's table shows each recipe whole, and
    is what `--cfg job` would print."""
    table = recipe_table(tmp_path)
    page = (CONF.parent / "docs" / "recipes.md").read_text()
    assert table in page, f"docs/recipes.md's recipe table is not the composed recipe; it should read:\n{table}"
