"""Every experiment config: it says what its recipe says, and it trains (fast dev run)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import TINY_ANY_MODEL, make_image_folder
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from vision_tl.core.config import config_dir
from vision_tl.inference.predict import predict_for_run
from vision_tl.training.train import run_training

EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))

# What each recipe must set (dotted config keys), checked on the composed config.
RECIPES: dict[str, dict[str, Any]] = {
    "competition_resnet50_mlp": {
        "model.backbone.name": "resnet50",
        "model.head.name": "mlp",
        "model.head.hidden": [512],
        "model.head.dropout": 0.5,
        "optimizer._target_": "torch.optim.Adam",
        "optimizer.weight_decay": 1.0e-4,
        "scheduler._target_": "vision_tl.training.optim.step_lr",
        "scheduler.step_size": 5,
        "scheduler.gamma": 0.1,
        "data.image_size": 224,
        "data.mean": [0.485, 0.456, 0.406],
        "data.std": [0.229, 0.224, 0.225],
        "callbacks.model_checkpoint.monitor": "val/acc",
    },
    "imbalanced_resnet50": {
        "model.backbone.name": "resnet50",
        "finetune.mode": "full",
        "optimizer._target_": "torch.optim.AdamW",
        "data.batch_size": 32,
        "data.val_fraction": 0.15,
        "loss.class_weights": "auto",
        "trainer.max_epochs": 10,
    },
    "documents_resnet50_partial": {
        "model.backbone.name": "resnet50",
        "finetune.mode": "partial",
        "finetune.trainable_stages": 2,
        "optimizer._target_": "torch.optim.Adam",
        "data.image_size": 200,
        "data.resize_mode": "pad",
        "data.augment": "documents",
        "data.batch_size": 8,
        "trainer.max_epochs": 10,
    },
    "binary_resnet18_finetune": {
        "model.backbone.name": "resnet18",
        "finetune.mode": "full",
        "optimizer._target_": "torch.optim.SGD",
        "optimizer.momentum": 0.9,
        "optimizer.lr": 1.0e-3,
        "scheduler.step_size": 7,
        "scheduler.gamma": 0.1,
        "data.batch_size": 4,
        "data.augment": "flip_crop",
        "trainer.max_epochs": 25,
    },
    "binary_resnet18_features": {
        "model.backbone.name": "resnet18",
        "finetune.mode": "linear_probe",
        "finetune.search": False,
        "optimizer._target_": "torch.optim.SGD",
        "scheduler.step_size": 7,
        "data.batch_size": 4,
        "trainer.max_epochs": 25,
    },
    "ensemble_logits_grid": {
        "model.members": ["resnet50", "mobilenet_v2"],
        "model.fusion": "logits",
        "finetune.mode": "linear_probe",
        "finetune.search": False,
        "hydra.sweeper.params": {"data.batch_size": "4,8", "optimizer.lr": "0.01,0.001"},
    },
    "ensemble_features_grid": {
        "model.members": ["resnet50", "mobilenet_v2"],
        "model.fusion": "features",
        "model.head.layer_norm": True,
        "finetune.mode": "linear_probe",
        "finetune.search": False,
        "hydra.sweeper.params": {"data.batch_size": "4,8", "optimizer.lr": "0.01,0.001"},
    },
    "ensemble_features": {"model.fusion": "features", "finetune.mode": "linear_probe"},
    "hymenoptera_probe": {
        "model.backbone.name": "timm/tf_efficientnet_lite0",
        "finetune.mode": "linear_probe",
        "finetune.search": True,
    },
    "finetune_strong": {
        "finetune.mode": "lp_ft",
        "finetune.layer_decay": 0.75,
        "ema.decay": 0.999,
        "mixup.prob": 1.0,
        "loss.label_smoothing": 0.1,
    },
    "distill_ensemble": {
        "model.backbone.name": "mobilenet_v2",
        "finetune.mode": "lp_ft",
        "distill.alpha": 0.7,
        "distill.teacher": "TEACHER/checkpoints/best.ckpt",
    },
}

# Overrides an experiment needs to train on tiny data here: distill_ensemble's teacher is a
# placeholder the user replaces (distillation itself: tests/test_distill.py).
TRAIN_OVERRIDES: dict[str, list[str]] = {"distill_ensemble": ["distill.teacher=null"]}


def test_every_experiment_has_a_recipe_check() -> None:
    assert set(EXPERIMENTS) == set(RECIPES)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_sets_its_recipe(name: str) -> None:
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose(
            "train", overrides=[f"experiment={name}", "data.root=/data"], return_hydra_config=True
        )
    for key, expected in RECIPES[name].items():
        value = OmegaConf.select(cfg, key)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        assert value == expected, f"{name}: {key} = {value!r}, recipe says {expected!r}"


@pytest.mark.integration
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_trains(compose_train, image_folder: Path, tmp_path: Path, name: str) -> None:
    cfg = compose_train(
        [
            f"experiment={name}",
            *TINY_ANY_MODEL,
            f"data.root={image_folder}",
            "data.image_size=48",
            "data.resize_size=56",
            "data.batch_size=4",
            "trainer.fast_dev_run=true",
            *TRAIN_OVERRIDES.get(name, []),
        ],
        tmp_path,
    )
    metrics = run_training(cfg, predict=predict_for_run)
    assert metrics["num_classes"] == 3
    assert (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_competition_recipe_writes_predictions_for_the_unlabeled_test_folder(
    compose_train, tmp_path: Path
) -> None:
    """Kaggle layout: train/<class>/ labelled, test/ a flat folder of unlabelled images."""
    root = make_image_folder(tmp_path / "data", splits=("train",), per_class=6, size=40)
    unlabeled = root / "test"
    unlabeled.mkdir()
    for i, image in enumerate(sorted((root / "train").glob("*/*.png"))[::3]):
        shutil.copy(image, unlabeled / f"img_{i:03d}.png")
    cfg = compose_train(
        [
            "experiment=competition_resnet50_mlp",
            *TINY_ANY_MODEL,
            f"data.root={root}",
            "trainer.max_epochs=1",
            "data.image_size=48",
            "data.resize_size=56",
        ],
        tmp_path / "run",
    )
    metrics = run_training(cfg, predict=predict_for_run)
    predictions = pd.read_csv(metrics["predictions"])
    assert sorted(Path(p).name for p in predictions["path"]) == sorted(
        p.name for p in unlabeled.iterdir()
    )
    assert set(predictions["label"]) <= {"cat", "dog", "fox"}
    probs = predictions[["prob_cat", "prob_dog", "prob_fox"]].sum(axis=1)
    assert (probs - 1).abs().max() < 1e-4
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").exists()
