"""Bench: does `semi.max_ratio` keep a two-class teacher from tilting pseudo-labels?

    .venv/bin/python bench/pseudo_label_cap.py [--seeds 0 1 2 3 4 5] [--work /tmp/vtl_cap]

Generated images: a warm or a cool square of random size and place on noise, tints close
and jittered; 6 labelled images per class, 30 val, and a pool of 150 per class (the slow
test in `tests/test_unlabelled_real.py` runs seed 4 of this set with this command). Per
seed, side by side: `train semi=pseudo_label semi.rounds=2` with the default cap
(`semi.max_ratio=2`) and with none (`semi.max_ratio=null`), EfficientNet-Lite0 probes at
64 px with the shared weights, through the command. Reports val accuracy of round 0 (no
pseudo-labels) and of the last round, and the images used per class in each round.
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from common import WEIGHTS
from PIL import Image

COMMAND = [
    "model.backbone.name=timm/tf_efficientnet_lite0",
    f"model.backbone.weights_path={WEIGHTS}",
    "data.image_size=64",
    "data.batch_size=8",
    "data.num_workers=0",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "+trainer.enable_progress_bar=false",
    "callbacks.rich_progress_bar=null",
    "finetune=linear_probe",
    "finetune.epochs=30",
    "finetune.folds=2",
    "finetune.batch_size=8",
    "finetune.short_epochs=0",
    "logger=none",
    "test=false",
    "semi=pseudo_label",
    "semi.rounds=2",
]


def tinted(label: int, seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (size, size, 3)).astype(np.float64)
    tint = np.array([[200, 90, 70], [60, 90, 210]][label]) + rng.normal(0, 20, 3)
    side = int(rng.integers(14, 27))
    x, y = rng.integers(0, size - side, 2)
    pixels[y : y + side, x : x + side] = tint
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def folder(root: Path, per_class: int, seed: int) -> Path:
    for label, name in enumerate(("warm", "cool")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            tinted(label, seed + 1000 * label + i).save(root / name / f"{name}_{i}.png")
    return root


def run(work: Path, seed: int, cap: str) -> dict:
    out = work / f"seed{seed}" / f"cap_{cap}"
    if not (out / "metrics.json").is_file():
        data = work / f"seed{seed}"
        args = [
            *COMMAND,
            f"data.root={data / 'data'}",
            f"data.unlabeled={data / 'pool'}",
            f"semi.max_ratio={cap}",
            f"seed={seed}",
            f"hydra.run.dir={out}",
        ]
        done = subprocess.run(
            [sys.executable, "-m", "vision_tl.train", *args], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(f"seed {seed}, cap {cap}: {done.stderr[-500:]}")
    semi = json.loads((out / "metrics.json").read_text())["semi"]
    return {
        "val_acc_without": semi["val_acc_without"],
        "val_acc_with": semi["val_acc_with"],
        "gain_pts": round(100 * (semi["val_acc_with"] - semi["val_acc_without"]), 2),
        "used_per_class": [r["used_per_class"] for r in semi["rounds"][1:]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--work", type=Path, default=Path("/tmp/vtl_cap"))
    args = parser.parse_args()
    per_seed = []
    for seed in args.seeds:
        base = args.work / f"seed{seed}"
        if not (base / "pool").is_dir():
            folder(base / "data" / "train", 6, seed * 100_000)
            folder(base / "data" / "val", 30, seed * 100_000 + 50_000)
            folder(base / "pool", 150, seed * 100_000 + 70_000)
        per_seed.append({"seed": seed, **{cap: run(args.work, seed, cap) for cap in ("2", "null")}})
    mean = {
        cap: round(float(np.mean([s[cap]["gain_pts"] for s in per_seed])), 2)
        for cap in ("2", "null")
    }
    print(json.dumps({"bench": "pseudo_label_cap", "mean_gain_pts": mean, "per_seed": per_seed}))


if __name__ == "__main__":
    main()
