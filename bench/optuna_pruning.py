"""Pruning pays: the same 12-trial Optuna search with and without the median pruner.

    .venv/bin/python bench/optuna_pruning.py [--epochs 8] [--keep OUT]

Twelve trials, enqueued in the same order in both searches (so the sampler plays no part):
eight learning rates that learn and four (1e-7 and neighbours) that cannot. Each search
runs the real command line, `hparams_search=optuna` with a SQLite study, once with
`hydra.sweeper.pruner=none` and once with `median` (`n_startup_trials=2`, and
`n_warmup_steps=2`: from scratch, the first epochs' validation accuracy is noise); every other
searched value is fixed on the command line. Prints the
epochs each search trained (the sum of every job's `metrics.json` `epochs`), its best
value and its wall time. The data is synthetic (a class-coloured square on noise, 4
classes, 32 px), so a trial takes seconds on a CPU; the backbone is timm's
`test_efficientnet`, from scratch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO, emit, scratch
from PIL import Image

# Log-spaced: they learn at different speeds, so the median has something to compare.
GOOD = [0.03, 0.015, 0.008, 0.004, 0.002, 0.001, 0.0005, 0.00025]
HOPELESS = [1e-7, 1.2e-7, 1.4e-7, 1.6e-7]
# Interleaved, so the pruner sees hopeless trials after it has a median to compare with.
ORDER = [GOOD[0], GOOD[1], HOPELESS[0], GOOD[2], HOPELESS[1], GOOD[3]]
ORDER += [GOOD[4], HOPELESS[2], GOOD[5], HOPELESS[3], GOOD[6], GOOD[7]]
MEDIAN_ARGS = "{n_startup_trials:2,n_warmup_steps:2}"


def make_data(root: Path, per_class: int = 24, size: int = 32) -> Path:
    """A class-coloured square on noise, its colour jittered so that neighbouring classes
    overlap a little: learnable in a few epochs, not by every learning rate alike."""
    colours = np.array([[200, 60, 60], [60, 180, 60], [60, 60, 200], [150, 150, 60]])
    for s, (split, count) in enumerate((("train", per_class), ("val", per_class // 2))):
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


def search(work: Path, data: Path, pruner: str, epochs: int) -> dict:
    """Run the 12 enqueued trials with `pruner`; the figures of that search."""
    import optuna

    db = work / f"{pruner}.db"
    storage = f"sqlite:///{db}"
    study = optuna.create_study(study_name="bench", storage=storage, direction="maximize")
    for lr in ORDER:
        study.enqueue_trial({"optimizer.lr": lr})
    sweep = work / f"sweep_{pruner}"
    command = [
        sys.executable,
        "-m",
        "vision_tl.train",
        "hparams_search=optuna",
        f"data.root={data}",
        "trainer.accelerator=cpu",
        f"trainer.max_epochs={epochs}",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "callbacks.rich_progress_bar=null",
        "data.num_workers=0",
        "data.image_size=32",
        "data.batch_size=16",
        "optimizer.weight_decay=0.0",
        "model.head.dropout=0.0",
        "model.pretrained=false",
        "model.backbone.name=timm/test_efficientnet",
        "logger=none",
        "test=false",
        "scheduler=none",
        "optimizer.lr=tag(log,interval(1e-8,1e-1))",
        "hydra.sweeper.worker_id=0",
        "hydra.sweeper.n_trials=12",
        "hydra.sweeper.study_name=bench",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweeper.pruner={pruner}",
        f"+hydra.sweeper.pruner_args={MEDIAN_ARGS}" if pruner == "median" else "",
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
    args = parser.parse_args()
    with scratch("optuna-pruning") as tmp:
        work = args.keep or tmp
        work.mkdir(parents=True, exist_ok=True)
        data = make_data(work / "data")
        unpruned = search(work, data, "none", args.epochs)
        pruned = search(work, data, "median", args.epochs)
    emit(
        "optuna_pruning",
        {
            "repo": str(REPO),
            "max_epochs": args.epochs,
            "unpruned": unpruned,
            "median": pruned,
            "epochs_ratio": round(pruned["epochs"] / unpruned["epochs"], 3),
            "same_best_value": pruned["best_value"] == unpruned["best_value"],
        },
    )


if __name__ == "__main__":
    main()
