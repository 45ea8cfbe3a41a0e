"""Unlabelled images and unknown classes with real EfficientNet-Lite0 weights (../shared):
on vehicles6's photos, pseudo-labels a 10-shot probe gets right and an open-set score that
must beat the top probability on classes never trained on; on generated images, a pool
where pseudo-labels must raise val accuracy."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED, SHARED_WEIGHTS, TINY_ANY_MODEL, run_cli
from PIL import Image

VEHICLES = SHARED / "datasets" / "vehicles6"
KNOWN = ("bike", "car", "pickup", "truck")
UNKNOWN = ("juggernaut", "minibus")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (VEHICLES.is_dir() and SHARED_WEIGHTS.is_file()), reason="../shared absent"
    ),
]


def _link(files: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f.name).symlink_to(f)


@pytest.fixture(scope="module")
def few_labels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """10 labelled photos per known class, 100 val, and a pool of 150 more; 100 photos of
    each unknown class to measure the open set."""
    root = tmp_path_factory.mktemp("vehicles")
    rng = random.Random(0)
    for cls in (*KNOWN, *UNKNOWN):
        files = sorted((VEHICLES / cls).iterdir())
        rng.shuffle(files)
        if cls in UNKNOWN:
            _link(files[:100], root / "unknown" / cls)
        else:
            _link(files[:10], root / "data" / "train" / cls)
            _link(files[10:110], root / "data" / "val" / cls)
            _link(files[110:260], root / "pool" / cls)
    return {"data": root / "data", "pool": root / "pool", "unknown": root / "unknown"}


def test_pseudo_labels_of_a_ten_shot_probe_are_right_and_the_open_set_beats_the_top_probability(
    few_labels: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "semi"
    done = run_cli(
        [
            "vision_tl.train",
            f"data.root={few_labels['data']}",
            "model.backbone.name=timm/tf_efficientnet_lite0",
            f"model.backbone.weights_path={SHARED_WEIGHTS}",
            "finetune=linear_probe",
            "logger=none",
            "semi=pseudo_label",
            f"data.unlabeled={few_labels['pool']}",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    semi = json.loads((run / "metrics.json").read_text())["semi"]
    used = semi["rounds"][1]
    assert used["used"] >= 40 and min(used["used_per_class"].values()) > 0
    split = pd.read_csv(run / "round_1" / "split.csv")
    pseudo = split[(split["split"] == "train") & split["path"].str.contains("/pool/")]
    assert len(pseudo) == used["used"]
    right = (pseudo["path"].map(lambda p: Path(p).parent.name) == pseudo["label"]).mean()
    assert right >= 0.95  # measured 0.986
    assert {"val_acc_without", "val_acc_with"} <= semi.keys()

    out = tmp_path / "eval"
    done = run_cli(
        [
            "vision_tl.eval",
            f"ckpt_path={run / 'round_0' / 'checkpoints' / 'best.ckpt'}",
            f"data.root={few_labels['data']}",
            f"unknown={few_labels['unknown']}",
            "review.write=false",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads((out / "metrics.json").read_text())
    assert measured["open_set_auroc"] > measured["open_set_auroc_msp"] + 0.05
    assert measured["open_set_known_kept"] >= 0.9


def _tinted(label: int, seed: int, size: int = 40) -> Image.Image:
    """A warm (0) or cool (1) square of random size and place on noise; the two tints are
    close and each image's tint is jittered, so six labelled images per class leave the
    probe unsure of many val images that a pool of the same kind teaches it."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (size, size, 3)).astype(np.float64)
    tint = np.array([[200, 90, 70], [60, 90, 210]][label]) + rng.normal(0, 20, 3)
    side = int(rng.integers(14, 27))
    x, y = rng.integers(0, size - side, 2)
    pixels[y : y + side, x : x + side] = tint
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _tinted_folder(root: Path, per_class: int, seed: int) -> Path:
    for label, name in enumerate(("warm", "cool")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _tinted(label, seed + 1000 * label + i).save(root / name / f"{name}_{i}.png")
    return root


def test_a_pool_of_the_same_kind_raises_a_six_shot_probes_val_accuracy(tmp_path: Path) -> None:
    """Two rounds of pseudo-labels from 300 unlabelled images. Measured over seeds 0-5 of
    this generator: +7 to +22 points (0.82 -> 0.90 on this one, the smallest gain)."""
    _tinted_folder(tmp_path / "data" / "train", 6, seed=0)
    _tinted_folder(tmp_path / "data" / "val", 30, seed=50_000)
    pool = _tinted_folder(tmp_path / "pool", 150, seed=70_000)
    run = tmp_path / "semi"
    done = run_cli(
        [
            "vision_tl.train",
            f"data.root={tmp_path / 'data'}",
            *TINY_ANY_MODEL,
            "model.backbone.name=timm/tf_efficientnet_lite0",
            f"model.backbone.weights_path={SHARED_WEIGHTS}",
            "model.pretrained=true",
            "data.image_size=64",
            "finetune=linear_probe",
            "finetune.epochs=30",
            "finetune.folds=2",
            "finetune.batch_size=8",
            "finetune.short_epochs=0",
            "logger=none",
            "semi=pseudo_label",
            "semi.rounds=2",
            f"data.unlabeled={pool}",
            "test=false",
            "seed=0",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    semi = json.loads((run / "metrics.json").read_text())["semi"]
    assert semi["val_acc_with"] >= semi["val_acc_without"] + 0.05
    used = semi["rounds"][-1]["used_per_class"]
    assert max(used.values()) <= 2 * min(used.values())  # semi.max_ratio: neither dominates
    split = pd.read_csv(run / f"round_{len(semi['rounds']) - 1}" / "split.csv")
    pseudo = split[split["path"].str.contains("/pool/")]
    right = (pseudo["path"].map(lambda p: Path(p).parent.name) == pseudo["label"]).mean()
    assert len(pseudo) == sum(used.values()) and right >= 0.9
