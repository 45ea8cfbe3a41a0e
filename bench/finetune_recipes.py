"""Bench: fine-tuning recipes against the probe, and distillation against the student alone.

    .venv/bin/python bench/finetune_recipes.py [--datasets hymenoptera vehicles6] [--epochs 5]
        [--recipes full lp_ft finetune_strong] [--image-size N] [--per-class N]
        [--distill] [--distill-recipe linear_probe] [--teacher lite2|ensemble]
        [--teacher-recipe RECIPE] [--seeds 42 1 2]

Per dataset, EfficientNet-Lite0 with the shared ImageNet weights, each recipe for
`--epochs` epochs, side by side in one process:

- `probe`: `finetune=linear_probe` as it ships (the reference every recipe must beat);
- `full`: the defaults (`finetune=full`, AdamW 1e-3 on every layer, cosine with warmup);
- `lp_ft`: `finetune=lp_ft` (the probe first, then everything at 0.1 x LR);
- `finetune_strong`: `experiment=finetune_strong`.

With `--distill`: a teacher is trained (`--teacher`: lite2, or the lite0 + lite2 ensemble;
with `--teacher-recipe`, default `--distill-recipe`), then the lite0 student with
`--distill-recipe` and the same epochs, alone and with `distill.teacher=` the teacher's best
checkpoint. vehicles6 has no split: every side uses the split vision_tl
writes (`data.val_fraction` 0.2, seed 42). Accuracies are on val; the probe and the search
never choose on it, the fine-tunes choose their best epoch on it (as every fine-tune's
best.ckpt does), so `last_val_acc` is given too.

With several `--seeds`, every recipe runs once per training seed (`seed=`; the split and
the cached views keep `data.seed=42`), and `mean_over_seeds` gives each recipe's mean, min
and max best val acc: on a val split of a few hundred images one run is a couple of
images of noise.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from common import SHARED, emit, require_shared, scratch, timed
from probe_default import data_overrides, vision_tl_run

WEIGHTS = {
    name: SHARED / "weights" / f"tf_efficientnet_{name}.in1k.safetensors"
    for name in ("lite0", "lite2")
}
RECIPES = {
    "probe": ["finetune=linear_probe"],
    "full": ["finetune=full"],
    "lp_ft": ["finetune=lp_ft"],
    "lp_ft_lr_scale_0.01": ["finetune=lp_ft", "finetune.lr_scale=0.01"],
    "lp_ft_lr_scale_0.1": ["finetune=lp_ft", "finetune.lr_scale=0.1"],
    "finetune_strong": ["experiment=finetune_strong"],
    "linear_probe": ["finetune=linear_probe"],
}


def backbone(name: str) -> list[str]:
    return [
        f"model.backbone.name=timm/tf_efficientnet_{name}",
        f"model.backbone.weights_path={WEIGHTS[name]}",
    ]


def ensemble() -> list[str]:
    """The lite0 + lite2 ensemble, each member with its own weights (and preprocessing)."""
    members = ",".join(
        f"{{name:timm/tf_efficientnet_{name},weights_path:{WEIGHTS[name]}}}"
        for name in ("lite0", "lite2")
    )
    return ["model=ensemble", f"model.members=[{members}]"]


TEACHERS = {"lite2": lambda: backbone("lite2"), "ensemble": ensemble}


def summary(metrics: dict, seconds: float, run_dir: Path) -> dict:
    history = run_dir / "history.csv"
    last = history.read_text().strip().splitlines()[-1].split(",") if history.is_file() else []
    probe = metrics.get("probe") or {}
    return {
        "best_val_acc": round(metrics["best_val_acc"], 4),
        "best_epoch": metrics["best_epoch"],
        "last_val_acc": round(float(last[4]), 4) if len(last) > 4 else None,
        "probe_val_acc": probe.get("probe_val_acc"),
        "val_ece": metrics.get("val_ece"),
        "val_ece_uncalibrated": metrics.get("val_ece_uncalibrated"),
        "val_nll": metrics.get("val_nll"),
        "val_nll_uncalibrated": metrics.get("val_nll_uncalibrated"),
        "seconds": round(seconds, 1),
        "distill": metrics.get("distill"),
    }


def seed_means(rows: dict) -> dict:
    """Per recipe, the mean, min and max of `best_val_acc` over its seeded runs."""
    by_recipe: dict[str, list[float]] = {}
    for name, row in rows.items():
        by_recipe.setdefault(name.split("@seed")[0], []).append(row["best_val_acc"])
    return {
        name: {"mean": round(sum(a) / len(a), 4), "min": min(a), "max": max(a), "runs": len(a)}
        for name, a in by_recipe.items()
    }


def run(
    work: Path,
    cache: Path,
    common: list[str],
    rows: dict,
    key: tuple[str, str],
    overrides: list[str],
) -> Path:
    """One in-process `train` run; its summary goes into `rows[name]` and is printed."""
    dataset, name = key
    run_dir = work / dataset / name
    metrics, seconds = timed(vision_tl_run, common, run_dir, cache, overrides)
    rows[name] = summary(metrics, seconds, run_dir)
    print(json.dumps({dataset: {name: rows[name]}}), flush=True)
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", nargs="+", default=["hymenoptera"])
    parser.add_argument("--recipes", nargs="*", default=["probe", "full", "lp_ft"])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=None, help="default: the weights'")
    parser.add_argument("--per-class", type=int, default=0)
    parser.add_argument("--distill", action="store_true")
    parser.add_argument("--distill-recipe", default="linear_probe")
    parser.add_argument("--teacher", choices=list(TEACHERS), default="lite2")
    parser.add_argument("--teacher-recipe", default=None, help="default: --distill-recipe")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--cache", type=Path, default=None, help="default: a fresh one")
    parser.add_argument(
        "--override", action="append", default=[], help="a train override for every run"
    )
    args = parser.parse_args()
    require_shared()
    results: dict[str, dict] = {}
    with scratch("recipes") as work:
        cache = args.cache or work / "cache"
        for dataset in args.datasets:
            data = data_overrides(dataset, work, args.per_class)
            if args.image_size:
                data.append(f"data.image_size={args.image_size}")
            common = [*data, f"trainer.max_epochs={args.epochs}", "logger=none", *args.override]
            rows = results.setdefault(dataset, {})
            for recipe, seed in itertools.product(args.recipes, args.seeds):
                name, seeded = recipe, []
                if len(args.seeds) > 1:
                    name, seeded = f"{recipe}@seed{seed}", [f"seed={seed}", "data.seed=42"]
                run(
                    work,
                    cache,
                    common,
                    rows,
                    (dataset, name),
                    [*backbone("lite0"), *RECIPES[recipe], *seeded],
                )
            if len(args.seeds) > 1:
                rows["mean_over_seeds"] = seed_means(rows)
            if args.distill:
                recipe = RECIPES[args.distill_recipe]
                teacher_recipe = RECIPES[args.teacher_recipe or args.distill_recipe]
                teacher = run(
                    work,
                    cache,
                    common,
                    rows,
                    (dataset, f"teacher_{args.teacher}"),
                    [*TEACHERS[args.teacher](), *teacher_recipe],
                )
                ckpt = teacher / "checkpoints" / "best.ckpt"
                student = [*backbone("lite0"), *recipe]
                run(work, cache, common, rows, (dataset, "student_lite0_alone"), student)
                run(
                    work,
                    cache,
                    common,
                    rows,
                    (dataset, "student_lite0_distilled"),
                    [*student, f"distill.teacher={ckpt}"],
                )
    emit("finetune_recipes", {"epochs": args.epochs, "results": results})


if __name__ == "__main__":
    main()
