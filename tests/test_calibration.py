"""Temperature scaling: the fit recovers a known temperature, a run stores it in its
checkpoints and metrics.json, and eval and predict apply it (unless calibrate=false)
without changing any predicted class."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_image_folder
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from vision_tl.core.config import config_dir
from vision_tl.inference.checkpoint import load_checkpoint
from vision_tl.inference.eval import run_eval
from vision_tl.inference.export import model_card
from vision_tl.inference.predict import run_predict
from vision_tl.inference.serving.scorer import build_scorer
from vision_tl.training import calibration
from vision_tl.training.calibration import (
    KEYS,
    calibrate_run,
    calibration_report,
    ece,
    fit_temperature,
    nll,
    store_calibration,
)
from vision_tl.training.compat import SavedFacts
from vision_tl.training.train import run_training


def _synthetic(temperature: float, n: int = 4000, classes: int = 5) -> tuple:
    """Labels drawn from softmax(z); the model reports z * temperature, so dividing by the
    temperature is exactly the calibration."""
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(n, classes, generator=generator) * 2.0
    target = torch.multinomial(z.softmax(1), 1, generator=generator)[:, 0]
    return z * temperature, target


# --------------------------------------------------------------------------- unit


@pytest.mark.unit
@pytest.mark.parametrize("temperature", [0.5, 3.0])
def test_fit_recovers_a_known_temperature(temperature: float) -> None:
    logits, target = _synthetic(temperature)
    assert fit_temperature(logits, target) == pytest.approx(temperature, rel=0.1)


@pytest.mark.unit
def test_calibrated_logits_need_no_temperature() -> None:
    logits, target = _synthetic(1.0)
    assert fit_temperature(logits, target) == pytest.approx(1.0, abs=0.1)
    assert nll(logits, target, 1.0) == pytest.approx(float(F.cross_entropy(logits, target)))


@pytest.mark.unit
def test_overconfident_logits_get_lower_ece_and_nll_and_keep_every_argmax() -> None:
    logits, target = _synthetic(4.0)
    report = calibration_report(logits, target)
    assert set(report) == set(KEYS)
    assert report["temperature"] > 1
    assert report["val_nll"] < report["val_nll_uncalibrated"]
    assert report["val_ece"] < report["val_ece_uncalibrated"]
    assert report["val_ece"] == pytest.approx(ece(logits, target, report["temperature"]))
    calibrated = logits / report["temperature"]
    assert torch.equal(calibrated.argmax(1), logits.argmax(1))


@pytest.mark.unit
def test_store_temperature_keeps_the_rest_of_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "best.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "vision_tl": {"format": 2}}, path)
    store_calibration(path, {"temperature": 2.5})
    saved = torch.load(path, weights_only=True)
    assert saved["vision_tl"] == {"format": 2, "temperature": 2.5}
    assert torch.equal(saved["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["best.ckpt"]


@pytest.mark.unit
def test_several_processes_keep_temperature_one_and_leave_checkpoints_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "best.ckpt"
    torch.save({"vision_tl": {"format": 2}}, path)
    trainer = SimpleNamespace(world_size=2)
    report = calibrate_run(trainer, None, None, str(path), [str(path)])
    assert report == {"temperature": 1.0, **dict.fromkeys(KEYS[1:])}
    assert "Calibration skipped: 2 processes" in caplog.text
    assert torch.load(path, weights_only=True) == {"vision_tl": {"format": 2}}


# --------------------------------------------------------------------------- integration


def _compose(name: str, overrides: list[str], out: Path) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return compose(name, overrides=[*overrides, f"paths.output_dir={out}"])


@pytest.mark.slow  # out of the suite for its 10-minute budget; run with -m slow
def test_run_stores_the_temperature_and_eval_and_predict_apply_it(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=6, splits=("train", "val"))
    quiet = ["logger=none", "callbacks.learning_rate_monitor=null", "trainer.max_epochs=1"]
    overrides = [*TINY, *quiet, f"data.root={root}"]
    metrics = run_training(_compose("train", overrides, tmp_path / "run"))
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert all(math.isfinite(on_disk[key]) for key in KEYS), on_disk
    assert on_disk["val_nll"] <= on_disk["val_nll_uncalibrated"]
    temperature = metrics["temperature"]
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = tmp_path / "run" / "checkpoints" / name
        saved = torch.load(ckpt, weights_only=True)
        assert saved["vision_tl"]["temperature"] == temperature
        assert load_checkpoint(ckpt).temperature == temperature

    # A clearly non-unit temperature makes the effect on probabilities unmistakable.
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"
    store_calibration(best, {"temperature": 3.0})
    base = [f"ckpt_path={best}", "num_workers=0"]
    result = run_eval(_compose("eval", [*base, f"data.root={root}"], tmp_path / "eval"))
    assert result["temperature"] == 3.0
    assert model_card(load_checkpoint(best), "onnx", "model.onnx", 17)["temperature"] == 3.0

    predict = [*base, f"input={root / 'val'}"]
    raw = run_predict(_compose("predict", [*predict, "calibrate=false"], tmp_path / "raw"))
    probs = raw[[c for c in raw.columns if c.startswith("prob_")]].to_numpy()
    expected = torch.tensor(np.log(probs) / 3.0).softmax(1).numpy().max(1)
    # reject_threshold judges the calibrated probabilities: just above every calibrated
    # confidence, it rejects every image with calibrate=true and not without.
    threshold = float(expected.max()) + 1e-4
    assert (raw.confidence > threshold).any()
    calibrated = run_predict(
        _compose("predict", [*predict, f"reject_threshold={threshold}"], tmp_path / "cal")
    )
    assert (calibrated.top1_label == raw.top1_label).all(), "no prediction changes class"
    np.testing.assert_allclose(calibrated.confidence, expected, atol=1e-4)
    assert (calibrated.label == "unknown").all()

    old = tmp_path / "old.ckpt"
    checkpoint = torch.load(best, weights_only=True)
    del checkpoint["vision_tl"]["temperature"]
    torch.save(checkpoint, old)
    assert load_checkpoint(old).temperature == 1.0


@pytest.mark.integration
@pytest.mark.parametrize("tolerance", [calibration.BF16_TOLERANCE, -1.0])
def test_a_fine_tune_is_checked_in_bf16_on_val_and_inference_follows_the_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tolerance: float
) -> None:
    """Where bf16 is native (forced here so any CPU runs the check; autocast emulates it),
    calibration runs val once more under bf16 autocast; the checkpoint records bf16 when
    it loses at most the tolerance (-1: never) and `precision=auto` inference follows."""
    monkeypatch.setattr(calibration, "native_bf16", lambda device: True)
    monkeypatch.setattr(calibration, "BF16_TOLERANCE", tolerance)
    autocast_seen: list[torch.dtype | None] = []
    real = calibration.val_logits

    def spy(*args: Any, **kwargs: Any) -> Any:
        on = torch.is_autocast_enabled("cpu")
        autocast_seen.append(torch.get_autocast_dtype("cpu") if on else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "val_logits", spy)
    root = make_image_folder(tmp_path / "data", per_class=6, splits=("train", "val"))
    quiet = ["logger=none", "callbacks.learning_rate_monitor=null", "trainer.max_epochs=1"]
    metrics = run_training(_compose("train", [*TINY, *quiet, f"data.root={root}"], tmp_path))
    assert autocast_seen == [None, torch.bfloat16]  # fp32 val, then the bf16 check
    check = metrics["bf16_check"]
    assert check["images"] == len(list((root / "val").rglob("*.png")))
    assert 0 <= check["top1_agreement"] <= 1
    assert check["val_acc_fp32"] == pytest.approx(metrics["best_val_acc"], abs=1e-6)
    expected = "bf16" if check["val_acc_bf16"] >= check["val_acc_fp32"] - tolerance else "fp32"
    assert check["chosen"] == expected == ("fp32" if tolerance < 0 else expected)
    best = tmp_path / "checkpoints" / "best.ckpt"
    assert torch.load(best, weights_only=True)["vision_tl"]["inference_precision"] == expected
    assert load_checkpoint(best).precision == expected
    predicted = build_scorer({"ckpt_path": str(best), "inference": {"engine": "torch"}})
    assert predicted.info["precision"] == expected
    # eval keeps the precision best_val_acc was measured in, and so reproduces it
    evaluated = [f"ckpt_path={best}", f"data.root={root}", "split=val", "num_workers=0"]
    scores = run_eval(_compose("eval", evaluated, tmp_path / "eval"))
    assert load_checkpoint(best).val_precision == scores["precision"] == "fp32"
    assert scores["acc"] == pytest.approx(check["val_acc_fp32"], abs=1e-6)


@pytest.mark.unit
def test_the_checked_precision_wins_over_the_feature_precision() -> None:
    facts = SavedFacts.of({"vision_tl": {"feature_precision": "bf16"}})
    assert facts.precision == "bf16"
    checked = {"feature_precision": "bf16", "inference_precision": "fp32"}
    assert SavedFacts.of({"vision_tl": checked}).precision == "fp32"
    assert SavedFacts.of({"vision_tl": {}}).precision == "fp32"
