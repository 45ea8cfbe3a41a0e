"""Callbacks every training run uses: the feature cache, the failed-files guard, throughput
and per-epoch history; and a stage that starts from the one before (`PreviousStageCompetes`)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from vision_tl.core.errors import ConfigError
from vision_tl.core.io import write_csv
from vision_tl.core.runtime import one_thread
from vision_tl.core.shims import stop_fit_as_on_sigterm
from vision_tl.core.signals import Interrupted, pending
from vision_tl.core.stats import wilson_interval
from vision_tl.data.datamodule import Augmentation, ImageDataModule
from vision_tl.data.decode import error_line
from vision_tl.data.features import CachedFeatures, FeatureSpec, build_features
from vision_tl.training.finetune import Convergence, FinetunePolicy, Stage
from vision_tl.training.probe import decide_views, stratified_subset

log = logging.getLogger(__name__)


class FeatureCache(L.Callback):
    """Serve a fit from cached backbone features: computed once (`vision_tl.data.features`),
    then the datamodule serves rows and the task runs only its head.

    Whether a fit may be served so is decided before the Trainer exists (`plan`): the
    policy keeps every backbone frozen throughout, the augmentation is served from cached
    views (or there is none), and the run is no `fast_dev_run`. `data.feature_cache`:
    `auto` caches when it can, `on` makes a bypass an error, `off` never caches. A policy
    whose head converges (`FinetunePolicy.converges`) has its settings searched here, on
    the training split, once the features exist.
    """

    def __init__(self, spec: FeatureSpec, convergence: Convergence | None = None) -> None:
        self.spec = spec
        self.convergence = convergence
        self.features: CachedFeatures | None = None
        self.batch_size: int | None = None
        self._one_thread: contextlib.ExitStack | None = None

    @classmethod
    def plan(
        cls,
        spec: FeatureSpec,
        policy: FinetunePolicy,
        stage: Stage,
        augment: Augmentation,
        fast_dev_run: bool,
    ) -> FeatureCache | None:
        """This callback when the fit can be served from cached features, else None (the
        reason logged where the user may have expected a cache; an error with
        `data.feature_cache=on`). A stage that starts from the previous one reads images."""
        mode = spec.settings.mode
        if stage.from_previous or mode == "off":
            return None
        reason = policy.cache_bypass_reason()
        if reason is None and fast_dev_run:
            reason = "trainer.fast_dev_run touches one batch, less than computing every feature"
        reason = reason or spec.blocker(augment.random, augment.preset)
        if reason:
            if mode == "on":
                raise ConfigError(f"data.feature_cache=on cannot be used: {reason}")
            if policy.announce_cache_bypass:
                log.info("Feature cache bypassed: %s", reason)
            return None
        return cls(spec, policy.converges())

    def prepare(
        self, task: L.LightningModule, dm: ImageDataModule, device: torch.device
    ) -> dict[str, int]:
        """Load or compute the features and, for a head that converges, choose its recipe
        on the training split: before the Trainer, so the fit's length is decided when it
        is built. With a random augmentation the views are first judged on a stratified
        subset of the training split and extracted for the rest only when they win there
        (their rows reused). Returns the Trainer's length arguments."""
        model, teacher, plan = task.model, teacher_of(task), self.convergence
        grid = plan.grid if plan is not None else None
        train, pool = dm.catalog.samples["train"], dm.catalog.view_samples()
        decide = (
            grid is not None
            and dm.augment.random
            and self.spec.settings.views > 0
            and 0 < grid.views_subset < len(pool)
        )
        views, decision = None, None
        if decide:
            subset = stratified_subset(pool, grid.views_subset, grid.folds)
            chosen = set(subset)
            on_subset = [s for s in train if s[0] in chosen]
            built: list[CachedFeatures] = []

            def subset_with(count: int) -> CachedFeatures:
                lent = built[-1].train_store if built else None
                features = build_features(
                    self.spec, dm, model, device, teacher, subset, lent, count
                )
                built.append(features)
                return dataclasses.replace(features, samples={"train": on_subset})

            decision, last = decide_views(
                task, grid, plan.batch_size, dm.loading.sampler, self.spec.settings.views,
                subset_with,
            )  # fmt: skip
            views = "augmented" if decision["views"] else "eval"
            first = built[0]
            decision["subset_views_s"] = round(
                sum(f.train_store.seconds for f in built if not f.hits.get("train")), 3
            )
            decision["eval_features_s"] = 0.0 if first.hits["eval"] else first.eval_store.seconds
            log.info(
                "Views decision on %d training images in %.1f s (%.1f s of their views, %.1f s "
                "of search): %s (held-out acc %.4f with %d augmented views, %.4f with the eval "
                "view)",
                decision["num_images"],
                decision["subset_views_s"] + decision["search_s"],
                decision["subset_views_s"],
                decision["search_s"],
                "the views pay, extracting them for the rest"
                if decision["views"]
                else "the eval view wins, no more views extracted",
                decision["augmented_acc"],
                decision["rounds"][-1]["views"],
                decision["eval_acc"],
            )
            features = (
                build_features(
                    self.spec, dm, model, device, teacher, views="all", reuse=last.train_store
                )
                if decision["views"]
                else dataclasses.replace(built[-1], train_store=None)
            )
        else:
            features = build_features(self.spec, dm, model, device, teacher)
        length: dict[str, int] = {}
        if plan is not None:
            sampler = dm.loading.sampler
            result, features = task.converge_head(features, plan, sampler, views, decision)
            self.batch_size = result.batch_size
            length = {"max_epochs": result.epochs, "check_val_every_n_epoch": result.epochs}
        self.features = features
        return length

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if stage != "fit":  # test/validate after fit: the eval entry covers every split
            pl_module.serve_features(dm.features.precision if dm.features is not None else None)
            return
        if self.features is None:  # not prepared before the Trainer (a Trainer built by hand)
            self.prepare(pl_module, dm, trainer.strategy.root_device)
        dm.use_features(self.features, self.batch_size)
        pl_module.serve_features(self.features.precision)
        self._one_thread = contextlib.ExitStack()
        self._one_thread.enter_context(one_thread())

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._one_thread is not None:
            self._one_thread.close()
            self._one_thread = None


class PreviousStageCompetes(L.Callback):
    """A stage that starts from the previous one (LP-FT's fine-tune, from the probe run's
    best head, already in the task): that start competes for the best checkpoint. Before
    the first epoch it is saved as `best.ckpt` with the previous stage's val accuracy
    `score`, registered through `ModelCheckpoint`'s own state (the `load_state_dict` a
    resume uses), so a fine-tune that only degrades it on val keeps it (`best_epoch` -1)."""

    def __init__(self, score: float) -> None:
        self.score = score

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        score = torch.tensor(self.score)
        for callback in trainer.checkpoint_callbacks:
            if (
                isinstance(callback, ModelCheckpoint)
                and callback.monitor == "val/acc"
                and callback.mode == "max"
                and callback.save_top_k == 1
            ):
                path = callback.format_checkpoint_name({})
                best = {"best_model_score": score, "best_model_path": path}
                ranked = {"best_k_models": {path: score}, "kth_best_model_path": path}
                callback.load_state_dict(
                    {**callback.state_dict(), **best, **ranked, "kth_value": score}
                )
                pl_module.count_as_best(self.score)
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

    COLUMNS = (
        "epoch",
        "train_loss",
        "train_acc",
        "train_acc_lo",
        "train_acc_hi",
        "val_loss",
        "val_acc",
        "val_acc_lo",
        "val_acc_hi",
        "lr",
    )

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: dict[int, dict[str, float]] = {}
        self._loss_sum = 0.0
        self._count = 0
        self._val_count = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.path.exists() and trainer.ckpt_path:
            try:
                frame = pd.read_csv(self.path)
                self.rows = {int(r["epoch"]): r for r in frame.to_dict("records")}
            except (OSError, ValueError, KeyError, pd.errors.ParserError) as err:
                log.warning("history.csv unreadable (%s): its rows start again", error_line(err))
                self.rows = {}

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

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_count = 0

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._val_count += len(batch[1])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        metrics = trainer.callback_metrics
        train_acc = getattr(pl_module, "train_acc", None)
        train = float(train_acc.compute()) if train_acc is not None else math.nan
        val = float(metrics["val/acc"]) if "val/acc" in metrics else math.nan
        # Each accuracy with its 95% Wilson interval over the images it counted (all ranks).
        train_ci = wilson_interval(train, self._count * trainer.world_size) or [math.nan] * 2
        val_ci = wilson_interval(val, self._val_count * trainer.world_size) or [math.nan] * 2
        row = {
            "epoch": trainer.current_epoch,
            "train_loss": self._loss_sum / self._count if self._count else math.nan,
            "train_acc": train,
            "train_acc_lo": train_ci[0],
            "train_acc_hi": train_ci[1],
            "val_loss": float(metrics["val/loss"]) if "val/loss" in metrics else math.nan,
            "val_acc": val,
            "val_acc_lo": val_ci[0],
            "val_acc_hi": val_ci[1],
            "lr": trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else math.nan,
        }
        self.rows[trainer.current_epoch] = row
        if trainer.is_global_zero:
            frame = pd.DataFrame([self.rows[e] for e in sorted(self.rows)], columns=self.COLUMNS)
            write_csv(frame, self.path, index=False)

    @property
    def last(self) -> dict[str, float]:
        return self.rows[max(self.rows)] if self.rows else {}


class StopOnSignal(L.Callback):
    """SIGTERM or SIGINT during a fit (`core.signals.safe_points`): the fit stops where
    Lightning stops it on SIGTERM, after the batch it is in (or its epoch's end, or a
    validation batch), each a point Lightning resumes from exactly; SIGINT is made to stop
    at the same points (`core.shims.stop_fit_as_on_sigterm`). The state there is saved to
    `path`, the run's `last.ckpt`, which `ckpt_path=` (or the job machinery under SLURM and
    in sweeps) resumes from; `saved` says where it went."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.saved: str | None = None

    def _stop_if_signalled(self, trainer: L.Trainer) -> None:
        if pending() is not None and not trainer.received_sigterm:
            stop_fit_as_on_sigterm(trainer)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._stop_if_signalled(trainer)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._stop_if_signalled(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_signalled(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, (Interrupted, SIGTERMException, KeyboardInterrupt)):
            return
        if trainer.sanity_checking or trainer.global_step == 0:
            return  # nothing trained yet: the run starts again from the beginning
        trainer.save_checkpoint(self.path)
        self.saved = str(self.path)
        log.info(
            "Saved the state at the interruption (epoch %d, step %d) in %s",
            trainer.current_epoch,
            trainer.global_step,
            self.path,
        )


class TrialPruning(L.Callback):
    """Report `val/acc` to an Optuna trial after each validation and stop the fit when the
    study's pruner prunes it (`hydra.sweeper.pruner`); `pruned_epoch` is then the last
    epoch trained. Only rank 0 opens the trial (`open_trial`, handed in by the entry
    point: `sweeps.study.open_job_trial`) and talks to the storage; its decision is
    broadcast, so every DDP rank stops after the same epoch. Every validation is reported,
    with pruner none too: the study keeps each trial's learning curve."""

    MONITOR = "val/acc"

    def __init__(self, number: int, open_trial: Callable[[int], Any]) -> None:
        self.number = int(number)
        self.open_trial = open_trial
        self.pruned_epoch: int | None = None
        self._trial: Any = None
        self._opened = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        value = trainer.callback_metrics.get(self.MONITOR)
        if trainer.is_global_zero and value is not None:
            if not self._opened:
                self._trial, self._opened = self.open_trial(self.number), True
            if self._trial is not None:
                self._trial.report(float(value), step=trainer.current_epoch)
                prune = bool(self._trial.should_prune())
        if trainer.strategy.broadcast(prune, src=0):
            self.pruned_epoch = trainer.current_epoch
            trainer.should_stop = True
            log.info(
                "Trial %d pruned after epoch %d (%s %.4f)",
                self.number,
                trainer.current_epoch,
                self.MONITOR,
                float(value) if value is not None else math.nan,
            )
