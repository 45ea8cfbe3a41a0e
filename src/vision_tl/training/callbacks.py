"""Callbacks every training run uses: the feature cache, the failed-files guard, throughput
and per-epoch history; and LP-FT's hand-over from its probe stage (`ProbeStart`)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vision_tl.core.errors import ConfigError
from vision_tl.data.datamodule import ImageDataModule
from vision_tl.data.features import CachedFeatures, FeatureSpec, build_features
from vision_tl.training.probe import ProbeGrid, one_thread, search_probe, zero_logit_layers

log = logging.getLogger(__name__)


class FeatureCache(L.Callback):
    """Decide, once per fit, whether the backbone's features can be cached, and wire it up.

    It can when the fine-tune policy keeps every backbone frozen throughout, the data's
    augmentation is served from cached views (or there is none), the model splits into
    backbone and head, and the run is no `fast_dev_run`. Then the features are loaded or
    computed (`vision_tl.data.features`), the datamodule serves them, and the task is told
    that its batches are features. `data.feature_cache`: `auto` caches when it can, `on`
    makes a bypass an error, `off` never caches.
    """

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self._one_thread: contextlib.ExitStack | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if stage != "fit":  # test/validate after fit: the eval entry covers every split
            pl_module.feature_inputs = dm is not None and dm.features is not None
            return
        policy = pl_module.finetune
        if policy.probe_stage() is not None:  # the probe stage cached; the fine-tune reads images
            return
        mode = self.spec.settings.mode
        if dm is None or mode == "off":
            return
        reason = policy.cache_bypass_reason() or self.bypass_reason(trainer, dm)
        if reason:
            if mode == "on":
                raise ConfigError(f"data.feature_cache=on cannot be used: {reason}")
            if policy.announce_cache_bypass:
                log.info("Feature cache bypassed: %s", reason)
            return
        device = trainer.strategy.root_device
        features = build_features(self.spec, dm, pl_module.model, device, teacher_of(pl_module))
        batch_size = None
        if getattr(policy, "search", False):
            features = self.converge_probe(trainer, pl_module, dm, features)
            batch_size = policy.batch_size
        dm.use_features(features, batch_size)
        pl_module.feature_inputs = True
        pl_module.feature_precision = features.precision
        self._one_thread = contextlib.ExitStack()
        self._one_thread.enter_context(one_thread())

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._one_thread is not None:
            self._one_thread.close()
            self._one_thread = None

    @staticmethod
    def converge_probe(
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        dm: ImageDataModule,
        features: CachedFeatures,
    ) -> CachedFeatures:
        """Choose the probe's settings on the training split and set the fit up to train
        the head to convergence with them: the policy's epochs and batch size, one
        validation at the end (so the val split picks no epoch either)."""
        policy = pl_module.finetune
        grid = ProbeGrid(policy.lrs, policy.l2s, policy.epochs, policy.folds)
        zero_logit_layers(pl_module.model)
        result = search_probe(pl_module, features, grid, policy.batch_size, dm.loading.sampler)
        pl_module.optimizer_factory = functools.partial(
            pl_module.optimizer_factory, lr=result.lr, weight_decay=0.0
        )
        pl_module.penalise_head(result.l2)
        pl_module.probe = result.as_dict()
        trainer.fit_loop.max_epochs = result.epochs
        trainer.check_val_every_n_epoch = result.epochs
        if result.views == "eval":
            features = dataclasses.replace(features, train_store=None)
        return features

    def bypass_reason(self, trainer: L.Trainer, dm: ImageDataModule) -> str | None:
        """Why the run or the data rules the cache out for this fit (None when neither does)."""
        if trainer.fast_dev_run:
            return "trainer.fast_dev_run touches one batch, less than computing every feature"
        return self.spec.blocker(dm.augment.random, dm.augment.preset)


class ProbeStart(L.Callback):
    """The fine-tune stage of a policy with a probe stage (LP-FT): the task holds the probe
    run's best head (`training.train`); every layer now trains as the policy says, at
    `lr_scale` x `optimizer.lr`. The probe competes for the best checkpoint: it is saved as
    `best.ckpt` with its val accuracy `score`, so a fine-tune that only degrades it on val
    keeps the probe (`best_epoch` -1). A resumed fit (`score` None) is past all this."""

    def __init__(self, score: float | None) -> None:
        self.score = score

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        policy, factory = pl_module.finetune, pl_module.optimizer_factory
        base_lr = getattr(factory, "keywords", {}).get("lr")
        if base_lr is None:
            raise ConfigError(f"finetune={policy.name} needs optimizer.lr set")
        policy.start_finetune(pl_module.model)
        pl_module.optimizer_factory = functools.partial(factory, lr=base_lr * policy.lr_scale)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.score is None:
            return
        score = torch.tensor(self.score)
        for callback in trainer.checkpoint_callbacks:
            if (
                isinstance(callback, ModelCheckpoint)
                and callback.monitor == "val/acc"
                and callback.mode == "max"
                and callback.save_top_k == 1
            ):
                path = callback.format_checkpoint_name({})
                callback.best_k_models = {path: score}
                callback.kth_best_model_path = callback.best_model_path = path
                callback.kth_value = callback.best_model_score = score
                pl_module.val_acc_best(score)
                trainer.save_checkpoint(path, weights_only=False)  # with the state above


def teacher_of(pl_module: L.LightningModule) -> Any:
    """The run's distillation teacher, whose logits are cached with the features, or None."""
    distill = getattr(pl_module, "distill", None)
    return distill.teacher if distill is not None else None


class FailedFilesGuard(L.Callback):
    """Stop a fit whose files fail far more often than the pre-flight check predicted
    (`data.max_failed_fraction`): a skipped file is logged, a broken setup is an error."""

    def _check(self, trainer: L.Trainer) -> None:
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "check_failures"):
            dm.check_failures()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check(trainer)  # feature extraction has run by now

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._check(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        self._check(trainer)


class TrainThroughput(L.Callback):
    """Training images per second, data loading included and validation excluded."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.seconds += now - self._last
            self.images += len(batch[1])
        self._last = now

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


class EpochHistory(L.Callback):
    """Write `history.csv` (one row per epoch) as training goes.

    A sweep report reads it for curves and for jobs that are still running, without
    TensorBoard; a resumed run keeps the rows of the epochs it already did.
    """

    COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: dict[int, dict[str, float]] = {}
        self._loss_sum = 0.0
        self._count = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.path.exists() and trainer.ckpt_path:
            frame = pd.read_csv(self.path)
            self.rows = {int(r["epoch"]): r for r in frame.to_dict("records")}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loss_sum, self._count = 0.0, 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            size = len(batch[1])
            self._loss_sum += float(loss.detach()) * size
            self._count += size

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        metrics = trainer.callback_metrics
        train_acc = getattr(pl_module, "train_acc", None)
        row = {
            "epoch": trainer.current_epoch,
            "train_loss": self._loss_sum / self._count if self._count else math.nan,
            "train_acc": float(train_acc.compute()) if train_acc is not None else math.nan,
            "val_loss": float(metrics["val/loss"]) if "val/loss" in metrics else math.nan,
            "val_acc": float(metrics["val/acc"]) if "val/acc" in metrics else math.nan,
            "lr": trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else math.nan,
        }
        self.rows[trainer.current_epoch] = row
        if trainer.is_global_zero:
            frame = pd.DataFrame([self.rows[e] for e in sorted(self.rows)], columns=self.COLUMNS)
            tmp = self.path.with_suffix(".csv.tmp")
            frame.to_csv(tmp, index=False)
            os.replace(tmp, self.path)

    @property
    def last(self) -> dict[str, float]:
        return self.rows[max(self.rows)] if self.rows else {}
