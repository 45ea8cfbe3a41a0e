"""Pruning pays: the same 12-trial Optuna search with and without the median pruner.

    .venv/bin/python bench/optuna_pruning.py [--epochs 8] [--keep OUT] [--synthetic]

Twelve trials, enqueued in the same order in both searches (so the sampler plays no part):
eight learning rates that learn and four (1e-7 and neighbours) that cannot, interleaved.
Each search runs the real command line, `hparams_search=optuna` with a SQLite study, once
with `hydra.sweeper.pruner=none` and once with `median` (`n_startup_trials=2`,
`n_warmup_steps=2`); every other searched value is fixed on the command line. Prints the
epochs each search trained (the sum of every job's `metrics.json` `epochs`), its best
value, which rates were pruned, and its wall time.

The search is what the product is for: fine-tuning the pretrained EfficientNet-Lite0 (the
shared ImageNet weights) on vehicles6, 60 + 60 photos per class (train / val, the first
of each class folder), at 64 px, cosine schedule, batch 16. `--synthetic` runs a cheap
variant instead: timm's `test_efficientnet` from scratch on a class-coloured square on
noise (4 classes, 32 px, no schedule), a trial in seconds. From scratch on that set every
good rate ends on the same plateau (0.94-0.96 on 192 val images), so which of them is best
is a one-image coin toss that the median pruner can lose; from pretrained weights the
curves separate early and the best one leads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO, VEHICLES, WEIGHTS, emit, scratch
from PIL import Image

# --synthetic, log-spaced: they learn at different speeds, so the median has something to compare.
GOOD = [0.03, 0.015, 0.008, 0.004, 0.002, 0.001, 0.0005, 0.00025]
HOPELESS = [1e-7, 1.2e-7, 1.4e-7, 1.6e-7]
MEDIAN_ARGS = "{{n_startup_trials:{startup},n_warmup_steps:{warmup}}}"
# Fine-tuning the pretrained lite0 (the default search): the useful rates are lower.
REAL_GOOD = [3e-3, 2e-3, 1e-3, 6e-4, 4e-4, 2e-4, 1e-4, 5e-5]


def order(good: list[float]) -> list[float]:
    """The 12 enqueued rates: `good` interleaved with the hopeless ones, so the pruner
    sees hopeless trials after it has a median to compare with."""
    g, h = good, HOPELESS
    return [g[0], g[1], h[0], g[2], h[1], g[3], g[4], h[2], g[5], h[3], g[6], g[7]]


def real_data(root: Path, per_class: int, val_per_class: int) -> Path:
    """The first `per_class` + `val_per_class` photos of each vehicles6 class, linked into
    train/ and val/ folders."""
    for folder in sorted(p for p in VEHICLES.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        for split, chosen in (
            ("train", files[:per_class]),
            ("val", files[per_class : per_class + val_per_class]),
        ):
            target = root / split / folder.name
            target.mkdir(parents=True, exist_ok=True)
            for f in chosen:
                (target / f.name).symlink_to(f)
    return root


def make_data(root: Path, per_class: int = 24, val_per_class: int = 12, size: int = 32) -> Path:
    """A class-coloured square on noise, its colour jittered so that neighbouring classes
    overlap a little: learnable in a few epochs, not by every learning rate alike."""
    colours = np.array([[200, 60, 60], [60, 180, 60], [60, 60, 200], [150, 150, 60]])
    for s, (split, count) in enumerate((("train", per_class), ("val", val_per_class))):
        for label, colour in enumerate(colours):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng(s * 10_000 + label * 100 + i)
                pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                lo = size // 4 + int(rng.integers(-2, 3))
                jitter = rng.integers(-50, 51, 3)
                square = np.clip(colour + jitter, 0, 255).astype(np.uint8)
                pixels[lo : lo + size // 2, lo : lo + size // 2] = square
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def search(work: Path, data: Path, pruner: str, args: argparse.Namespace) -> dict:
    """Run the 12 enqueued trials with `pruner`; the figures of that search."""
    import optuna

    db = work / f"{pruner}.db"
    storage = f"sqlite:///{db}"
    study = optuna.create_study(study_name="bench", storage=storage, direction="maximize")
    for lr in order(GOOD if args.synthetic else REAL_GOOD):
        study.enqueue_trial({"optimizer.lr": lr})
    sweep = work / f"sweep_{pruner}"
    model = ["model.backbone.name=timm/tf_efficientnet_lite0"]
    model += [f"model.backbone.weights_path={WEIGHTS}", "finetune=full"]
    if args.synthetic:
        model = ["model.pretrained=false", "model.backbone.name=timm/test_efficientnet"]
    command = [
        sys.executable,
        "-m",
        "vision_tl.train",
        "hparams_search=optuna",
        f"data.root={data}",
        "trainer.accelerator=cpu",
        f"trainer.max_epochs={args.epochs}",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "callbacks.rich_progress_bar=null",
        "data.num_workers=0",
        f"data.image_size={args.image_size}",
        "data.batch_size=16",
        "optimizer.weight_decay=0.0",
        "model.head.dropout=0.0",
        *model,
        "logger=none",
        "test=false",
        f"scheduler={args.scheduler}",
        "optimizer.lr=tag(log,interval(1e-8,1e-1))",
        "hydra.sweeper.worker_id=0",
        "hydra.sweeper.n_trials=12",
        "hydra.sweeper.study_name=bench",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweeper.pruner={pruner}",
        f"+hydra.sweeper.pruner_args={MEDIAN_ARGS.format(startup=args.startup, warmup=args.warmup)}"
        if pruner == "median"
        else "",
        f"hydra.sweep.dir={sweep}",
    ]
    start = time.perf_counter()
    subprocess.run([c for c in command if c], cwd=work, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    study = optuna.load_study(study_name="bench", storage=storage)
    jobs = [json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")]
    states: dict[str, int] = {}
    for trial in study.trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    return {
        "trials": states,
        "epochs": sum(job["epochs"] for job in jobs),
        "best_value": study.best_value,
        "best_lr": study.best_params["optimizer.lr"],
        "pruned_lrs": sorted(
            t.params["optimizer.lr"] for t in study.trials if t.state.name == "PRUNED"
        ),
        "wall_s": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--keep", type=Path, help="keep the sweeps and studies here")
    parser.add_argument("--synthetic", action="store_true", help="the cheap variant, from scratch")
    parser.add_argument("--per-class", type=int, help="training images per class (60; 24)")
    parser.add_argument("--val-per-class", type=int, help="val images per class (60; 12)")
    parser.add_argument("--image-size", type=int, help="data.image_size (64; 32)")
    parser.add_argument("--scheduler", help="scheduler= of every trial (cosine; none)")
    parser.add_argument("--startup", type=int, default=2, help="the pruner's n_startup_trials")
    parser.add_argument("--warmup", type=int, default=2, help="the pruner's n_warmup_steps")
    parser.add_argument("--pruners", default="none,median", help="the searches to run")
    args = parser.parse_args()
    defaults = (24, 12, 32, "none") if args.synthetic else (60, 60, 64, "cosine")
    keys = ("per_class", "val_per_class", "image_size", "scheduler")
    for key, value in zip(keys, defaults, strict=True):
        if getattr(args, key) is None:
            setattr(args, key, value)
    with scratch("optuna-pruning") as tmp:
        work = args.keep or tmp
        work.mkdir(parents=True, exist_ok=True)
        make = make_data if args.synthetic else real_data
        data = make(work / "data", args.per_class, args.val_per_class)
        runs = {name: search(work, data, name, args) for name in args.pruners.split(",")}
    result: dict = {"repo": str(REPO), "settings": vars(args) | {"keep": str(args.keep)}}
    result |= runs
    if {"none", "median"} <= runs.keys():
        unpruned, pruned = runs["none"], runs["median"]
        result["epochs_ratio"] = round(pruned["epochs"] / unpruned["epochs"], 3)
        result["same_best_value"] = pruned["best_value"] == unpruned["best_value"]
        result["wall_ratio"] = round(pruned["wall_s"] / unpruned["wall_s"], 3)
    emit("optuna_pruning", result)


if __name__ == "__main__":
    main()
