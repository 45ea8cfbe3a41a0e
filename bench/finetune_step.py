"""Bench 3: full fine-tune training throughput, vision_tl vs the same plain PyTorch loop.

    .venv/bin/python bench/finetune_step.py [--rounds 3] [--epochs 1]

Hymenoptera at 224 px, EfficientNet-Lite0 with the shared weights, every parameter
training, AdamW + cosine, batch 32, flip_crop augmentation on both sides, the same
workers. Throughput counts training images per second from the start of each epoch to
its last optimizer step, data loading included and validation excluded (vision_tl's
`train_images_per_s` in metrics.json measures exactly that; the plain loop is timed the
same way). One warm-up step runs first; rounds alternate which side goes first; medians
are reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    add_loader_args,
    emit,
    loader_workers,
    plain_model,
    plain_optimizer,
    require_shared,
    scratch,
    standard_loader,
    vision_tl_config,
)
from torch import nn


def plain_finetune(epochs: int, batch_size: int, workers: int) -> float:
    torch.manual_seed(0)
    backbone, head = plain_model()
    model = nn.Sequential(backbone, head).train()
    train = standard_loader("train", True, True, batch_size, workers)
    optimizer, scheduler = plain_optimizer(model.parameters(), len(train), epochs)
    images, seconds = 0, 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        for x, y in train:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            images += len(y)
        seconds += time.perf_counter() - start
    return images / seconds


def warm_up(batch_size: int) -> None:
    """One forward/backward first, so neither side pays for oneDNN's kernel set-up."""
    backbone, head = plain_model()
    model = nn.Sequential(backbone, head).train()
    F.cross_entropy(
        model(torch.randn(batch_size, 3, 224, 224)), torch.zeros(batch_size).long()
    ).backward()


def vision_tl_finetune(run_dir: Path, epochs: int, batch_size: int, workers: int) -> float:
    from vision_tl.training.train import run_training

    overrides = [
        "finetune=full",
        f"trainer.max_epochs={epochs}",
        "data.augment=flip_crop",
        f"data.batch_size={batch_size}",
        f"data.num_workers={workers}",
        "test=false",
        "+trainer.num_sanity_val_steps=0",
    ]
    return run_training(vision_tl_config(overrides, run_dir))["train_images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    add_loader_args(parser)
    args = parser.parse_args()
    require_shared()
    workers = loader_workers(args.workers)
    with scratch("finetune") as work:
        warm_up(args.batch_size)
        runs = {
            "vision_tl": lambda i: vision_tl_finetune(
                work / f"run{i}", args.epochs, args.batch_size, workers
            ),
            "plain_pytorch": lambda i: plain_finetune(args.epochs, args.batch_size, workers),
        }
        rates: dict[str, list[float]] = {side: [] for side in runs}
        for i in range(args.rounds):
            for side in list(runs) if i % 2 == 0 else list(runs)[::-1]:
                rates[side].append(runs[side](i))
        median = {side: round(statistics.median(r), 2) for side, r in rates.items()}
        emit(
            "finetune_step",
            {
                "settings": {**vars(args), "workers": workers, "dataset": "hymenoptera"},
                "train_images_per_s": median,
                "all_rounds": {side: [round(v, 2) for v in r] for side, r in rates.items()},
                "vision_tl_over_plain": round(median["vision_tl"] / median["plain_pytorch"], 3),
            },
        )


if __name__ == "__main__":
    main()
