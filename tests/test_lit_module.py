"""Tests for the LightningModule and the schedule: mixup/cutmix and losses, EMA, lr schedule, weight decay.

All in-process on the CPU, on a tiny CNN (or dynamixer_tiny where the real parameter names matter).
"""

from __future__ import annotations

import copy
import math
from functools import partial

import lightning as L
import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from hydra.utils import instantiate
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DataLoader, TensorDataset

import dynamixer  # noqa: F401  (registers the models with timm)
from dynamixer.lit_module import ImageClassifier
from dynamixer.schedules import cosine_with_warmup
from helpers import compose_train_config, cpu_trainer

NUM_CLASSES = 5
IMG = 8


class TinyNet(nn.Module):
    """Conv (4-D weight), BatchNorm (buffers), LayerNorm and Linear: every kind of parameter the recipe treats."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, num_classes)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        x = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))
        return self.head(self.norm(x))


class RecordingLoss(nn.Module):
    """Wraps the module's training loss and keeps what it was called with."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = self.loss(logits, target)
        self.calls.append((logits.detach(), target.detach(), out.detach()))
        return out


def adamw(lr: float = 1e-2, weight_decay: float = 0.05):
    return partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay)


def make_module(**kwargs) -> ImageClassifier:
    kwargs.setdefault("optimizer", adamw())
    return ImageClassifier(model=kwargs.pop("model", None) or TinyNet(), num_classes=NUM_CLASSES, **kwargs)


def loader(n_batches: int, batch_size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    n = n_batches * batch_size
    data = TensorDataset(torch.randn(n, 3, IMG, IMG, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def trainer(tmp_path, callbacks=(), **kwargs) -> L.Trainer:
    """`helpers.cpu_trainer` without checkpoints or the sanity check: the module's own steps only."""
    return cpu_trainer(tmp_path, callbacks, enable_checkpointing=False, num_sanity_val_steps=0, **kwargs)


def smoothed_one_hot(y: torch.Tensor, smoothing: float, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((len(y), num_classes), off).scatter_(1, y[:, None], 1.0 - smoothing + off)


def run_training_step(module: ImageClassifier, x: torch.Tensor, y: torch.Tensor):
    """One `training_step` outside a Trainer; returns (images the model saw, targets and value of the loss)."""
    module.train_loss_fn = RecordingLoss(module.train_loss_fn)
    module.model.seen.clear()
    loss = module.training_step((x.clone(), y.clone()), 0)
    (seen,) = module.model.seen
    ((_, target, value),) = module.train_loss_fn.calls
    assert torch.equal(loss.detach(), value)
    return seen, target, value


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, IMG, IMG, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])  # y and its flip differ at every position
    return x, y


# --- 3. mixup / cutmix and the training loss ------------------------------------------------------


def test_loss_without_mixup_is_label_smoothing_or_plain_cross_entropy(batch):
    x, y = batch
    smoothed = make_module(label_smoothing=0.1)
    assert isinstance(smoothed.train_loss_fn, LabelSmoothingCrossEntropy)
    assert smoothed.train_loss_fn.smoothing == pytest.approx(0.1)
    seen, target, value = run_training_step(smoothed, x, y)
    assert torch.equal(seen, x) and torch.equal(target, y)  # no mixing: the batch goes in as it is
    logits = smoothed.model(x)
    logp = logits.log_softmax(-1)
    expected = (0.9 * -logp.gather(1, y[:, None]).squeeze(1) - 0.1 * logp.mean(-1)).mean()
    torch.testing.assert_close(value, expected.detach())

    plain = make_module(label_smoothing=0.0)
    assert type(plain.train_loss_fn) is nn.CrossEntropyLoss


@pytest.mark.parametrize(("mixup_alpha", "cutmix_alpha"), [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_the_model_sees_timms_mixed_batch_and_the_loss_takes_its_soft_targets(batch, mixup_alpha, cutmix_alpha):
    """What is ours: the training step hands the model the images timm's `Mixup` makes and the loss its soft
    targets, with the module's smoothing (timm's own arithmetic is timm's to test)."""
    x, y = batch
    mixing = partial(Mixup, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=1.0, mode="batch")
    module = make_module(label_smoothing=0.1, mixup=partial(mixing, label_smoothing=0.1))
    assert isinstance(module.train_loss_fn, SoftTargetCrossEntropy)
    np.random.seed(3)  # timm draws lambda (and the box) with numpy
    seen, target, value = run_training_step(module, x, y)
    np.random.seed(3)
    images, targets = mixing(label_smoothing=0.1, num_classes=NUM_CLASSES)(x.clone(), y.clone())
    assert not torch.equal(seen, x)  # mixed
    assert torch.equal(seen, images) and torch.equal(target, targets)
    logits = module.model(seen)
    torch.testing.assert_close(value, (-targets * logits.log_softmax(-1)).sum(-1).mean().detach())


def test_mixup_with_prob_zero_leaves_the_batch_unchanged(batch):
    x, y = batch
    np.random.seed(0)
    module = make_module(
        label_smoothing=0.1,
        mixup=partial(Mixup, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0, label_smoothing=0.1),
    )
    seen, target, _ = run_training_step(module, x, y)
    assert torch.equal(seen, x)
    torch.testing.assert_close(target, smoothed_one_hot(y, 0.1), atol=1e-6, rtol=1e-6)


def test_paper_mixup_config_builds_soft_target_loss_with_smoothing():
    cfg = compose_train_config(["module/mixup=paper"])
    mixup = instantiate(cfg.module.mixup)(num_classes=NUM_CLASSES)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob, mixup.mode) == (
        0.8,
        1.0,
        1.0,
        0.5,
        "batch",
    )
    assert mixup.label_smoothing == cfg.module.label_smoothing == 0.1
    module = make_module(mixup=instantiate(cfg.module.mixup), label_smoothing=cfg.module.label_smoothing)
    assert isinstance(module.train_loss_fn, SoftTargetCrossEntropy)


# --- 4. EMA ----------------------------------------------------------------------------------------


class RecordWeights(L.Callback):
    """Raw weights (state dict: parameters and buffers) and global step after every optimizer step."""

    def __init__(self):
        self.start: dict[str, torch.Tensor] = {}
        self.ema_start: dict[str, torch.Tensor] = {}
        self.steps: list[tuple[int, dict[str, torch.Tensor]]] = []

    def on_train_start(self, trainer, pl_module):
        self.start = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
        self.ema_start = {k: v.clone() for k, v in pl_module.ema.module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((trainer.global_step, {k: v.clone() for k, v in pl_module.model.state_dict().items()}))


@pytest.mark.parametrize("warmup", [True, False], ids=["ema_warmup", "no_warmup"])
def test_ema_follows_its_formula_and_is_saved_in_checkpoints(tmp_path, warmup):
    torch.manual_seed(0)
    module = make_module(ema_decay=0.9, ema_warmup=warmup, label_smoothing=0.1)
    assert not any(p.requires_grad for p in module.ema.parameters())
    record = RecordWeights()
    fit = trainer(tmp_path, [record], limit_train_batches=6, limit_val_batches=0)
    fit.fit(module, train_dataloaders=loader(8))

    assert fit.global_step == 6 and [s for s, _ in record.steps] == [1, 2, 3, 4, 5, 6]
    for k, v in record.start.items():  # the EMA starts as a copy of the model
        torch.testing.assert_close(record.ema_start[k], v, atol=0, rtol=0)

    # replay: ema_t = d_t * ema_{t-1} + (1 - d_t) * w_t with timm's decay for update number t
    ema = {k: v.clone().double() if v.is_floating_point() else v.clone() for k, v in record.start.items()}
    decays = []
    for t, (_, weights) in enumerate(record.steps, start=1):
        d = module.ema.get_decay(t)
        decays.append(d)
        for k, w in weights.items():
            ema[k] = d * ema[k] + (1 - d) * w.double() if w.is_floating_point() else w.clone()
    assert decays[0] == 0.0  # the first update copies the weights
    if warmup:
        assert all(0.0 < a < b <= 0.9 for a, b in zip(decays[1:], decays[2:]))
    else:
        assert decays[1:] == [0.9] * 5
    final = module.ema.module.state_dict()
    assert final.keys() == ema.keys()
    for k, v in final.items():
        torch.testing.assert_close(v.double() if v.is_floating_point() else v, ema[k], atol=1e-6, rtol=1e-5)

    raw = module.model.state_dict()
    diff = max((final[k] - raw[k]).abs().max().item() for k in raw if raw[k].is_floating_point())
    assert diff > 1e-4, "EMA weights equal the raw weights"

    # the checkpoint holds the EMA weights, and they come back on loading
    path = tmp_path / "ema.ckpt"
    fit.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    for k, v in final.items():
        torch.testing.assert_close(state[f"ema.module.{k}"], v, atol=0, rtol=0)
    fresh = make_module(ema_decay=0.9, ema_warmup=warmup)
    fresh.load_state_dict(state)
    for k, v in fresh.ema.module.state_dict().items():
        torch.testing.assert_close(v, final[k], atol=0, rtol=0)


def test_no_ema_when_decay_is_none():
    module = make_module(ema_decay=None)
    assert module.ema is None
    assert not any(k.startswith("ema.") for k in module.state_dict())


# --- 5. learning-rate schedule ---------------------------------------------------------------------


def schedule_lrs(base_lr: float, total_steps: int, **kwargs) -> list[float]:
    """The lr the schedule gives at every step 0..total_steps-1 (step t: after t optimizer updates)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = cosine_with_warmup(opt, **kwargs)
    lrs = [opt.param_groups[0]["lr"]]  # before any update
    for t in range(1, total_steps):
        sched.step_update(num_updates=t)
        lrs.append(opt.param_groups[0]["lr"])
    sched.step_update(num_updates=0)
    assert opt.param_groups[0]["lr"] == lrs[0]
    return lrs


def test_cosine_with_warmup_follows_the_papers_curve():
    # the paper's shape (docs/paper.md, section 4): 20 warm-up epochs from 1e-6, cosine to 1e-5 at epoch 300,
    # 10 cool-down epochs
    base, warmup_lr, min_lr, spe = 2e-3, 1e-6, 1e-5, 5
    lrs = schedule_lrs(
        base,
        310 * spe,
        steps_per_epoch=spe,
        max_epochs=310,
        warmup_epochs=20,
        cooldown_epochs=10,
        warmup_lr=warmup_lr,
        min_lr=min_lr,
    )
    warm, cos_end = 20 * spe, 300 * spe
    assert lrs[0] == pytest.approx(warmup_lr, rel=1e-12)
    # linear warm-up from warmup_lr that reaches the base lr at its end
    for t in range(warm):
        assert lrs[t] == pytest.approx(warmup_lr + t / warm * (base - warmup_lr), rel=1e-9)
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm]))
    assert lrs[warm - 1] == pytest.approx(base, rel=0.02) and lrs[warm] == pytest.approx(base, rel=0.02)
    assert max(lrs) <= base
    # the cosine (which the warm-up overlays) from base at step 0 to min_lr at the end of epoch 300
    for t in (warm, 150 * spe, 250 * spe, cos_end - 1):
        expected = min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / cos_end))
        assert lrs[t] == pytest.approx(expected, rel=1e-9)
    assert lrs[cos_end // 2] == pytest.approx((base + min_lr) / 2, rel=1e-6)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1 :]))
    # end of the cosine and the whole cool-down: min_lr
    assert all(lr == pytest.approx(min_lr, rel=1e-12) for lr in lrs[cos_end:])


def test_cosine_with_warmup_rejects_a_cooldown_that_leaves_no_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="cooldown_epochs"):
        cosine_with_warmup(opt, steps_per_epoch=10, max_epochs=5, cooldown_epochs=5)


class RecordLR(L.Callback):
    def __init__(self):
        self.lrs: list[list[float]] = []
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append(trainer.global_step)
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_module_steps_the_schedule_after_every_optimizer_step(tmp_path):
    base, warmup_lr, min_lr = 1e-2, 1e-6, 1e-5
    spe, epochs = 8, 5  # 1 warm-up epoch, cosine over 4 epochs, 1 cool-down epoch
    kwargs = dict(warmup_epochs=1, cooldown_epochs=1, warmup_lr=warmup_lr, min_lr=min_lr)
    module = make_module(optimizer=adamw(lr=base), scheduler=partial(cosine_with_warmup, **kwargs), ema_decay=None)
    record = RecordLR()
    # 10 batches in the loader, 8 used per epoch: steps per epoch come from the limited count
    trainer(tmp_path, [record], max_epochs=epochs, limit_train_batches=spe, limit_val_batches=0).fit(
        module, train_dataloaders=loader(10)
    )

    total = spe * epochs
    assert record.steps == list(range(total))
    assert all(len(set(g)) == 1 and len(g) == 2 for g in record.lrs)  # decay and no-decay groups move together
    lrs = [g[0] for g in record.lrs]
    expected = schedule_lrs(base, total, steps_per_epoch=spe, max_epochs=epochs, **kwargs)
    assert lrs == pytest.approx(expected, rel=1e-9)
    cos_end = spe * (epochs - 1)
    assert lrs[0] == pytest.approx(warmup_lr)
    assert lrs[spe - 1] == pytest.approx(warmup_lr + (spe - 1) / spe * (base - warmup_lr))
    assert lrs[cos_end // 2] == pytest.approx((base + min_lr) / 2, rel=1e-6)
    assert lrs[cos_end:] == pytest.approx([min_lr] * spe, rel=1e-12)


# --- 6. weight decay -------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_no_weight_decay_on_1d_parameters(optimizer):
    cfg = compose_train_config([f"optimizer={optimizer}"])
    factory = instantiate(cfg.optimizer)
    model = timm.create_model("dynamixer_tiny", num_classes=10, img_size=32)
    module = ImageClassifier(model=model, num_classes=10, optimizer=factory, ema_decay=0.999)
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD)

    group_of = {}
    for i, group in enumerate(opt.param_groups):
        for p in group["params"]:
            assert id(p) not in group_of, "a parameter is in two groups"
            group_of[id(p)] = i
    named = dict(model.named_parameters())
    # every trainable parameter of the model, and nothing else (no EMA copies)
    assert set(group_of) == {id(p) for p in named.values()}
    assert not {id(p) for p in module.ema.parameters()} & set(group_of)

    wd = cfg.optimizer.weight_decay
    assert wd > 0
    no_decay, decay = [], []
    for name, p in named.items():
        got = opt.param_groups[group_of[id(p)]]["weight_decay"]
        (no_decay if got == 0 else decay).append(name)
        if p.ndim <= 1:
            assert got == 0.0, f"{name} {tuple(p.shape)} is decayed"
        else:
            assert got == wd, f"{name} {tuple(p.shape)} has weight_decay={got}, expected {wd}"
    assert any(n.endswith(".bias") for n in no_decay) and any("norm" in n for n in no_decay)
    assert "head.weight" in decay and "stem.weight" in decay
    assert opt.param_groups[0]["lr"] == cfg.optimizer.lr


# --- torch.compile ---------------------------------------------------------------------------------


def test_compile_trains_the_compiled_model_like_eager_and_keeps_eager_checkpoint_keys(tmp_path):
    torch.manual_seed(0)
    backbone = timm.create_model("dynamixer_tiny", img_size=16, layers=[1, 1, 1, 1], num_classes=NUM_CLASSES)
    # SGD: each step is linear in the gradient, so what the compiler rounds differently stays that small
    # (AdamW's first steps are about lr * sign(g): a rounding on a near-zero gradient flips a whole step)
    sgd = partial(torch.optim.SGD, lr=0.5)
    eager = make_module(model=backbone, label_smoothing=0.1, ema_decay=0.9, optimizer=sgd)
    compiled = make_module(
        model=copy.deepcopy(backbone), label_smoothing=0.1, ema_decay=0.9, compile=True, optimizer=sgd
    )
    initial = copy.deepcopy(backbone.state_dict())
    data = TensorDataset(torch.randn(24, 3, 16, 16), torch.randint(0, NUM_CLASSES, (24,)))
    for module in (eager, compiled):
        fit = trainer(tmp_path, limit_train_batches=3, limit_val_batches=0)
        fit.fit(module, train_dataloaders=DataLoader(data, batch_size=8))

    assert compiled.model._compiled_call_impl is not None and eager.model._compiled_call_impl is None
    # the same three SGD steps: the compiled kernels only round differently
    for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)
    moved = max((a - initial[k]).abs().max().item() for k, a in compiled.model.state_dict().items())
    assert moved > 1e-3  # it trained
    path = tmp_path / "compiled.ckpt"
    fit.save_checkpoint(path)
    keys = torch.load(path, map_location="cpu", weights_only=True)["state_dict"].keys()
    assert keys == eager.state_dict().keys()  # no `_orig_mod.` prefixes: eager code loads it


def test_compile_is_for_fitting_only_evaluation_stays_eager(tmp_path):
    backbone = timm.create_model("dynamixer_tiny", img_size=16, layers=[1, 1, 1, 1], num_classes=NUM_CLASSES)
    module = make_module(model=backbone, compile=True)
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, NUM_CLASSES, (8,)))
    metrics = trainer(tmp_path).validate(module, DataLoader(data, batch_size=8), verbose=False)
    assert module.model._compiled_call_impl is None and "val/acc1" in metrics[0]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_fused_mix_where_its_kernel_does_not_run_is_said(tmp_path, recwarn, compile):
    from dynamixer.models import fused_mix

    backbone = timm.create_model("dynamixer_tiny", img_size=16, num_classes=NUM_CLASSES, fused_mix=True)
    # limit 0: configure_model runs, no step does (nothing is compiled)
    trainer(tmp_path, limit_train_batches=0, limit_val_batches=0).fit(make_module(model=backbone, compile=compile))
    said = [str(w.message) for w in recwarn if "model.fused_mix=true" in str(w.message)]
    # on this CPU the kernel runs only in Triton's interpreter (conftest.py); compiled graphs never run it
    idle = compile or not fused_mix.runs_on(torch.empty(0))
    assert len(said) == idle, said
    if compile:
        assert "(cpu, module.compile=true) computes the PyTorch ops" in said[0]


def test_no_checkpoint_of_a_diverged_state_is_written() -> None:
    """The divergence flag stays on the device between checks; a save checks it and the weights (raw and EMA):
    a non-finite loss, or a finite loss whose step left a non-finite weight, stops the save with the step."""
    from dynamixer.errors import DivergenceError

    module = make_module(optimizer=partial(torch.optim.SGD, lr=0.1), ema_decay=0.9)
    module._note_if_nonfinite(torch.tensor(1.0))
    module.on_save_checkpoint({})  # finite loss and weights: saved
    with torch.no_grad():
        next(module.model.parameters())[0] = float("inf")  # e.g. an overflowing gradient's update
    with pytest.raises(DivergenceError, match="weights are not"):
        module.on_save_checkpoint({})
    module = make_module(optimizer=partial(torch.optim.SGD, lr=0.1))
    module._note_if_nonfinite(torch.tensor(float("nan")))
    module._note_if_nonfinite(torch.tensor(2.0))  # the first non-finite one is named, not the last
    with pytest.raises(DivergenceError, match=r"loss is nan at step 0"):
        module.on_save_checkpoint({})


def test_debug_overfit_drives_the_training_loss_of_a_few_batches_down(tmp_path) -> None:
    """`debug=overfit` (Lightning's overfit_batches on our resumable sampler): the loss of two batches falls."""
    import csv

    from dynamixer.run import train
    from helpers import QUIET_FAST, compose_job_config

    train(compose_job_config([*QUIET_FAST, "debug=overfit", "trainer.max_epochs=15"], tmp_path / "run"))
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        losses = [float(r["train/loss_epoch"]) for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    assert len(losses) == 15 and losses[-1] < 0.5 * losses[0], losses


def test_a_cool_down_within_the_runs_length_builds(tmp_path) -> None:
    """The schedule is dry-built over the trainer's own length: a cool-down the run's epochs hold is accepted."""
    from dynamixer.run import build
    from helpers import compose_job_config

    build(compose_job_config(["scheduler.cooldown_epochs=10", "trainer.max_epochs=12"], tmp_path))
