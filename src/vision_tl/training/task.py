"""The LightningModule: loss, metrics, optimisers and fine-tuning schedule for classification."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.nn import ModuleList
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from vision_tl.core.errors import ConfigError
from vision_tl.core.shims import set_last_lr
from vision_tl.data.features import CachedFeatures, split_teacher
from vision_tl.data.preprocess import AnyPreprocess, load_preprocess, per_member
from vision_tl.models import build_model
from vision_tl.training.compat import (
    CHECKPOINT_FORMAT,
    SavedFacts,
    checkpoint_path,
    unloadable,
    upgrade_checkpoint,
)
from vision_tl.training.finetune import build_finetune
from vision_tl.training.optim import add_param_group
from vision_tl.training.probe import (
    ProbeResult,
    l2_penalty,
    penalised,
    search_probe,
    zero_logit_layers,
)
from vision_tl.training.recipes import TimeBudget, backbone_param_groups, build_mixup

log = logging.getLogger(__name__)

# trainer.max_epochs=-1: the LR schedule's provisional length, until a time budget sets it
OPEN_ENDED_EPOCHS = 1000


def _split_metrics(num_classes: int, prefix: str) -> MetricCollection:
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1_macro": MulticlassF1Score(num_classes, average="macro"),
        "acc_class": MulticlassAccuracy(num_classes, average=None),
        "confmat": MulticlassConfusionMatrix(num_classes),
    }
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


class ClassificationTask(L.LightningModule):
    """Image classification with a registry-built model.

    Every argument is a primitive (or a Hydra partial for the optimiser and scheduler,
    which are not saved), so `load_from_checkpoint(path)` rebuilds the network with no
    extra arguments. Checkpoints set `load_pretrained=False`: reloading never downloads.

    `preprocess_overrides` (the `data.*` image settings) are resolved once, here, against
    the model's own preprocessing: `self.preprocess` is the one object the datamodule, the
    checkpoint and every inference command use. After `serve_features` (the `FeatureCache`
    callback's call), batches hold cached backbone features and only the head runs.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        class_names: Sequence[str],
        finetune: Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        preprocess_overrides: Mapping[str, Any] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., dict[str, Any]] | None = None,
        load_pretrained: bool = True,
        mixup: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.class_names = list(class_names)
        num_classes = len(self.class_names)
        if num_classes < 2:
            raise ConfigError(
                f"one class to learn ({', '.join(self.class_names) or 'none'}); a classifier "
                "needs images in at least two class folders"
            )
        pretrained = load_pretrained and bool(model.get("pretrained", True))
        self.model = build_model(model, num_classes, pretrained=pretrained)
        self.finetune = build_finetune(finetune)
        self.finetune.setup(self.model)
        self.preprocess: AnyPreprocess = self.model.preprocess.resolve(preprocess_overrides)
        backbones = self.model.backbones()
        members = per_member(self.preprocess, len(backbones))
        for backbone, pre in zip(backbones, members, strict=True):
            fixed = backbone.fixed_input_size
            if fixed and pre.input_size != fixed:
                raise ConfigError(
                    f"data.image_size={pre.input_size}: {backbone.name} takes "
                    f"only {fixed} px inputs"
                )
        self.feature_inputs = False  # see `serve_features`
        # Set during the LR range test: the trainable parts stay as they are (its steps
        # may span a gradual policy's unfreeze epoch, and its optimizer is restored after).
        self.hold_trainable = False
        # The converged probe's chosen settings and search cost (`training.probe`), if any.
        self.probe: dict[str, Any] | None = None
        # The probe's L2 penalty on the head (`penalise_head`).
        self.head_l2 = 0.0
        self._penalised: list[torch.Tensor] = []
        # What a converged probe's search chose for the optimizer (`converge_head`).
        self._optimizer_overrides: dict[str, float] = {}
        self._scheduled = True
        # The backbone's precision when its features were cached: eval and predict match it.
        self.feature_precision = "fp32"
        self.label_smoothing = label_smoothing
        self.mixup = build_mixup(mixup, num_classes)
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = _split_metrics(num_classes, "val/")
        self.test_metrics = _split_metrics(num_classes, "test/")
        # Each ensemble member's share of the fused prediction on val (`fusions`).
        self.val_member_acc = ModuleList(
            MulticlassAccuracy(num_classes, average="micro") for _ in self.model.member_names()
        )
        self.last_val_members: dict[str, float] = {}
        self.val_acc_best = MaxMetric()
        self.best_epoch = -1
        self.last_val: dict[str, float] = {}
        self.last_test: dict[str, float] = {}
        # Set by `training.calibration.val_logits`: validation collects (logits, labels).
        self.collected: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        # The fitted calibration temperature a loaded checkpoint carries (1.0: none).
        self.temperature = 1.0
        # The binary operating point fitted on val (`training.binary`), when one was asked.
        self.operating_point: dict[str, Any] | None = None
        # The open-set detector a loaded checkpoint carries (`training.openset`), or None.
        self.open_set: dict[str, Any] | None = None
        # A `training.distill.Distillation` (the teacher), set by `run_training`; not saved.
        self.distill: Any = None

    # ------------------------------------------------------------------ steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _logits(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        x = split_teacher(x)[0]  # cached teacher logits are for the loss only
        return self.model.classify_features(x) if self.feature_inputs else self(x)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against class indices or, after Mixup/CutMix, soft targets (in
        fp32 like the logits, whatever the precision the images came in)."""
        target = y.float() if y.is_floating_point() else y
        return F.cross_entropy(
            logits.float(), target, weight=self.class_weights, label_smoothing=self.label_smoothing
        )

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor | None:
        x, y = batch
        if len(y) == 0:  # every file in the batch failed to load (listed in bad_files.csv)
            return None
        x, cached_teacher = split_teacher(x)
        target = y
        if self.mixup is not None and not self.feature_inputs:
            x, target = self.mixup(x, y)
        logits = self._logits(x)
        loss = self.loss(logits, target)
        if self.distill is not None:  # on a mixed batch the teacher sees the mixed images
            teacher = cached_teacher if cached_teacher is not None else self.distill.teacher(x)
            loss = self.distill.loss(loss, logits, teacher)
        loss = loss + l2_penalty([self._penalised], [self.head_l2])
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def serve_features(self, precision: str | None) -> None:
        """Batches are cached backbone features (computed in `precision`), or images again
        (None); eval and predict later run the backbone in the precision the head saw."""
        self.feature_inputs = precision is not None
        if precision is not None:
            self.feature_precision = precision

    def converge_head(
        self,
        features: CachedFeatures,
        plan: Any,
        sampler: str,
        views: str | None = None,
        decision: dict[str, Any] | None = None,
    ) -> tuple[ProbeResult, CachedFeatures]:
        """Choose the head's recipe, LR, L2 penalty and views on the training split of
        `features` (`plan`: the policy's `Convergence`; `views`: only that option, as a
        subset `decision` settled) and train with them from a zero start: returns the
        search's result and the features to serve (without the augmented views when the
        eval view won)."""
        zero_logit_layers(self.model)
        result = search_probe(self, features, plan.grid, plan.batch_size, sampler, views)
        result.views_decision = decision
        if result.recipe == "converged":  # its penalty is in the loss (`penalise_head`)
            self._optimizer_overrides = {"lr": result.lr, "weight_decay": 0.0}
            self.penalise_head(result.l2)
        else:  # the optimizer's own weight decay, at a constant LR
            self._optimizer_overrides = {"lr": result.lr}
        self._scheduled = result.scheduled
        self.probe = result.as_dict()
        if result.views == "eval":
            features = dataclasses.replace(features, train_store=None)
        return result, features

    def start_from(self, state: Mapping[str, Any], probe: dict[str, Any]) -> None:
        """Begin a stage that starts from the previous stage's best weights (`state`; LP-FT's
        probe run, described by `probe`): the policy sets the stage's trainable parts."""
        self.load_state_dict(state)
        self.probe = probe
        self.finetune.start_finetune(self.model)

    def learn_from(self, distillation: Any) -> None:
        """Train against a teacher (`training.distill.Distillation`; None: no teacher)."""
        self.distill = distillation

    @contextlib.contextmanager
    def collecting_val_logits(
        self,
    ) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Inside, validation collects (logits, labels, backbone features) into the yielded
        list instead of logging metrics (calibration's and the open-set fit's pass)."""
        self.collected = []
        try:
            yield self.collected
        finally:
            self.collected = None

    @contextlib.contextmanager
    def holding_trainable(self) -> Iterator[None]:
        """Inside, the trainable parts stay as they are whatever the epoch (the LR range
        test's steps may span a gradual policy's unfreeze epoch)."""
        self.hold_trainable = True
        try:
            yield
        finally:
            self.hold_trainable = False

    def use_lr(self, lr: float) -> None:
        """Train at `lr` instead of `optimizer.lr` (the LR finder's suggestion)."""
        self._optimizer_overrides = {**self._optimizer_overrides, "lr": float(lr)}

    def count_as_best(self, score: float) -> None:
        """A val accuracy reached before this fit's first epoch (the previous stage's) is the
        best so far: an epoch must beat it to become `best_epoch`."""
        self.val_acc_best(torch.tensor(score))

    def penalise_head(self, strength: float) -> None:
        """Train with the converged probe's L2 penalty: cross-entropy + strength/2 x the
        squared norm of the head's weights (`training.probe`)."""
        self.head_l2, self._penalised = strength, penalised(self.model)

    def _eval_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection
    ) -> None:
        x, y = batch
        if len(y) == 0:
            return
        x = split_teacher(x)[0]
        features = x if self.feature_inputs else self.model.features(x)
        logits = self.model.classify_features(features)
        loss = F.cross_entropy(logits.float(), y)
        metrics.update(logits, y)
        if metrics is self.val_metrics:
            members = self.model.member_logits(features)
            for metric, member in zip(self.val_member_acc, members, strict=True):
                metric.update(member, y)
        self.log(
            f"{metrics.prefix}loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
        )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        if self.collected is not None:
            x, y = batch
            if len(y):
                x = split_teacher(x)[0]
                features = x if self.feature_inputs else self.model.features(x)
                logits = self.model.classify_features(features).float().cpu()
                self.collected.append((logits, y.cpu(), features.float().cpu()))
            return
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def _log_epoch(self, metrics: MetricCollection) -> dict[str, float]:
        """Log scalars, per-class accuracy and the confusion matrix; return the scalars."""
        values = metrics.compute()
        metrics.reset()
        prefix = metrics.prefix
        confmat = values.pop(f"{prefix}confmat")
        per_class = values.pop(f"{prefix}acc_class")
        for name, acc in zip(self.class_names, per_class, strict=True):
            self.log(f"{prefix}acc_class/{name}", acc, sync_dist=True)
        for name, value in values.items():
            self.log(name, value, prog_bar=name == f"{prefix}acc", sync_dist=True)
        if not self.trainer.sanity_checking:
            self._log_confusion_matrix(prefix, confmat)
        return {k: float(v) for k, v in values.items()}

    def _log_confusion_matrix(self, prefix: str, confmat: torch.Tensor) -> None:
        import matplotlib.pyplot as plt

        from vision_tl.core.plots import confusion_matrix_figure

        if self.trainer.fast_dev_run:
            return
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                figure = confusion_matrix_figure(confmat.cpu(), self.class_names)
                experiment.add_figure(f"{prefix}confusion_matrix", figure, self.current_epoch)
                plt.close(figure)

    def on_validation_epoch_end(self) -> None:
        if self.collected is not None:
            return
        values = self._log_epoch(self.val_metrics)
        members = {}
        for name, metric in zip(self.model.member_names(), self.val_member_acc, strict=True):
            members[name] = float(metric.compute())
            metric.reset()
            self.log(f"val/acc_member/{name}", members[name], sync_dist=True)
        if self.trainer.sanity_checking:
            return
        self.last_val_members = members
        acc = values["val/acc"]
        # Before the first epoch, the best may already be set: LP-FT's probe start competes.
        previous = float(self.val_acc_best.compute()) if self.val_acc_best.update_called else -1.0
        if acc > previous:
            self.best_epoch = self.current_epoch
        self.val_acc_best(torch.tensor(acc))
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)
        self.last_val = values

    def on_test_epoch_end(self) -> None:
        self.last_test = self._log_epoch(self.test_metrics)

    # ------------------------------------------------------------------ fine-tuning

    def on_fit_start(self) -> None:
        if self.distill is not None:
            self.distill.teacher.to(self.device)

    def on_train_start(self) -> None:
        if self.mixup is not None and self.feature_inputs:
            log.info("Mixup/CutMix not applied: the batches are cached features, not images")
        if self.trainer.ckpt_path and self.scheduler_factory is not None:
            self._follow_configured_length(*self._schedule_length())

    def _follow_configured_length(self, total: int, epochs: int) -> None:
        """A resumed fit ends its LR schedule where this run's config says, not where the
        checkpoint's did: with a larger `trainer.max_epochs` the restored cosine would
        otherwise have ended already and the added epochs train at its final LR. Under a
        time budget the restored horizon stays: `TimeBudget` re-plans it after an epoch."""
        budgeted = any(isinstance(c, TimeBudget) for c in self.trainer.callbacks)
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
                if scheduler.total_steps < total:
                    raise ConfigError(
                        f"ckpt_path: its OneCycle schedule ends after {scheduler.total_steps} "
                        f"steps and cannot stretch to this run's {total}; resume with the "
                        "trainer.max_epochs it was started with (scheduler=cosine runs extend)"
                    )
                continue
            horizons = [fn for fn in getattr(scheduler, "lr_lambdas", []) if hasattr(fn, "replan")]
            if budgeted or not horizons or all(fn.total_steps == total for fn in horizons):
                continue
            was = horizons[0].total_steps
            for fn in horizons:
                fn.total_steps = total
            lrs = [
                base * fn(scheduler.last_epoch)
                for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
            ]
            for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            set_last_lr(scheduler, lrs)
            log.info(
                "Resumed: the LR schedule now ends with epoch %d (step %d; the checkpoint's "
                "ended at step %d)",
                epochs,
                total,
                was,
            )

    def _backbone_groups(
        self, keep: Callable[[torch.nn.Parameter], bool]
    ) -> list[tuple[list[torch.nn.Parameter], float]]:
        policy = self.finetune
        return backbone_param_groups(
            self.model.backbones(), policy.backbone_lr_mult, policy.layer_decay, keep
        )

    def on_train_epoch_start(self) -> None:
        if self.hold_trainable:
            return
        new = self.finetune.on_train_epoch_start(self.model, self.current_epoch)
        if new and self.trainer.optimizers:
            schedulers = [c.scheduler for c in self.trainer.lr_scheduler_configs]
            ids = {id(p) for p in new}
            for params, scale in self._backbone_groups(lambda p: id(p) in ids):
                add_param_group(self.trainer.optimizers[0], schedulers, params, scale)
        if new:
            log.info("Epoch %d: %d more tensors train", self.current_epoch, len(new))

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise RuntimeError("ClassificationTask needs an optimizer factory to train")
        head = [p for p in self.model.head_parameters() if p.requires_grad]
        backbone = self._backbone_groups(lambda p: p.requires_grad)
        groups = [{"params": head}, *({"params": params} for params, _ in backbone)]
        optimizer = self.optimizer_factory(params=groups, **self._optimizer_overrides)
        for group, (_, scale) in zip(optimizer.param_groups[1:], backbone, strict=True):
            group["lr"] *= scale
        if self.scheduler_factory is None or not self._scheduled:
            return optimizer
        total, epochs = self._schedule_length()
        scheduler = self.scheduler_factory(
            optimizer, total_steps=total, steps_per_epoch=max(1, total // epochs)
        )
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def _schedule_length(self) -> tuple[int, int]:
        """(optimizer steps, epochs) the LR schedule spans.

        With `trainer.max_epochs=-1` only `trainer.max_time` (or `max_steps`) ends the fit
        (`validate` requires one): the schedule is laid out over `OPEN_ENDED_EPOCHS` epochs,
        and `TimeBudget` moves a cosine's end to the epochs that fit after the first one.
        """
        trainer = self.trainer
        total = trainer.estimated_stepping_batches
        if trainer.fast_dev_run:
            return max(1, int(total)), 1
        if trainer.max_epochs != -1:
            return max(1, int(total)), max(1, trainer.max_epochs or 1)
        if trainer.train_dataloader is None:
            trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        per_epoch = (
            1 if math.isinf(batches) else math.ceil(batches / trainer.accumulate_grad_batches)
        )
        per_epoch = max(1, per_epoch)
        if math.isinf(total):
            total = per_epoch * OPEN_ENDED_EPOCHS
        return max(1, int(total)), max(1, int(total) // per_epoch)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["hyper_parameters"]["load_pretrained"] = False
        checkpoint["vision_tl"] = {
            "format": CHECKPOINT_FORMAT,
            "class_names": self.class_names,
            "class_to_idx": {name: i for i, name in enumerate(self.class_names)},
            "preprocess": self.preprocess.to_dict(),
            "best_epoch": self.best_epoch,
            "val_acc_best": float(self.val_acc_best.compute()) if self.best_epoch >= 0 else None,
        }
        if self.probe is not None:
            checkpoint["vision_tl"]["probe"] = self.probe
        checkpoint["vision_tl"]["feature_precision"] = self.feature_precision
        trainer = self._attached_trainer()
        if trainer is not None:
            configs = trainer.lr_scheduler_configs
            checkpoint["vision_tl"]["schedulers"] = [type(c.scheduler).__name__ for c in configs]

    def _attached_trainer(self) -> L.Trainer | None:
        """The trainer running this task; None when there is none (loading for inference),
        where Lightning's `trainer` property raises."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def _take_saved_preprocess(self, saved: AnyPreprocess) -> None:
        """Loading for inference: what the run used travels with its weights. Resuming a fit:
        the datamodule and the feature cache already hold the resolved object, so it stays."""
        if self._attached_trainer() is None:
            self.preprocess = saved
        elif saved != self.preprocess:
            log.warning(
                "Resuming with other preprocessing than the checkpoint's: %s",
                "; ".join(self.preprocess.differences(saved)),
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Runs before the weights load: older layouts are upgraded in place first."""
        facts = SavedFacts.of(upgrade_checkpoint(checkpoint))
        if facts.preprocess:
            self._take_saved_preprocess(load_preprocess(facts.preprocess))
        self.best_epoch = facts.best_epoch
        self.probe = facts.probe
        self.feature_precision = facts.feature_precision
        self.temperature = facts.temperature
        self.operating_point = facts.operating_point
        self.open_set = facts.open_set
        if facts.val_acc_best is not None:
            self.val_acc_best(torch.tensor(facts.val_acc_best))
        self.finetune.resume(self.model, int(checkpoint.get("epoch", 0)))


def load_task(ckpt_path: str | Path | None, key: str = "ckpt_path") -> ClassificationTask:
    """A `vision_tl.train` checkpoint as its task, on the CPU, weights only (no pickled code
    runs), upgraded from older layouts; a missing, corrupt or foreign file is a one-line
    `ConfigError` naming `key`, not a traceback.

    The network is built with random weights and then given the checkpoint's, whatever
    its saved settings say (`load_pretrained`, `model.pretrained`, a `weights_path`): a
    checkpoint, edited or not, never makes loading download or read another file."""
    path = checkpoint_path(ckpt_path, key)
    try:
        return ClassificationTask.load_from_checkpoint(
            path, map_location="cpu", weights_only=True, load_pretrained=False
        )
    except Exception as err:
        raise unloadable(path, err) from err


def check_resume(ckpt_path: str | Path, task: ClassificationTask) -> None:
    """Fail in one line, before any training, when `ckpt_path` cannot continue the run
    `task` starts: unreadable, trained on other classes, another LR scheduler or another
    network. Lightning would stop on a traceback (a size mismatch, an unpickling error)
    after the setup, or silently change the schedule."""
    path = Path(ckpt_path).expanduser().resolve()
    try:  # memory-mapped: only shapes are compared, the fit reads the weights
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise unloadable(path, err) from err
    upgrade_checkpoint(checkpoint)
    meta = checkpoint.get("vision_tl", {})
    saved = meta.get("class_names")
    if saved is not None and list(saved) != list(task.class_names):
        raise ConfigError(
            f"ckpt_path={path}: it was trained on the classes {list(saved)}, this data has "
            f"{list(task.class_names)}; a resumed run needs the same classes"
        )
    _check_scheduler(meta.get("schedulers"), task.scheduler_factory)
    theirs, ours = checkpoint.get("state_dict", {}), task.state_dict()
    differ = [
        f"{key}: {_shape(theirs.get(key))} in the checkpoint, {_shape(ours.get(key))} here"
        for key in [*ours, *(k for k in theirs if k not in ours)]
        if _shape(theirs.get(key)) != _shape(ours.get(key))
    ]
    if differ:
        more = f", and {len(differ) - 1} more" if len(differ) > 1 else ""
        raise ConfigError(
            f"ckpt_path={path}: its network is not this run's: {differ[0]}{more}; resume "
            "with the model= it was trained with"
        )


def _check_scheduler(saved: list[str] | None, factory: Callable[..., Any] | None) -> None:
    """Resuming with another `scheduler=` than the run started with would load one
    scheduler's state into another and fail at its first step, mid-epoch, or silently drop
    or restart the schedule. (Checkpoints written before the names were saved: unchecked.)"""
    if saved is None:
        return
    now = None
    if factory is not None:
        probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        now = type(factory(probe, total_steps=2, steps_per_epoch=1)["scheduler"]).__name__
    was = saved[0] if saved else None
    if was != now:
        raise ConfigError(
            f"ckpt_path: the checkpoint's run used {f'the {was}' if was else 'no'} LR scheduler, "
            f"this run {now or 'none'}; resume with the scheduler= it was started with"
        )


def _shape(value: Any) -> str:
    return "absent" if value is None else str(list(getattr(value, "shape", [])))
