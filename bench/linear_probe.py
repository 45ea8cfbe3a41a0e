"""Bench 2: 10-epoch linear probe, vision_tl (feature cache) vs two plain PyTorch loops.

    .venv/bin/python bench/linear_probe.py [--epochs 10] [--augment none]

Hymenoptera, EfficientNet-Lite0 with the shared ImageNet weights, AdamW + the same
cosine schedule, batch 32, the same workers. The plain loop recomputes the frozen backbone
on every batch of every epoch, as a notebook does; the careful loop computes the features
once (eval transform) and trains the same head on them; vision_tl computes features once into
its on-disk cache (a fresh, empty cache: the first run pays for it) and then trains only
the head. A second vision_tl run with the warm cache is what every further job of a
sweep costs. Wall times cover model building, data checks, training and validation.

Accuracy on 153 validation images moves by 1-2 images with the seed alone, so each seed
runs all three, in turn (cold vision_tl with an empty cache, plain, warm vision_tl):
times are medians over seeds, accuracies means.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    add_loader_args,
    careful_loader,
    emit,
    loader_workers,
    plain_fit,
    plain_model,
    plain_optimizer,
    require_shared,
    scratch,
    standard_loader,
    timed,
    vision_tl_config,
)


def plain_probe(seed: int, epochs: int, augment: bool, batch_size: int, workers: int) -> dict:
    torch.manual_seed(seed)
    backbone, head = plain_model()
    backbone.eval().requires_grad_(False)
    train = standard_loader("train", True, augment, batch_size, workers)
    val = standard_loader("val", False, augment, batch_size, workers)
    return plain_fit(backbone, head, train, val, epochs)


def careful_probe(seed: int, epochs: int, batch_size: int, workers: int) -> dict:
    """What a careful notebook does: the frozen backbone's features computed once (eval
    transform, `decode_image` + v2 on uint8), then the same head, optimizer and schedule."""
    torch.manual_seed(seed)
    backbone, head = plain_model()
    backbone.eval().requires_grad_(False)

    def features(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows, labels = [], []
        with torch.no_grad():  # inference tensors could not feed the head's backward
            for x, y in careful_loader(split, False, False, batch_size, workers):
                rows.append(backbone(x))
                labels.append(y)
        return torch.cat(rows), torch.cat(labels)

    (train_x, train_y), (val_x, val_y) = features("train"), features("val")
    steps = len(train_x) // batch_size
    optimizer, scheduler = plain_optimizer(head.parameters(), steps, epochs)
    accuracies = []
    for _ in range(epochs):
        order = torch.randperm(len(train_x))
        for step in range(steps):
            rows = order[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(head(train_x[rows]), train_y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        with torch.no_grad():
            accuracies.append(float((head(val_x).argmax(1) == val_y).float().mean()))
    return {"best_val_acc": max(accuracies), "final_val_acc": accuracies[-1]}


def vision_tl_probe(
    run_dir: Path, seed: int, epochs: int, augment: str, batch_size: int, workers: int
) -> dict:
    from vision_tl.training.train import run_training

    overrides = [
        "finetune=linear_probe",
        "finetune.search=false",  # the same 10 epochs as the loops (bench/probe_default.py: search)
        f"seed={seed}",
        f"trainer.max_epochs={epochs}",
        f"data.augment={augment}",
        f"data.batch_size={batch_size}",
        f"data.num_workers={workers}",
        "test=false",
    ]
    metrics = run_training(vision_tl_config(overrides, run_dir))
    return {k: metrics[k] for k in ("best_val_acc", "final_val_acc")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--augment", default="none", help="none | flip_crop (both sides)")
    add_loader_args(parser)
    args = parser.parse_args()
    require_shared()
    workers = loader_workers(args.workers)
    with scratch("probe") as work:
        common = (args.epochs, args.augment, args.batch_size, workers)
        seconds: dict[str, list[float]] = {
            "plain_pytorch": [],
            "careful_features_once": [],
            "vision_tl_cold": [],
            "vision_tl_warm": [],
        }
        accuracy: dict[str, list[dict]] = {
            "plain_pytorch": [],
            "careful_features_once": [],
            "vision_tl": [],
        }
        for seed in range(args.seeds):
            os.environ["VISION_TL_CACHE"] = str(work / f"cache{seed}")  # empty: a cold start
            cold, cold_s = timed(vision_tl_probe, work / f"cold{seed}", seed, *common)
            plain, plain_s = timed(
                plain_probe, seed, args.epochs, args.augment != "none", args.batch_size, workers
            )
            careful, careful_s = timed(careful_probe, seed, args.epochs, args.batch_size, workers)
            _, warm_s = timed(vision_tl_probe, work / f"warm{seed}", seed, *common)
            for side, value in zip(seconds, (plain_s, careful_s, cold_s, warm_s), strict=True):
                seconds[side].append(round(value, 1))
            accuracy["plain_pytorch"].append(plain)
            accuracy["careful_features_once"].append(careful)
            accuracy["vision_tl"].append(cold)
        median = {side: statistics.median(v) for side, v in seconds.items()}
        plain_s = median["plain_pytorch"]

        def mean(side: str, key: str) -> float:
            return round(statistics.mean(r[key] for r in accuracy[side]), 4)

        emit(
            "linear_probe",
            {
                "settings": {**vars(args), "workers": workers, "dataset": "hymenoptera"},
                "wall_s_median": median,
                "wall_s_per_seed": seconds,
                "speedup_vs_plain": {
                    "vision_tl_cold_cache": round(plain_s / median["vision_tl_cold"], 2),
                    "vision_tl_warm_cache": round(plain_s / median["vision_tl_warm"], 2),
                },
                "speedup_vs_careful_features_once": {
                    "vision_tl_cold_cache": round(
                        median["careful_features_once"] / median["vision_tl_cold"], 2
                    ),
                    "vision_tl_warm_cache": round(
                        median["careful_features_once"] / median["vision_tl_warm"], 2
                    ),
                },
                "val_acc_mean": {
                    side: {"best": mean(side, "best_val_acc"), "final": mean(side, "final_val_acc")}
                    for side in accuracy
                },
                "val_acc_per_seed": {
                    side: [round(r["best_val_acc"], 4) for r in runs]
                    for side, runs in accuracy.items()
                },
            },
        )


if __name__ == "__main__":
    main()
