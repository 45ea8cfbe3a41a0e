"""`run_training(cfg)`: build data, model and trainer from a composed config, fit, report."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import psutil
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from vision_tl.core.errors import ConfigError
from vision_tl.core.io import write_csv, write_json, write_text
from vision_tl.core.launch import launch_from_trainer
from vision_tl.core.logs import quiet_third_party
from vision_tl.core.signals import Interrupted, pending, safe_points, stop_if_signalled
from vision_tl.core.stats import format_interval, with_intervals
from vision_tl.data.decode import ReadLimits
from vision_tl.data.source import Source
from vision_tl.training.build import Run, build_run, plain
from vision_tl.training.calibration import calibrate_run
from vision_tl.training.callbacks import (
    EpochHistory,
    FailedFilesGuard,
    FeatureCache,
    PreviousStageCompetes,
    StopOnSignal,
    TrainThroughput,
    TrialPruning,
)
from vision_tl.training.checkpoints import with_atomic_checkpoints
from vision_tl.training.distill import build_distillation, distill_report
from vision_tl.training.distributed import cluster_plugins, use_hydra_rank_command
from vision_tl.training.finetune import Stage, build_finetune
from vision_tl.training.openset import OpenSetSettings
from vision_tl.training.recipes import TimeBudget, build_ema, find_lr, lr_find_skip_reason
from vision_tl.training.task import ClassificationTask, check_resume

log = logging.getLogger(__name__)

# Writes predictions for `cfg.predict_input` with a checkpoint into the run dir; handed in by
# the entry point (`inference.predict.predict_for_run`) so training never imports inference.
PredictFn = Callable[[DictConfig, str, Path], Path]
# Opens Optuna trial N of this job's study (on rank 0), for a run that is one (`cfg.trial`);
# handed in by the entry point (`sweeps.study.open_job_trial`), as `PredictFn` is.
OpenTrialFn = Callable[[int], Any]


def check_precision(precision: Any, accelerator: Any) -> None:
    """Fail at start, in one line, on a precision the chosen device cannot run (the value
    itself is checked with the config: `training.rules`)."""
    value = str(precision)
    device = str(accelerator)
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = "gpu"
    if value.startswith("16") and device != "gpu":
        raise ConfigError(
            f"trainer.precision={value} needs a GPU (accelerator is {device}); "
            "use bf16-mixed or 32 on CPU"
        )
    if value.startswith("bf16") and device == "gpu" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"trainer.precision={value}: this GPU has no bfloat16 support; use 16-mixed"
        )


class PeakMemory:
    """Peak resident memory of this process during a block (sampled), and peak CUDA memory.

    Sampling per block rather than `ru_maxrss` keeps sweep jobs that share a process
    (Hydra's basic launcher) from inheriting each other's peaks.
    """

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        process = psutil.Process()
        while True:
            self.peak_rss = max(self.peak_rss, process.memory_info().rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def as_dict(self) -> dict[str, float | None]:
        gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None
        return {
            "peak_rss_mb": round(self.peak_rss / 2**20, 1),
            "peak_gpu_mem_mb": round(gpu, 1) if gpu else None,
        }


def final_accuracies(last_epoch: dict[str, float], last_val: dict[str, float]) -> dict[str, Any]:
    """Last epoch's train and val accuracy and their gap: the overfitting signal of a sweep."""

    def number(value: Any) -> float | None:
        return None if value is None or math.isnan(float(value)) else float(value)

    train = number(last_epoch.get("train_acc"))
    val = number(last_epoch.get("val_acc", last_val.get("val/acc")))
    gap = None if train is None or val is None else round(train - val, 6)
    return {"final_train_acc": train, "final_val_acc": val, "train_val_gap": gap}


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    return [instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


def stage_config(cfg: DictConfig, stage: Stage) -> DictConfig:
    """The config of a stage that runs as its own run (`Stage.finetune`; LP-FT's probe):
    this run with the stage's policy, in `<run dir>/<stage.subdir>`, without what only the
    final model needs (EMA, a time budget, the LR finder, testing and predictions)."""
    finetune = dict(stage.finetune or {})
    run = copy.deepcopy(cfg)
    with open_dict(run):
        run.finetune = finetune
        run.paths.output_dir = str(Path(cfg.paths.output_dir) / (stage.subdir or stage.name))
        run.ckpt_path = None
        run.test = False
        run.predict_input = None
        run.lr_find = False
        run.trial = None  # an Optuna trial is judged on its final stage only
        run.trainer.max_time = None
        if run.trainer.get("max_epochs") == -1:  # the budget bounds the final stage
            run.trainer.max_epochs = int(finetune["epochs"])
        if run.get("ema") is not None:
            run.ema.decay = None
    return run


def run_training(
    cfg: DictConfig,
    predict: PredictFn | None = None,
    source: Source | None = None,
    open_trial: OpenTrialFn | None = None,
) -> dict[str, Any]:
    """Run the fine-tune policy's plan (`FinetunePolicy.plan`), one fit per stage: a stage
    with a policy of its own (LP-FT's probe) runs into its own folder first and the next
    stage starts from its best weights. The last stage is this run: it trains, tests (if a
    test split exists), with `cfg.predict_input` has `predict` label those images with the
    best checkpoint, and writes `metrics.json` into the run dir last. `source`: read the
    data from it instead of `cfg.data`'s (a cross-validation fold, `sweeps.cv`). A run
    that is an Optuna trial (`cfg.trial`) reports to it with `open_trial` in its last
    stage only."""
    if cfg.get("predict_input") and predict is None:
        raise ConfigError("predict_input is set but no predict step was given to run_training")
    quiet_third_party()  # as under the command line, for callers of the Python API
    check_precision(cfg.trainer.get("precision", "32"), cfg.trainer.get("accelerator", "auto"))
    use_hydra_rank_command()
    *earlier, final = build_finetune(plain(cfg.finetune)).plan()
    run = _prepare(cfg, final, source)
    resuming = bool(cfg.get("ckpt_path"))  # the checkpoint holds the last stage's weights
    previous: tuple[float | None, dict[str, Any]] | None = None
    for stage in [] if resuming else earlier:
        start = time.perf_counter()
        stage_cfg = stage_config(cfg, stage)
        try:
            metrics, task = _fit(stage_cfg, _prepare(stage_cfg, stage, source), stage, None)
        except Interrupted as stop:  # a resumed run starts after the earlier stages: redo it
            stop.checkpoint = None
            raise
        previous = _handover(metrics, task, stage_cfg, time.perf_counter() - start)
    return _fit(cfg, run, final, predict, previous, open_trial)[0]


def _handover(
    metrics: dict[str, Any], task: ClassificationTask, cfg: DictConfig, seconds: float
) -> tuple[float | None, dict[str, Any]]:
    """(score, probe record) a stage hands the next one; its best weights go with the
    record (`state`), read from its best checkpoint."""
    best = metrics["best_checkpoint"]
    state = (
        torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        if best
        else task.state_dict()
    )
    record = {
        **(metrics["probe"] or {}),
        "probe_val_acc": metrics["best_val_acc"],
        "probe_phase_s": round(seconds, 3),
        "probe_run": str(cfg.paths.output_dir),
    }
    log.info(
        "LP-FT probe stage done in %.1f s (val acc %s, run in %s); now everything fine-tunes",
        record["probe_phase_s"],
        metrics["best_val_acc"],
        record["probe_run"],
    )
    return metrics["best_val_acc"], {"record": record, "state": state}


def fit_device(trainer: dict[str, Any]) -> torch.device:
    """The device this process will fit on, from the trainer's config, before the Trainer
    exists (the feature cache runs the backbone there): under DDP each process's own GPU."""
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", launch_from_trainer(trainer).local_rank)
    return torch.device("cpu")


def _prepare(cfg: DictConfig, stage: Stage, source: Source | None = None) -> Run:
    """Seed, build the stage's run (`build_run`), check a resume, then write the run's
    config, split and bad-file list (only now: a refused resume leaves its files as they
    were)."""
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    run = build_run(cfg, source=source, lr_scale=stage.lr_scale)
    task, datamodule = run.task, run.datamodule
    task.learn_from(build_distillation(cfg.get("distill"), task.class_names, task.preprocess))
    log.info("Preprocess: %s", task.preprocess)
    if cfg.get("ckpt_path"):
        check_resume(cfg.ckpt_path, task)
    main_process = rank_zero_only.rank == 0
    if main_process:
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        write_csv(datamodule.catalog.to_frame(), run_dir / "split.csv", index=False)
    datamodule.write_bad_files(run_dir / "bad_files.csv", write=main_process)
    return run


def _last_checkpoint(callbacks: list[Any], run_dir: Path) -> Path:
    """Where the run's `last.ckpt` goes: the checkpoint callback without a monitor's file."""
    latest = next(
        (c for c in callbacks if isinstance(c, ModelCheckpoint) and not c.monitor and c.dirpath),
        None,
    )
    if latest is None:
        return run_dir / "checkpoints" / "last.ckpt"
    return Path(latest.dirpath) / f"{latest.filename or 'last'}{latest.FILE_EXTENSION}"


def _fit_until_signalled(
    trainer: L.Trainer,
    task: ClassificationTask,
    datamodule: L.LightningDataModule,
    ckpt_path: str | None,
) -> None:
    """`trainer.fit`, stopping at its next safe point on SIGTERM or SIGINT (`core.signals`,
    `StopOnSignal` saves the state there) with `Interrupted`."""
    with safe_points():
        try:
            trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except SIGTERMException:  # Lightning's stop at a safe point (SIGINT's too)
            raise Interrupted(pending() or signal.SIGTERM) from None
        stop_if_signalled()  # it came during the last batch: stop before calibrating


@contextlib.contextmanager
def _resumable_from(stop: StopOnSignal, run_dir: Path) -> Iterator[None]:
    """An `Interrupted` raised within names the checkpoint to resume from: the state saved
    at the signal, else the run's `last.ckpt` when there is one (a signal after the fit,
    or before a resumed fit starts); with neither, the run starts again."""
    try:
        yield
    except Interrupted as interrupted:
        saved = stop.saved or (str(stop.path) if stop.path.is_file() else None)
        interrupted.checkpoint, interrupted.run_dir = saved, str(run_dir)
        raise


def _fit(
    cfg: DictConfig,
    run: Run,
    stage: Stage,
    predict: PredictFn | None,
    previous: tuple[float | None, dict[str, Any]] | None = None,
    open_trial: OpenTrialFn | None = None,
) -> tuple[dict[str, Any], ClassificationTask]:
    """Fit one stage (from the previous stage's best, when it hands one over), calibrate,
    test, report."""
    run_dir = Path(cfg.paths.output_dir)
    task, datamodule = run.task, run.datamodule
    starts: list[L.Callback] = []
    if previous is not None and stage.from_previous:
        score, handed = previous
        task.start_from(handed["state"], handed["record"])
        starts = [PreviousStageCompetes(score)] if score is not None else []

    # Decided before the fit: the score the calibration fits afterwards (`auto`: the pool's
    # when the run has one).
    open_set = OpenSetSettings.from_config(
        cfg.get("open_set"), cfg.data.get("unlabeled"), ReadLimits.from_config(cfg.data)
    )
    callbacks = _instantiate_all(cfg.get("callbacks"))
    throughput = TrainThroughput()
    history = EpochHistory(run_dir / "history.csv")
    loggers = _instantiate_all(cfg.get("logger"))
    if not loggers:  # nothing would receive the LR curve (Lightning refuses the pairing)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    budget = TimeBudget() if cfg.trainer.get("max_time") else None
    ema = build_ema(cfg.get("ema"))
    cache = FeatureCache.plan(
        run.data.feature_spec,
        task.finetune,
        stage,
        datamodule.augment,
        bool(cfg.trainer.get("fast_dev_run")),
    )
    # After FeatureCache: EMA copies the task once the fit's setup has shaped it.
    recipes = [c for c in (budget, ema) if c is not None]
    stop = StopOnSignal(_last_checkpoint(callbacks, run_dir))
    ours = [*([cache] if cache else []), *starts, *recipes, FailedFilesGuard(), throughput]
    ours += [history, stop]
    pruning = None
    if cfg.get("trial") is not None and open_trial is not None:
        pruning = TrialPruning(cfg.trial, open_trial)
        ours.append(pruning)
    # Lightning's Timer reads a dict `max_time` only as a plain dict.
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    length: dict[str, Any] = {"max_time": trainer_args.get("max_time")}
    if cache is not None:  # features and a converging head's recipe, before the Trainer
        length.update(cache.prepare(task, datamodule, fit_device(trainer_args)))
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=[*callbacks, *ours],
        logger=loggers,
        plugins=[
            *with_atomic_checkpoints(cfg.trainer.get("plugins")),
            *cluster_plugins(launch_from_trainer(cfg.trainer)),
        ],
        **length,
    )

    with _resumable_from(stop, run_dir), PeakMemory() as memory:
        start = time.perf_counter()
        ckpt_path = cfg.get("ckpt_path")
        lr_suggestion = None
        if cfg.get("lr_find"):
            skip = lr_find_skip_reason(task, bool(ckpt_path), bool(trainer.fast_dev_run))
            if skip:
                log.info("lr_find skipped: %s", skip)
            else:
                lr_suggestion = find_lr(
                    trainer, task, datamodule, run_dir, int(cfg.get("lr_find_steps", 100))
                )
        _fit_until_signalled(trainer, task, datamodule, ckpt_path)
        train_time = time.perf_counter() - start

        val_loss = trainer.callback_metrics.get("val/loss")
        checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        checkpoint = next((c for c in checkpoints if c.monitor), None)
        latest = next((c for c in checkpoints if not c.monitor), None)
        best_path = checkpoint.best_model_path if checkpoint else ""
        last_path = getattr(latest, "best_model_path", "") or ""
        saved = [p for p in dict.fromkeys((best_path, last_path)) if p and Path(p).is_file()]
        operating = OmegaConf.to_container(cfg.get("operating_point") or {}, resolve=True)
        calibration = calibrate_run(
            trainer,
            task,
            datamodule,
            best_path or None,
            saved,
            operating,
            open_set,
            int(cfg.get("seed") or 0),
        )
        if cfg.get("test") and datamodule.has_test:
            best = best_path or None
            trainer.test(task, datamodule=datamodule, ckpt_path=best, weights_only=True)

    best_score = checkpoint.best_model_score if checkpoint else None
    sizes = {split: len(rows) for split, rows in datamodule.catalog.samples.items()}
    metrics: dict[str, Any] = {
        "best_val_acc": float(best_score)
        if best_score is not None
        else task.last_val.get("val/acc"),
        "best_epoch": task.best_epoch,
        "epochs": trainer.current_epoch,
        "num_classes": len(task.class_names),
        "split_sizes": sizes,
        "params": sum(p.numel() for p in task.model.parameters()),
        "feature_dim": sum(b.num_features for b in task.model.backbones()),
        "class_names": task.class_names,
        "train_time_s": round(train_time, 3),
        "train_images_per_s": round(throughput.images_per_second * trainer.world_size, 2),
        "world_size": trainer.world_size,
        "precision": str(trainer.precision),
        **final_accuracies(history.last, task.last_val),
        **memory.as_dict(),
        "best_checkpoint": best_path or None,
        "last_checkpoint": last_path or None,
        "val_loss": float(val_loss) if val_loss is not None else None,
        "preprocess": task.preprocess.to_dict(),
        "probe": task.probe,
        "lr_find_suggestion": lr_suggestion,
        "planned_epochs": budget.planned_epochs if budget else None,
        "pruned_epoch": pruning.pruned_epoch if pruning is not None else None,
        **calibration,
        "feature_precision": task.feature_precision,
        **{k.replace("/", "_"): v for k, v in task.last_val.items()},
        # Each ensemble member's share of the fused model, next to the fused `val_acc`.
        "val_acc_members": task.last_val_members or None,
        **{k.replace("/", "_"): v for k, v in task.last_test.items()},
    }
    if task.distill is not None and trainer.is_global_zero and not trainer.fast_dev_run:
        metrics["distill"] = distill_report(task, datamodule, metrics["best_val_acc"])
    if predict and cfg.get("predict_input") and trainer.is_global_zero and not trainer.fast_dev_run:
        ckpt = best_path or metrics["last_checkpoint"]
        metrics["predictions"] = str(predict(cfg, ckpt, run_dir))
    metrics = with_intervals(metrics, sizes)  # each accuracy with its 95% interval
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
        log.info(
            "best val acc %.4f (95%% interval %s, %d images; epoch %d); metrics in %s",
            metrics["best_val_acc"] or 0.0,
            format_interval(metrics.get("best_val_acc_ci95")),
            sizes.get("val", 0),
            metrics["best_epoch"],
            run_dir / "metrics.json",
        )
    return metrics, task
