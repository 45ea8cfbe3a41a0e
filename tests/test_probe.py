"""The converged linear probe: settings chosen on the training split only, recorded, loadable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_image_folder

from vision_tl.inference.checkpoint import load_checkpoint
from vision_tl.training.train import run_training

pytestmark = pytest.mark.integration

PROBE = ["finetune=linear_probe", "finetune.epochs=3", "finetune.folds=2", "finetune.batch_size=8"]
SPY = ["+callbacks.spy._target_=helpers.spies.RunSpy"]


def _shuffle_val_labels(root: Path, to: Path) -> Path:
    """A copy of `root` whose val images sit in other classes' folders (train unchanged)."""
    shutil.copytree(root, to)
    classes = sorted(p.name for p in (to / "val").iterdir())
    for i, name in enumerate(classes):
        target = classes[(i + 1) % len(classes)]
        for image in sorted((root / "val" / name).glob("*.png")):
            (to / "val" / name / image.name).unlink()
            shutil.copy(image, to / "val" / target / f"moved_{image.name}")
    return to


def test_probe_search_never_reads_val_and_records_its_choice(compose_train, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=6)
    shuffled = _shuffle_val_labels(root, tmp_path / "shuffled")
    runs = {}
    for name, data in (("real", root), ("shuffled", shuffled)):
        cfg = compose_train([*TINY, f"data.root={data}", *PROBE, *SPY], tmp_path / name)
        runs[name] = run_training(cfg)
    real, other = runs["real"]["probe"], runs["shuffled"]["probe"]
    assert runs["real"]["val_loss"] != runs["shuffled"]["val_loss"]  # val did change
    timing = ("search_s", "features_s", "features_images_per_s")
    assert {k: v for k, v in real.items() if k not in timing} == {
        k: v for k, v in other.items() if k not in timing
    }
    # 2 views (the default augmentation is random) x 2 LRs x 5 L2 penalties, on the train split
    assert len(real["candidates"]) == 20
    assert {c["views"] for c in real["candidates"]} == {"augmented", "eval"}
    assert real["epochs"] == 3 and real["folds"] == 2 and real["search_s"] > 0

    metrics = json.loads((tmp_path / "real" / "metrics.json").read_text())
    assert metrics["probe"]["lr"] == real["lr"]
    assert metrics["epochs"] == 3  # the probe's epochs, not trainer.max_epochs=2
    assert metrics["best_epoch"] == 2  # validated once, after the last epoch
    ckpt = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["vision_tl"]["probe"]["l2"] == real["l2"]
    # The penalty is in the loss: the optimizer's own (AdamW's 0.01 here) decay is off.
    assert ckpt["optimizer_states"][0]["param_groups"][0]["weight_decay"] == 0.0
    assert load_checkpoint(metrics["best_checkpoint"]) is not None
    start = json.loads((tmp_path / "real" / "spy.json").read_text())["start"]
    assert start["logit_layers_abs_max"] == 0.0  # the fit starts from the zero head
    assert start["group_weight_decays"] == [0.0]


def test_the_fit_trains_with_the_chosen_l2_penalty(compose_train, tmp_path: Path) -> None:
    """The chosen penalty is the fit's too, not the search's alone: one setting searched,
    with and without a strong penalty, and the penalised head ends far smaller."""
    root = make_image_folder(tmp_path / "data", per_class=4)
    norms = {}
    for l2 in (0, 30):
        fixed = [f"finetune.l2s=[{l2}]", "finetune.lrs=[0.01]", "data.augment=none"]
        cfg = compose_train([*TINY, f"data.root={root}", *PROBE, *fixed], tmp_path / str(l2))
        metrics = run_training(cfg)
        assert metrics["probe"]["l2"] == l2
        state = torch.load(metrics["last_checkpoint"], map_location="cpu", weights_only=False)
        norms[l2] = float(state["state_dict"]["model.head.0.weight"].norm())
    assert norms[30] < 0.5 * norms[0], norms


def test_search_off_keeps_the_configured_optimizer_and_epochs(
    compose_train, tmp_path: Path
) -> None:
    root = make_image_folder(tmp_path / "data", per_class=4)
    cfg = compose_train(
        [*TINY, f"data.root={root}", "finetune=linear_probe", "finetune.search=false", *SPY],
        tmp_path,
    )
    metrics = run_training(cfg)
    assert metrics["probe"] is None
    assert metrics["epochs"] == 2
    ckpt = torch.load(metrics["last_checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["weight_decay"] == 0.01
    assert "probe" not in ckpt["vision_tl"]
    start = json.loads((tmp_path / "spy.json").read_text())["start"]
    assert start["logit_layers_abs_max"] > 0  # the head's own initialisation, as before
