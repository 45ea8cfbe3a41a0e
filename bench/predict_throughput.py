"""Predict throughput: vision_tl's `Predictor` vs two plain `torch.no_grad()` loops.

    .venv/bin/python bench/predict_throughput.py [--images DIR] [--ckpt CKPT] [--rounds 6]

Both sides use the same model object, the same image files, the same decode
(`Preprocess.read`) and eval transform, batch size, worker count and device; TTA is off. The
baseline is `ImageListDataset` + `DataLoader` + `model(x).softmax(1)`, which is what a
notebook would write on top of vision_tl's dataset. The second baseline is the common
notebook: `ImageFolder`'s PIL loader + the weights' own transforms (`weights.transforms()`,
or timm's `create_transform`), taken for `--backbone`. One warm-up pass each, then
`--rounds` timed passes of each side in ABBA order, so drifting background load hits every
side alike. Prints one JSON document; `ratio` is the median over rounds of vision_tl's
images/s over the baseline's in the same round (target >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vision_tl.core.runtime import resolve_device
from vision_tl.data.augment import eval_transform, normalize_batch
from vision_tl.data.dataset import ImageListDataset
from vision_tl.inference.checkpoint import load_checkpoint
from vision_tl.inference.predictor import Predictor, collect_inputs
from vision_tl.models import build_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "datasets" / "hymenoptera" / "val"


def plain_loop(model, files, preprocess, batch_size, workers, device) -> torch.Tensor:
    """The baseline: a DataLoader over the files and a `torch.no_grad()` forward per batch."""
    dataset = ImageListDataset([(str(f), 0) for f in files], preprocess, eval_transform(preprocess))
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda"
    )
    probs = []
    with torch.no_grad():
        for x, _ in loader:
            x = normalize_batch(x.to(device), preprocess)
            probs.append(model(x).softmax(dim=1).cpu())
    return torch.cat(probs)


def weights_transforms(backbone: str):
    """What the model's own weights prescribe, as its library hands it out: torchvision's
    `weights.transforms()`, or timm's `create_transform` from the pretrained config."""
    if backbone.startswith("timm/"):
        import timm
        from timm.data import create_transform, resolve_data_config

        model = timm.create_model(backbone.removeprefix("timm/"), pretrained=False)
        return create_transform(**resolve_data_config({}, model=model))
    from torchvision.models import get_model_weights

    return get_model_weights(backbone).DEFAULT.transforms()


def imagefolder_loop(model, files, transform, batch_size, workers, device) -> torch.Tensor:
    """The common notebook: PIL decode (ImageFolder's loader) + the weights' transforms."""
    from torchvision.datasets.folder import default_loader

    class Files(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int):
            return transform(default_loader(str(files[i]))), 0

    loader = DataLoader(
        Files(), batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda"
    )
    probs = []
    with torch.no_grad():
        for x, _ in loader:
            probs.append(model(x.to(device)).softmax(dim=1).cpu())
    return torch.cat(probs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder, file or CSV")
    parser.add_argument("--ckpt", help="a vision_tl checkpoint (default: random resnet18)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    files = collect_inputs(args.images).files
    if args.ckpt:
        loaded = load_checkpoint(args.ckpt)
        model, preprocess = loaded.model, loaded.preprocess
    else:
        spec = {"backbone": {"name": args.backbone}, "head": {"name": "linear"}}
        model = build_model(spec, num_classes=2, pretrained=False)
        preprocess = model.preprocess
    device = resolve_device(args.device)
    model = model.to(device).eval()
    predictor = Predictor(
        model, preprocess, device, batch_size=args.batch_size, num_workers=args.num_workers
    )

    def run_plain() -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        probs = plain_loop(model, files, preprocess, args.batch_size, args.num_workers, device)
        return len(files) / (time.perf_counter() - start), probs

    def run_vision_tl() -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        result = predictor.predict(files)
        return len(result.indices) / (time.perf_counter() - start), result.probs

    transform = weights_transforms(args.backbone)

    def run_imagefolder() -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        probs = imagefolder_loop(model, files, transform, args.batch_size, args.num_workers, device)
        return len(files) / (time.perf_counter() - start), probs

    _, plain_probs = run_plain()  # warm-up: page cache, allocator, thread pools
    _, vtl_probs = run_vision_tl()
    _, folder_probs = run_imagefolder()
    timings: dict[str, list[float]] = {"plain": [], "vision_tl": [], "imagefolder": []}
    sides = {"plain": run_plain, "vision_tl": run_vision_tl, "imagefolder": run_imagefolder}
    for round_ in range(args.rounds):
        order = list(sides) if round_ % 2 == 0 else list(reversed(sides))
        for side in order:  # ABBA: drift in background load hits every side alike
            timings[side].append(sides[side]()[0])
    plain = statistics.median(timings["plain"])
    ours = statistics.median(timings["vision_tl"])
    # Each round's two passes ran back to back, under the same background load.
    paired = [v / p for v, p in zip(timings["vision_tl"], timings["plain"], strict=True)]
    result = {
        "bench": "predict_throughput",
        "images": len(files),
        "source": args.images,
        "model": str(args.ckpt or f"{args.backbone} (random weights)"),
        "input_size": preprocess.input_size,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "device": str(device),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "plain_images_per_s": [round(v, 2) for v in timings["plain"]],
        "vision_tl_images_per_s": [round(v, 2) for v in timings["vision_tl"]],
        "plain_median": round(plain, 2),
        "vision_tl_median": round(ours, 2),
        "ratio_of_medians": round(ours / plain, 3),
        "paired_ratios": [round(r, 3) for r in paired],
        "ratio": round(statistics.median(paired), 3),
        "max_abs_prob_diff": float((plain_probs - vtl_probs).abs().max()),
        "imagefolder_weights_transforms_images_per_s": [
            round(v, 2) for v in timings["imagefolder"]
        ],
        "imagefolder_median": round(statistics.median(timings["imagefolder"]), 2),
        "ratio_vs_imagefolder": round(ours / statistics.median(timings["imagefolder"]), 3),
        "max_abs_prob_diff_vs_imagefolder": float((folder_probs - vtl_probs).abs().max()),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
