"""Real photos and real pretrained weights from ../shared: the integration check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import HYMENOPTERA, SHARED_WEIGHTS

from vision_tl.training.train import run_training

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (HYMENOPTERA.is_dir() and SHARED_WEIGHTS.is_file()), reason="../shared absent"
    ),
]


def test_efficientnet_lite0_linear_probe_on_hymenoptera(compose_train, tmp_path: Path) -> None:
    """The README's contract line, the head shortened to 30 epochs: pretrained features must
    carry it."""
    overrides = [
        f"data.root={HYMENOPTERA}",
        "model.backbone.name=timm/tf_efficientnet_lite0",
        f"model.backbone.weights_path={SHARED_WEIGHTS}",
        "finetune=linear_probe",
        "finetune.epochs=30",
        "trainer.accelerator=cpu",
        "callbacks.rich_progress_bar=null",
        "+trainer.enable_progress_bar=false",
        "data.num_workers=2",
    ]
    metrics = run_training(compose_train(overrides, tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["num_classes"] == 2 and saved["class_names"] == ["ants", "bees"]
    assert saved["preprocess"]["interpolation"] == "bicubic"
    assert saved["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert metrics["best_val_acc"] >= 0.9
