"""Bench: bf16 + channels_last feature extraction against fp32, the probe's val accuracy.

    .venv/bin/python bench/feature_precision.py [--datasets hymenoptera vehicles6] [--cache DIR]

Per dataset, EfficientNet-Lite0 with the shared weights, the default (searched) linear
probe on eval-transform features (`data.augment=none`), once with the backbone in fp32
and once in bf16 (`data.feature_precision`), each with an empty feature cache unless
`--cache` names one that already holds them. Reports val accuracy, extraction seconds and
images/s per precision and the accuracy delta (the contract: within 0.3 points).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from common import (
    add_loader_args,
    emit,
    loader_workers,
    require_shared,
    timed,
    vision_tl_config,
)
from probe_default import DATASETS

from vision_tl.core.runtime import native_bf16


def probe(root: Path, precision: str, cache: Path, run_dir: Path, workers: int) -> dict:
    from vision_tl.training.train import run_training

    os.environ["VISION_TL_CACHE"] = str(cache)
    overrides = [
        f"data.root={root}",
        "finetune=linear_probe",
        "data.augment=none",
        f"data.feature_precision={precision}",
        f"data.num_workers={workers}",
        "test=false",
    ]
    metrics = run_training(vision_tl_config(overrides, run_dir))
    probe = metrics["probe"]
    return {
        "val_acc": round(metrics["best_val_acc"], 4),
        "features_s": probe["features_s"],
        "features_images_per_s": probe["features_images_per_s"],
        "feature_precision": metrics["feature_precision"],
    }


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--cache", type=Path, default=None, help="a feature cache to reuse")
    add_loader_args(parser)
    args = parser.parse_args()
    require_shared()
    workers = loader_workers(args.workers)
    results = {}
    with tempfile.TemporaryDirectory(prefix="vtl-bench-precision-") as scratch:
        work = Path(scratch)
        cache = args.cache or work / "cache"
        for name in args.datasets:
            sides = {}
            for precision in ("fp32", "bf16"):
                run_dir = work / f"{name}-{precision}"
                sides[precision], wall = timed(
                    probe, DATASETS[name], precision, cache, run_dir, workers
                )
                sides[precision]["wall_s"] = round(wall, 1)
            delta = sides["bf16"]["val_acc"] - sides["fp32"]["val_acc"]
            results[name] = {
                **sides,
                "val_acc_delta_points": round(100 * delta, 2),
                "within_0.3_points": abs(delta) <= 0.003 + 1e-9,
            }
    emit(
        "feature_precision",
        {
            "settings": {**vars(args), "cache": str(args.cache), "workers": workers},
            "native_bf16_cpu": native_bf16(torch.device("cpu")),
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
