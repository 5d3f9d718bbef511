"""LightningModule for image classification with the paper's recipe: mixup/cutmix, label smoothing,
EMA of the weights, AdamW without decay on 1-D parameters, per-step cosine schedule with warm-up."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from dynamixer.errors import DivergenceError
from dynamixer.machinery.lightning_internals import is_compiled
from dynamixer.models import DynaMixerOp
from dynamixer.schema import Speed

__all__ = ["ImageClassifier"]


class ImageClassifier(L.LightningModule):
    """Trains any image classifier `(B, 3, H, W) -> (B, num_classes)` with the DynaMixer recipe.

    `optimizer`, `scheduler` and `mixup` are factories (Hydra `_partial_` objects): the optimizer
    takes the parameter groups, the scheduler takes the optimizer, `steps_per_epoch` and `max_epochs`
    (see `dynamixer.schedules`) and is stepped after every optimizer step, `mixup` takes `num_classes`.
    `compile=True` trains the model through `torch.compile(fullgraph=True)` (the EMA copy, and test
    and predict runs, stay eager); the parameter names, and so the checkpoints, are those of the eager
    model. Fine-tuning: `backbone_lr_scale` runs everything but the head at that fraction of the lr;
    `layer_decay` (timm's layer-wise decay, by the model's `group_matcher`) scales each block's lr by
    `layer_decay ** (blocks between it and the head)` and then takes the place of `backbone_lr_scale`.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Scheduler] | None = None,
        mixup: Callable[..., Mixup] | None = None,
        label_smoothing: float = 0.0,
        ema_decay: float | None = None,
        ema_warmup: bool = False,
        run_config: dict[str, Any] | None = None,
        data_info: dict[str, Any] | None = None,
        compile: Speed[bool] = False,
        backbone_lr_scale: float = 1.0,
        layer_decay: float | None = None,
    ):
        super().__init__()
        # the run's resolved config and the data's class names and eval transform travel in every
        # checkpoint, so test/predict can rebuild the model and read images without the data set
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler", "mixup"])
        self.model = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.mixup_fn = mixup(num_classes=num_classes) if mixup is not None else None
        if self.mixup_fn is not None and self.mixup_fn.mixup_enabled:
            # mixup already folds label smoothing into its soft targets
            self.train_loss_fn: nn.Module = SoftTargetCrossEntropy()
        elif label_smoothing > 0:
            self.train_loss_fn = LabelSmoothingCrossEntropy(smoothing=label_smoothing)
        else:
            self.train_loss_fn = nn.CrossEntropyLoss()
        self.ema = ModelEmaV3(model, decay=ema_decay, use_warmup=ema_warmup) if ema_decay else None
        if self.ema is not None:
            self.ema.requires_grad_(False)  # updated by `update`, never by the optimizer or DDP

        def accuracy(prefix: str) -> MetricCollection:
            top5 = min(5, num_classes)
            return MetricCollection(
                {
                    "acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
                    f"acc{top5}": MulticlassAccuracy(num_classes, top_k=top5, average="micro"),
                },
                prefix=prefix,
            )

        self.val_acc = accuracy("val/")
        self.val_loss = MeanMetric()
        if self.ema is not None:
            self.val_ema_acc = accuracy("val/ema_")
            self.val_ema_loss = MeanMetric()
        self._epoch_start, self._epoch_images = 0.0, 0
        # on the device, the step and value of the first non-finite training loss (step -1: none yet)
        self._nonfinite: tuple[torch.Tensor, torch.Tensor] | None = None

    def validation_metrics(self) -> list[str]:
        """The names of the metrics each validation logs (what a checkpoint callback may monitor)."""
        names = ["val/loss", *self.val_acc.keys()]
        return names + (["val/ema_loss", *self.val_ema_acc.keys()] if self.ema is not None else [])

    def configure_model(self) -> None:
        # only for fitting: a test or predict pass over a checkpoint would mostly wait for the compile
        fitting = self._trainer is None or self._trainer.state.fn == TrainerFn.FITTING
        # in place (`nn.Module.compile`), unlike `torch.compile(model)`, which would prefix every key
        # with `_orig_mod.`; Lightning calls this hook before wrapping the module for DDP
        if self.hparams.compile and fitting and not is_compiled(self.model):
            self.model.compile(fullgraph=True)
        self._say_if_fused_mix_is_idle(compiled=self.hparams.compile and fitting)

    def _say_if_fused_mix_is_idle(self, compiled: bool) -> None:
        """`model.fused_mix=true` where its kernel does not run (not on CUDA, or compiled) is said, not silent."""
        if self._trainer is None or not any(isinstance(m, DynaMixerOp) and m.fused for m in self.model.modules()):
            return
        from dynamixer.models import fused_mix

        device = self._trainer.strategy.root_device
        if compiled or not fused_mix.runs_on(torch.empty(0, device=device)):
            rank_zero_warn(
                f"model.fused_mix=true: its Triton kernel runs on CUDA in eager mode, and this run "
                f"({device.type}{', module.compile=true' if compiled else ''}) computes the PyTorch ops instead "
                "(the same function); set model.fused_mix=false to silence this"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # --- training -------------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.mixup_fn is not None:
            x, y = self.mixup_fn(x, y)
        # the loss in fp32: CPU autocast leaves log-softmax in bf16, whose 8-bit mantissa rounds the loss
        loss = self.train_loss_fn(self.model(x).float(), y)
        self._note_if_nonfinite(loss)
        # not in the progress bar: Lightning would read it back from the device after every step
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=x.shape[0])
        self._epoch_images += x.shape[0]
        return loss

    def _note_if_nonfinite(self, loss: torch.Tensor) -> None:
        """Keep, on the device and without waiting for it, the step and value of the first non-finite loss."""
        loss = loss.detach()
        if self._nonfinite is None or self._nonfinite[0].device != loss.device:
            self._nonfinite = (torch.full((), -1, device=loss.device), torch.zeros((), device=loss.device))
        step, value = self._nonfinite
        first = (step < 0) & ~torch.isfinite(loss)
        self._nonfinite = (torch.where(first, self.global_step, step), torch.where(first, loss, value))

    def stop_if_diverged(self, weights: bool = False) -> None:
        """Raise `DivergenceError` on every rank if any rank has had a non-finite training loss (with `weights`:
        or holds a non-finite weight, raw or EMA: a finite loss with overflowing gradients): one read of the
        device (and one all-reduce under DDP). Called at each log interval, with `weights` before every
        checkpoint is written, and at the end of training, so a diverged state is never saved; the steps in
        between train on (their weights are never kept), and the step that diverged is named."""
        if self._nonfinite is None:
            return
        step = int(self._nonfinite[0])
        finite_weights = not weights or bool(
            torch.stack([p.detach().isfinite().all() for p in self.parameters()]).all()
        )
        diverged = step >= 0 or not finite_weights
        if self._trainer is not None:
            diverged = self.trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if diverged:
            where = f"is {float(self._nonfinite[1])} at step {step}" if step >= 0 else "is not finite on another rank"
            if step < 0 and not finite_weights:
                where = f"was finite, but the weights are not at step {self.global_step} (overflowing gradients)"
            raise DivergenceError(
                f"the training loss {where} (stopped at step {self.global_step}, epoch {self.current_epoch}): the "
                "last checkpoint holds the last finite state. Try a lower optimizer.lr, a longer "
                "scheduler.warmup_epochs, trainer.gradient_clip_val=1.0 or trainer.precision=bf16-mixed instead "
                "of 16-mixed; resume with ckpt_path=auto"
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = self.trainer.log_every_n_steps  # 0: no logging (then only saves and the end check)
        if every and self.global_step % every == 0:
            self.stop_if_diverged()

    def on_train_end(self) -> None:
        self.stop_if_diverged()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            # timm's convention (its train.py): `step` counts the updates including this one (1 for the
            # first); Lightning's global_step is only incremented after this hook returns
            self.ema.update(self.model, step=self.global_step + 1)

    def on_train_epoch_start(self) -> None:
        self._epoch_start, self._epoch_images = time.perf_counter(), 0

    def on_train_epoch_end(self) -> None:
        seconds = time.perf_counter() - self._epoch_start
        # images/s of this process times the world size: the throughput of the whole run
        images_per_sec = self._epoch_images * self.trainer.world_size / max(seconds, 1e-9)
        self.log("train/throughput", images_per_sec, sync_dist=True, reduce_fx="mean", prog_bar=True)

    # --- evaluation -----------------------------------------------------------------------------
    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        logits = self.model(x).float()
        self.val_loss.update(F.cross_entropy(logits, y), weight=x.shape[0])
        self.val_acc.update(logits, y)
        if self.ema is not None:
            ema_logits = self.ema.module(x).float()
            self.val_ema_loss.update(F.cross_entropy(ema_logits, y), weight=x.shape[0])
            self.val_ema_acc.update(ema_logits, y)

    def _log_evaluation(self) -> None:
        self.log("val/loss", self.val_loss, prog_bar=False)
        self.log_dict(self.val_acc, prog_bar=True)
        if self.ema is not None:
            self.log("val/ema_loss", self.val_ema_loss)
            self.log_dict(self.val_ema_acc, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.stop_if_diverged(weights=True)  # before anything of a diverged state is written

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch)
        self._log_evaluation()

    # --- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        weight_decay = getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
        # no decay on biases, norms and every other 1-D parameter (nor on the model's own list)
        # by keyword: recent timm has `weight_decay_exclude_1d` as the third positional parameter
        no_decay = getattr(self.model, "no_weight_decay", set)()
        if self.hparams.layer_decay is not None:
            # timm's layer-wise decay: each block's lr scaled by layer_decay ** (its distance from the head)
            groups = param_groups_layer_decay(
                self.model, weight_decay, no_weight_decay_list=no_decay, layer_decay=self.hparams.layer_decay
            )
        else:
            groups = param_groups_weight_decay(self.model, weight_decay, no_weight_decay_list=no_decay)
            if self.hparams.backbone_lr_scale != 1.0:
                # fine-tuning: the backbone at a fraction of the head's lr (timm schedulers apply `lr_scale`)
                head = {id(p) for p in self.model.get_classifier().parameters()}
                groups = [
                    {
                        **g,
                        "params": [p for p in g["params"] if (id(p) in head) == is_head],
                        "lr_scale": 1.0 if is_head else self.hparams.backbone_lr_scale,
                    }
                    for g in groups
                    for is_head in (True, False)
                ]
                groups = [g for g in groups if g["params"]]
        if self.scheduler_factory is None:  # timm's schedulers apply `lr_scale`; without one it is applied here
            base_lr = getattr(self.optimizer_factory, "keywords", {}).get("lr")
            groups = [{**g, "lr": base_lr * g["lr_scale"]} if "lr_scale" in g and base_lr else g for g in groups]
            return {"optimizer": self.optimizer_factory(params=groups)}
        optimizer = self.optimizer_factory(params=groups)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self._schedule(optimizer), "interval": "step"}}

    def _schedule(self, optimizer: torch.optim.Optimizer) -> Scheduler:
        """The lr schedule over the trainer's length (`max_epochs`, the steps of each)."""
        max_epochs = max(self.trainer.max_epochs or 1, 1)
        steps_per_epoch = self.trainer.estimated_stepping_batches / max_epochs
        return self.scheduler_factory(optimizer, steps_per_epoch=steps_per_epoch, max_epochs=max_epochs)

    def rebuild_schedule(self) -> None:
        """Replace the (restored) lr schedule by one built for the trainer's length, set at the current step."""
        (config,) = self.trainer.lr_scheduler_configs
        config.scheduler.load_state_dict(self._schedule(config.scheduler.optimizer).state_dict())
        config.scheduler.step_update(num_updates=self.global_step)

    def lr_scheduler_step(self, scheduler: Scheduler, metric: Any) -> None:
        # timm schedulers are stepped with the number of optimizer updates done so far
        scheduler.step_update(num_updates=self.global_step)
