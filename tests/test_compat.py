"""Checkpoints written by the previous layout (format 1) still load, and predict the same.

The fixtures are real checkpoints of the code before the subpackage regrouping (commit
0dcbf40), shrunk to a few KB; `fixtures/make_legacy_checkpoints.py` shows how they were
made. `fixtures/legacy_v1.json` holds what that code computed from the same files: logits
on a fixed input, the class names and the preprocessing each run saved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vision_tl.data.preprocess import Preprocess
from vision_tl.inference.checkpoint import load_checkpoint
from vision_tl.training.compat import CHECKPOINT_FORMAT, checkpoint_format, upgrade_checkpoint
from vision_tl.training.task import ClassificationTask

FIXTURES = Path(__file__).parent / "fixtures"
RECORD = json.loads((FIXTURES / "legacy_v1.json").read_text())["fixtures"]
NAMES = sorted(RECORD)
ENSEMBLES = [name for name in NAMES if name.startswith("ensemble_")]
PREPROCESS_KEYS = ("input_size", "resize_size", "interpolation", "mean", "std")
OLD_TO_NEW = {"model.heads.": "model.fusion.heads.", "model.fuse.": "model.fusion.fuse."}


def fixture_path(name: str) -> Path:
    return FIXTURES / RECORD[name]["file"]


def recorded_input() -> torch.Tensor:
    """The input of legacy_v1.json: torch.manual_seed(0); torch.randn(2, 3, 32, 32)."""
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def assert_same_predictions(model: torch.nn.Module, name: str) -> None:
    with torch.no_grad():
        logits = model(recorded_input())
    expected = torch.tensor(RECORD[name]["logits"])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def assert_same_preprocess(preprocess: Preprocess, name: str) -> None:
    assert isinstance(preprocess, Preprocess)
    saved = RECORD[name]["preprocess"]
    assert {k: preprocess.to_dict()[k] for k in PREPROCESS_KEYS} == {
        k: saved[k] for k in PREPROCESS_KEYS
    }


def raw_checkpoint(name: str) -> dict:
    return torch.load(fixture_path(name), map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_legacy_checkpoint_loads_for_inference(name: str) -> None:
    loaded = load_checkpoint(fixture_path(name))
    assert not loaded.model.training
    assert loaded.class_names == RECORD[name]["class_names"]
    assert_same_preprocess(loaded.preprocess, name)
    assert_same_predictions(loaded.model, name)


@pytest.mark.parametrize("name", NAMES)
def test_legacy_checkpoint_loads_as_task(name: str) -> None:
    task = ClassificationTask.load_from_checkpoint(
        fixture_path(name), map_location="cpu", weights_only=True
    )
    assert task.class_names == RECORD[name]["class_names"]
    assert_same_preprocess(task.preprocess, name)
    # Old runs rounded the resize of an image-size override (32 / (160 / 168) -> 34), the
    # new rule floors it (33): the loaded preprocessing is the one the run trained with.
    overrides = task.hparams["preprocess_overrides"]
    assert overrides["image_size"] == 32
    assert task.model.preprocess.resolve(overrides).resize_size == 33
    assert task.preprocess.resize_size == RECORD[name]["preprocess"]["resize_size"] == 34
    assert_same_predictions(task.eval(), name)
    # Every weight of the file, under its current name, is what the task now holds.
    upgraded = upgrade_checkpoint(raw_checkpoint(name))["state_dict"]
    state = task.state_dict()
    assert set(state) == set(upgraded)
    for key, value in upgraded.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("name", ENSEMBLES)
def test_upgrade_renames_legacy_fusion_keys(name: str) -> None:
    checkpoint = raw_checkpoint(name)
    assert checkpoint_format(checkpoint) == 1
    assert "format" not in checkpoint["vision_tl"]
    before = dict(checkpoint["state_dict"])
    legacy = [k for k in before if k.startswith(tuple(OLD_TO_NEW))]
    assert legacy, "a format-1 ensemble keeps its fusion weights at model.heads / model.fuse"

    assert upgrade_checkpoint(checkpoint) is checkpoint  # in place
    state = checkpoint["state_dict"]
    assert checkpoint["vision_tl"]["format"] == CHECKPOINT_FORMAT
    assert not [k for k in state if k.startswith(tuple(OLD_TO_NEW))]
    assert len(state) == len(before)
    for key in legacy:
        old = next(o for o in OLD_TO_NEW if key.startswith(o))
        assert state[OLD_TO_NEW[old] + key[len(old) :]] is before[key]
    for key in set(before) - set(legacy):  # backbones keep their names
        assert state[key] is before[key]

    fusion = {k for k in state if k.startswith("model.fusion.")}
    if name != "ensemble_features":  # logits and mean: one linear head per member
        assert {"model.fusion.heads.0.weight", "model.fusion.heads.1.bias"} <= fusion
    if name != "ensemble_mean":  # logits and features: a fusing layer
        assert any(k.startswith("model.fusion.fuse.") for k in fusion)


def test_upgrade_leaves_current_checkpoints_alone() -> None:
    weight = torch.ones(3, 4)
    checkpoint = {
        "state_dict": {"model.heads.0.weight": weight, "model.fusion.fuse.bias": torch.zeros(3)},
        "vision_tl": {"format": CHECKPOINT_FORMAT},
    }
    assert upgrade_checkpoint(checkpoint) is checkpoint
    assert list(checkpoint["state_dict"]) == ["model.heads.0.weight", "model.fusion.fuse.bias"]
    assert checkpoint["state_dict"]["model.heads.0.weight"] is weight
    assert checkpoint["vision_tl"] == {"format": CHECKPOINT_FORMAT}

    upgraded = upgrade_checkpoint(raw_checkpoint("ensemble_logits"))
    again = dict(upgraded["state_dict"])
    upgrade_checkpoint(upgraded)  # a second upgrade changes nothing
    assert upgraded["state_dict"] == again


def test_single_model_upgrade_only_marks_the_format() -> None:
    checkpoint = raw_checkpoint("single")
    keys = list(checkpoint["state_dict"])
    upgrade_checkpoint(checkpoint)
    assert list(checkpoint["state_dict"]) == keys
    assert checkpoint_format(checkpoint) == CHECKPOINT_FORMAT


@pytest.mark.parametrize("name", NAMES)
def test_both_loaders_read_what_an_older_file_lacks_alike(name: str, tmp_path: Path) -> None:
    """The training task and inference read a checkpoint's facts through one reader
    (`SavedFacts`): the same from the file as written, and the same defaults from one
    written before calibration, bf16 features and best-epoch tracking existed."""
    checkpoint = raw_checkpoint(name)
    for key in ("temperature", "feature_precision", "operating_point", "open_set", "best_epoch"):
        checkpoint.setdefault("vision_tl", {}).pop(key, None)
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)

    def facts(path: Path) -> tuple[list[tuple], int]:
        """Temperature, precision and whether each fitted extra is absent, as the task and
        as inference read them (a dict on the task, an object in inference); best epoch."""
        task = ClassificationTask.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        loaded = load_checkpoint(path)
        sides = [
            (task.temperature, task.feature_precision, task.operating_point, task.open_set),
            (loaded.temperature, loaded.precision, loaded.operating_point, loaded.open_set),
        ]
        return [(t, p, o is None, d is None) for t, p, o, d in sides], task.best_epoch

    (as_task, as_inference), _ = facts(fixture_path(name))
    assert as_task == as_inference
    assert facts(older) == ([(1.0, "fp32", True, True)] * 2, -1)
