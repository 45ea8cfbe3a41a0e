"""`run_training(cfg)`: build data, model and trainer from a composed config, fit, report."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from vision_tl.callbacks import TrainThroughput
from vision_tl.data import ImageFolderDataModule
from vision_tl.errors import ConfigError
from vision_tl.task import ClassificationTask

log = logging.getLogger(__name__)

PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "64", "64-true")


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically, so a reader never sees a half-written file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def class_weights(spec: Any, counts: list[int]) -> list[float] | None:
    """`None`, `auto` (inverse frequency, mean 1) or an explicit list, one weight per class."""
    if spec is None:
        return None
    if spec == "auto":
        if min(counts) == 0:
            raise ConfigError("loss.class_weights=auto needs every class in the training split")
        inverse = [1.0 / c for c in counts]
        scale = len(counts) / sum(inverse)
        return [w * scale for w in inverse]
    weights = [float(w) for w in spec]
    if len(weights) != len(counts):
        raise ConfigError(f"loss.class_weights has {len(weights)} values for {len(counts)} classes")
    return weights


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    return [instantiate(c) for c in (group or {}).values() if c is not None and "_target_" in c]


def run_training(cfg: DictConfig) -> dict[str, Any]:
    """Train and (if a test split exists) test; write `metrics.json` into the run dir."""
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if str(cfg.trainer.get("precision", "32")) not in PRECISIONS:
        raise ConfigError(
            f"trainer.precision={cfg.trainer.precision} is not one of {', '.join(PRECISIONS)}"
        )
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    datamodule: ImageFolderDataModule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.split_frame().to_csv(run_dir / "split.csv", index=False)

    task = ClassificationTask(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        class_names=datamodule.class_names,
        finetune=OmegaConf.to_container(cfg.finetune, resolve=True),
        label_smoothing=cfg.loss.label_smoothing,
        class_weights=class_weights(cfg.loss.get("class_weights"), datamodule.class_counts()),
        preprocess_overrides=datamodule.overrides,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
    )
    datamodule.set_preprocess(task.model.preprocess)
    log.info("Preprocess: %s", datamodule.preprocess)

    callbacks = _instantiate_all(cfg.get("callbacks"))
    throughput = TrainThroughput()
    loggers = _instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=[*callbacks, throughput], logger=loggers
    )

    start = time.perf_counter()
    trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    train_time = time.perf_counter() - start

    val_loss = trainer.callback_metrics.get("val/loss")
    checkpoints = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    checkpoint = next((c for c in checkpoints if c.monitor), None)
    latest = next((c for c in checkpoints if not c.monitor), None)
    best_path = checkpoint.best_model_path if checkpoint else ""
    if cfg.get("test") and datamodule.has_test:
        trainer.test(task, datamodule=datamodule, ckpt_path=best_path or None, weights_only=True)

    best_score = checkpoint.best_model_score if checkpoint else None
    metrics: dict[str, Any] = {
        "best_val_acc": float(best_score)
        if best_score is not None
        else task.last_val.get("val/acc"),
        "best_epoch": task.best_epoch,
        "epochs": trainer.current_epoch,
        "num_classes": len(task.class_names),
        "class_names": task.class_names,
        "train_time_s": round(train_time, 3),
        "train_images_per_s": round(throughput.images_per_second, 2),
        "best_checkpoint": best_path or None,
        "last_checkpoint": getattr(latest, "best_model_path", "") or None,
        "val_loss": float(val_loss) if val_loss is not None else None,
        "preprocess": datamodule.preprocess.to_dict(),
        **{k.replace("/", "_"): v for k, v in task.last_val.items()},
        **{k.replace("/", "_"): v for k, v in task.last_test.items()},
    }
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
        log.info(
            "best val acc %.4f (epoch %d); metrics in %s",
            metrics["best_val_acc"] or 0.0,
            metrics["best_epoch"],
            run_dir / "metrics.json",
        )
    return metrics
