"""Bench 1: data-loading images/s, vision_tl's pipeline vs two `ImageFolder` baselines.

    .venv/bin/python bench/data_loading.py [--epochs 4] [--rounds 3]

Hymenoptera at 224 px (EfficientNet-Lite0 preprocessing), the same batch size and worker
count on both sides, persistent workers on both. Each loader runs one warm-up epoch (workers
start, files enter the page cache), then `--epochs` timed epochs; the rounds alternate the
sides so background load hits both alike. Baselines: the classic PIL + `ToTensor`
transforms, and today's careful one (`decode_image` + v2 transforms on uint8). vision_tl is
timed as training sees it: under a Trainer its loaders ship uint8 batches and the datamodule
normalises them after transfer (`on_after_batch_transfer`), which is included here; the
baseline normalises in its workers. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from common import (
    HYMENOPTERA,
    add_loader_args,
    careful_loader,
    emit,
    loader_workers,
    preprocess,
    require_shared,
    scratch,
    standard_loader,
)

PHASES = (("train_augment", "train", True), ("val_eval", "val", False))


def images_per_second(loader, epochs: int, after_transfer=None) -> float:
    """Images/s of normalised float batches, as the training step receives them."""
    finish = after_transfer or (lambda batch: batch)
    for batch in loader:  # warm-up epoch
        finish(batch)
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            x, _y = finish(batch)
            assert x.dtype == torch.float32
            count += len(x)
    return count / (time.perf_counter() - start)


def vision_tl_loader(split: str, train: bool, batch_size: int, workers: int, cache: Path, **kw):
    from vision_tl.training.build import build_data, preprocess_overrides

    keys = {
        "root": str(HYMENOPTERA),
        "cache": str(cache),
        "batch_size": batch_size,
        "num_workers": workers,
        **kw,
    }
    data = build_data(keys)  # the composition root's data step
    dm = data.datamodule(preprocess().resolve(preprocess_overrides(keys, data.source)))
    # As under `Trainer.fit`: uint8 batches, normalised by the datamodule after transfer.
    dm.trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    start = time.perf_counter()
    dm.reader()  # the one-time resized copies, when enabled
    setup_s = time.perf_counter() - start
    loader = dm.train_dataloader() if train else dm.val_dataloader()
    return loader, setup_s, lambda batch: dm.on_after_batch_transfer(batch, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    add_loader_args(parser)
    args = parser.parse_args()
    require_shared()
    workers = loader_workers(args.workers)
    with scratch("loading") as cache:
        sides = {
            "torchvision_imagefolder": lambda s, t: (
                standard_loader(s, t, True, args.batch_size, workers),
                0.0,
                None,
            ),
            "torchvision_decode_v2_uint8": lambda s, t: (
                careful_loader(s, t, True, args.batch_size, workers),
                0.0,
                None,
            ),
            "vision_tl": lambda s, t: vision_tl_loader(s, t, args.batch_size, workers, cache),
            "vision_tl_resize_cache": lambda s, t: vision_tl_loader(
                s, t, args.batch_size, workers, cache, resize_cache=True
            ),
        }
        runs: dict[str, dict[str, list[float]]] = {}
        setup: dict[str, float] = {}
        for _ in range(args.rounds):
            for phase, split, train in PHASES:
                for side, make in sides.items():
                    loader, setup_s, after_transfer = make(split, train)
                    setup[f"{side}/{phase}"] = max(setup.get(f"{side}/{phase}", 0.0), setup_s)
                    rate = images_per_second(loader, args.epochs, after_transfer)
                    runs.setdefault(phase, {}).setdefault(side, []).append(rate)
                    del loader
        result: dict = {"settings": {**vars(args), "workers": workers, "input_size": 224}}
        for phase, by_side in runs.items():
            median = {side: round(statistics.median(r), 1) for side, r in by_side.items()}
            base = median["torchvision_imagefolder"]
            result[phase] = {
                "images_per_s": median,
                "all_rounds": {side: [round(v, 1) for v in r] for side, r in by_side.items()},
                "speedup_vs_imagefolder": {
                    side: round(v / base, 2)
                    for side, v in median.items()
                    if side != "torchvision_imagefolder"
                },
                "speedup_vs_decode_v2_uint8": {
                    side: round(v / median["torchvision_decode_v2_uint8"], 2)
                    for side, v in median.items()
                    if side.startswith("vision_tl")
                },
            }
        result["resize_cache_build_s"] = round(max(setup.values()), 2)
        emit("data_loading", result)


if __name__ == "__main__":
    main()
