"""What the benchmarks share: the data, the plain-PyTorch baseline, vision_tl runs, JSON output.

Two baselines, both with the preprocessing of the same weights, a timm model with the same
weights, AdamW and the same cosine schedule: the classic notebook (`ImageFolder`, PIL and
`ToTensor`), and what a careful user writes today (`decode_image` + v2 transforms on uint8
tensors; frozen features computed once for a probe).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HYMENOPTERA = SHARED / "datasets" / "hymenoptera"
VEHICLES = SHARED / "datasets" / "vehicles6"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
TIMM_NAME = "tf_efficientnet_lite0"


def machine() -> dict[str, Any]:
    from vision_tl.core.runtime import available_cpus

    return {
        "cpus": available_cpus(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def emit(name: str, result: dict[str, Any]) -> None:
    """Print one JSON document: the benchmark's whole output."""
    print(json.dumps({"bench": name, "machine": machine(), **result}, indent=2))
    sys.stdout.flush()


def preprocess():
    """The EfficientNet-Lite0 weights' own preprocessing (224 crop, 256 resize, bicubic)."""
    from vision_tl.models import build_backbone

    return build_backbone(f"timm/{TIMM_NAME}", weights=None).preprocess


def standard_transform(train: bool):
    """torchvision's classic ImageNet recipe on PIL images, with the weights' values."""
    from torchvision import transforms as T

    pre = preprocess()
    interp = T.InterpolationMode(pre.interpolation)
    tail = [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    if train:
        head = [T.RandomResizedCrop(pre.input_size, interpolation=interp), T.RandomHorizontalFlip()]
    else:
        head = [T.Resize(pre.resize_size, interpolation=interp), T.CenterCrop(pre.input_size)]
    return T.Compose(head + tail)


def standard_loader(split: str, train: bool, augment: bool, batch_size: int, workers: int):
    """`ImageFolder` + the classic transforms; `augment=False` uses the eval transform."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(HYMENOPTERA / split), standard_transform(train and augment))
    return folder_loader(dataset, train, batch_size, workers)


def folder_loader(dataset, train: bool, batch_size: int, workers: int):
    """The DataLoader both baselines use: shuffled, full batches when training."""
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def decode_file(path: str) -> torch.Tensor:
    """torchvision's native decoder (libjpeg-turbo / libpng) straight to a uint8 RGB tensor."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    return decode_image(read_file(path), mode=ImageReadMode.RGB)


def careful_transform(train: bool):
    """Today's torchvision recipe: v2 transforms on uint8 tensors, float only at the end."""
    from torchvision.transforms import v2

    pre = preprocess()
    interp = v2.InterpolationMode(pre.interpolation)
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]
    if train:
        head = [
            v2.RandomResizedCrop(pre.input_size, interpolation=interp, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        head = [
            v2.Resize(pre.resize_size, interpolation=interp, antialias=True),
            v2.CenterCrop(pre.input_size),
        ]
    return v2.Compose(head + tail)


def careful_loader(split: str, train: bool, augment: bool, batch_size: int, workers: int):
    """`ImageFolder` decoding with `decode_image` and v2 transforms on uint8 tensors."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(
        str(HYMENOPTERA / split), careful_transform(train and augment), loader=decode_file
    )
    return folder_loader(dataset, train, batch_size, workers)


def plain_model(num_classes: int = 2) -> tuple[nn.Module, nn.Module]:
    """(backbone, head): timm EfficientNet-Lite0 with the shared weights, a Linear head."""
    import timm
    from safetensors.torch import load_file

    backbone = timm.create_model(TIMM_NAME, num_classes=0, pretrained=False)
    state = {k: v for k, v in load_file(str(WEIGHTS)).items() if not k.startswith("classifier")}
    backbone.load_state_dict(state)
    return backbone, nn.Linear(backbone.num_features, num_classes)


def plain_optimizer(params, steps_per_epoch: int, epochs: int):
    """AdamW(lr 1e-3, wd 0.01) with vision_tl's default 1-epoch warmup + cosine, per step."""
    from vision_tl.training.optim import cosine_with_warmup

    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    total = steps_per_epoch * epochs
    schedule = cosine_with_warmup(optimizer, total_steps=total, steps_per_epoch=steps_per_epoch)
    return optimizer, schedule["scheduler"]


def plain_fit(backbone: nn.Module, head: nn.Module, train, val, epochs: int) -> dict:
    """The notebook loop: the frozen backbone runs on every batch of every epoch; val acc
    after each epoch."""
    import torch.nn.functional as F

    optimizer, scheduler = plain_optimizer(head.parameters(), len(train), epochs)
    accuracies = []
    for _ in range(epochs):
        head.train()
        for x, y in train:
            with torch.no_grad():
                features = backbone(x)
            loss = F.cross_entropy(head(features), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        head.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in val:
                correct += int((head(backbone(x)).argmax(1) == y).sum())
                total += len(y)
        accuracies.append(correct / total)
    return {"best_val_acc": max(accuracies), "final_val_acc": accuracies[-1]}


def vision_tl_config(overrides: Sequence[str], run_dir: Path):
    """The real `train` config with the hymenoptera + EfficientNet-Lite0 setting."""
    from hydra import compose, initialize_config_dir

    from vision_tl.core.config import config_dir

    base = [
        f"data.root={HYMENOPTERA}",
        f"model.backbone.name=timm/{TIMM_NAME}",
        f"model.backbone.weights_path={WEIGHTS}",
        "trainer.accelerator=auto",
        "callbacks.rich_progress_bar=null",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        f"paths.output_dir={run_dir}",
    ]
    if any(o.startswith("model=") for o in overrides):  # another model group (an ensemble)
        base = [o for o in base if not o.startswith("model.backbone.")]
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return compose("train", overrides=[*base, *overrides])


def timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def require_shared() -> None:
    if not (HYMENOPTERA.is_dir() and WEIGHTS.is_file()):
        raise SystemExit(f"needs {HYMENOPTERA} and {WEIGHTS}")


@contextlib.contextmanager
def scratch(name: str) -> Iterator[Path]:
    """A temporary folder for run dirs and caches, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"vtl-bench-{name}-") as path:
        yield Path(path)


def add_loader_args(parser: argparse.ArgumentParser) -> None:
    """`--batch-size` and `--workers`, the same on every bench script."""
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="default: vision_tl's")


def loader_workers(workers: int | None) -> int:
    """The worker count given, or vision_tl's default for this machine."""
    from vision_tl.core.runtime import available_cpus

    return workers if workers is not None else min(8, available_cpus())
