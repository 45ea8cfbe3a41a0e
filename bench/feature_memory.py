"""Bench 4: peak memory (RSS) of a cached linear probe as the file list grows 10x.

    .venv/bin/python bench/feature_memory.py [--sizes 2000 20000] [--image-size 32]

Generates class folders of small JPEGs, then runs a cached linear probe (EfficientNet-Lite0
with the shared weights, 2 epochs, augment none) on each size in a fresh subprocess, so
every process starts from nothing. Reported per size: the training process's peak RSS
(sampled during fit, `peak_rss_mb` in metrics.json), the whole process's `ru_maxrss`, and
the size of the on-disk feature cache, which an in-memory cache would add to RSS. A small
input size keeps the backbone pass short; the features are 1280 floats per image either way.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
from common import emit, require_shared, scratch, vision_tl_config
from PIL import Image


def make_folder(root: Path, count: int, size: int = 48) -> Path:
    """`count` JPEGs in two class folders, each a coloured square on noise."""
    rng = np.random.default_rng(count)
    for i in range(count):
        label = i % 2
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        pixels[12:36, 12:36, label] = 220
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def child(root: Path, run_dir: Path, image_size: int) -> None:
    from vision_tl.training.train import run_training

    overrides = [
        f"data.root={root}",
        "finetune=linear_probe",
        "data.augment=none",
        f"data.image_size={image_size}",
        "data.batch_size=64",
        "trainer.max_epochs=2",
        "test=false",
    ]
    metrics = run_training(vision_tl_config(overrides, run_dir))
    features = sum(f.stat().st_size for f in (run_dir.parent / "cache").rglob("features.f32"))
    result = {
        "peak_rss_mb_during_fit": metrics["peak_rss_mb"],
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "feature_cache_mb": round(features / 2**20, 1),
        "train_time_s": metrics["train_time_s"],
        "best_val_acc": metrics["best_val_acc"],
    }
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    require_shared()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.image_size)
        return
    with scratch("memory") as work:
        results = {}
        for n in args.sizes:
            root = make_folder(work / f"data{n}", n)
            run_dir = work / f"run{n}" / "run"
            env = {**os.environ, "VISION_TL_CACHE": str(run_dir.parent / "cache")}
            command = [sys.executable, __file__, "--image-size", str(args.image_size)]
            done = subprocess.run(
                [*command, "--child", str(root), str(run_dir)],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise SystemExit(done.stderr[-3000:])
            results[str(n)] = json.loads(lines[-1][len("RESULT ") :])
        small, large = (results[str(n)] for n in (min(args.sizes), max(args.sizes)))
        emit(
            "feature_memory",
            {
                "settings": {"sizes": args.sizes, "image_size": args.image_size, "epochs": 2},
                "per_size": results,
                "images_ratio": round(max(args.sizes) / min(args.sizes), 1),
                "peak_rss_ratio": round(
                    large["peak_rss_mb_during_fit"] / small["peak_rss_mb_during_fit"], 3
                ),
                "peak_rss_growth_mb": round(
                    large["peak_rss_mb_during_fit"] - small["peak_rss_mb_during_fit"], 1
                ),
                "feature_cache_growth_mb": round(
                    large["feature_cache_mb"] - small["feature_cache_mb"], 1
                ),
            },
        )


if __name__ == "__main__":
    main()
