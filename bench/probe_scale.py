"""Bench: the default linear probe against the careful user's script, at three scales.

    .venv/bin/python bench/probe_scale.py [--sets hymenoptera vehicles6 vehicles6_x4]
        [--seeds 42 1 2] [--work /tmp/vtl_probe_scale] [--warm-engine] [--override K=V ...]

Side by side in one run, per set and seed, each as a whole process (start-up and imports
included), EfficientNet-Lite0 with the shared ImageNet weights:

- `default`: `python -m vision_tl.train finetune=linear_probe` as it ships, with an empty
  feature cache (cold: every feature computed in the run): the views decision on a subset,
  the search on the training split (the converged and the early-stopped recipes), the fit;
  every run also converts the backbone for its engine (OpenVINO), which a user pays only
  on the first run with those weights: `--warm-engine` makes that conversion once, in an
  untimed run, and shares it (the features stay cold);
- `careful`: `bench/careful_probe.py` on the same split (vision_tl's `split.csv`): timm's
  own eval transform, PIL, DataLoader(2 workers), fp32 features computed once; AdamW lr
  1e-3, batch 32, its epochs chosen by 5-fold CV on the training split (and, for
  reference, its best epoch picked on val).

Sets: hymenoptera (its folders' split); vehicles6, all 4,800 100x100 photos upscaled to
the backbone's 224 px by the preprocessing (vision_tl's seeded 20% val split); and
vehicles6_x4, 500 photos per class (3,000) enlarged 4x to 400x400 and re-encoded as JPEG
(quality 90), so decoding costs what real photos cost (made once under --work).

Reports per set the val accuracy of each side (mean over seeds, and per seed), the time
ratio default / careful (mean of per-seed ratios, and of the means), the views decision
each default run made and what it cost (also as a share of the eval extraction), the
recipe it chose and by how much. The bars: time ratio <= 1.5, accuracy >= careful (CV
epochs) - 0.3 points on the means.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
VEHICLES = SHARED / "datasets" / "vehicles6"


def enlarged_vehicles(work: Path, per_class: int = 500, factor: int = 4) -> Path:
    """vehicles6's first `per_class` photos per class, enlarged and re-encoded as JPEG."""
    from PIL import Image

    out = work / f"vehicles6_x{factor}"
    if (out / ".complete").exists():
        return out
    for folder in sorted(p for p in VEHICLES.iterdir() if p.is_dir()):
        (out / folder.name).mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.iterdir())[:per_class]:
            with Image.open(path) as image:
                big = image.convert("RGB").resize(
                    (image.width * factor, image.height * factor), Image.Resampling.BICUBIC
                )
                big.save(out / folder.name / f"{path.stem}.jpg", quality=90)
    (out / ".complete").touch()
    return out


def run(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{done.stderr[-3000:]}")
    return seconds


def default_probe(
    root: Path, seed: int, work: Path, overrides: list[str], engines: Path | None = None
) -> dict:
    """One default run, its feature cache empty; with `engines`, the converted backbones
    (`<cache>/engines`) are that shared folder's, so a conversion made once is reused."""
    run_dir = work / "runs" / f"{root.name}-{seed}"
    cache = work / "caches" / f"{root.name}-{seed}-{time.time_ns()}"  # cold
    if engines is not None:
        engines.mkdir(parents=True, exist_ok=True)
        cache.mkdir(parents=True)
        (cache / "engines").symlink_to(engines, target_is_directory=True)
    seconds = run(
        [
            sys.executable,
            "-m",
            "vision_tl.train",
            f"data.root={root}",
            "model.backbone.name=timm/tf_efficientnet_lite0",
            f"model.backbone.weights_path={WEIGHTS}",
            "finetune=linear_probe",
            f"seed={seed}",
            "callbacks.rich_progress_bar=null",
            "+trainer.enable_progress_bar=false",
            f"hydra.run.dir={run_dir}",
            *overrides,
        ],
        env={"VISION_TL_CACHE": str(cache)},
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    probe = metrics["probe"]
    return {
        "val_acc": metrics["best_val_acc"],
        "process_s": round(seconds, 2),
        "recipe": probe["recipe"],
        "recipes_holdout": probe["recipes"],
        "recipe_margin": probe["recipe_margin"],
        "views": probe["views"],
        "views_decision": probe["views_decision"],
        "epochs": probe["epochs"],
        "features_s": probe["features_s"],
        "features_images_per_s": probe["features_images_per_s"],
        "search_s": probe["search_s"],
        "split_csv": str(run_dir / "split.csv"),
    }


def decision_share(decision: dict | None) -> float | None:
    """What the views decision cost (its subset's views and its searches) over the eval
    extraction of every image in the same run; None when no decision was made."""
    if not decision or not decision.get("eval_features_s"):
        return None
    cost = decision["subset_views_s"] + decision["search_s"]
    return round(cost / decision["eval_features_s"], 3)


def careful(split_csv: str, seed: int) -> dict:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "careful_probe.py"), split_csv, "--seed", str(seed)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"careful_probe failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "process_s": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=["hymenoptera", "vehicles6", "vehicles6_x4"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("/tmp/vtl_probe_scale"))
    parser.add_argument(
        "--override", nargs="*", default=[], help="more overrides of the default run (a variant)"
    )
    parser.add_argument(
        "--warm-engine",
        action="store_true",
        help="convert the backbone once in an untimed run first and share that conversion "
        "(a user's every run after the first with these weights); features stay cold",
    )
    args = parser.parse_args()
    roots = {
        "hymenoptera": SHARED / "datasets" / "hymenoptera",
        "vehicles6": VEHICLES,
        "vehicles6_x4": None,
    }
    report: dict = {"bench": "probe_scale", "load_avg_1m": round(os.getloadavg()[0], 2), "sets": {}}
    for name in args.sets:
        root = roots[name] or enlarged_vehicles(args.work)
        rows = []
        engines = args.work / "engines" if args.warm_engine else None
        first = None  # the untimed run that converts the backbone, its seconds for the record
        if engines is not None:
            first = default_probe(root, 0, args.work, args.override, engines)["process_s"]
        for seed in args.seeds:
            mine = default_probe(root, seed, args.work, args.override, engines)
            theirs = careful(mine["split_csv"], seed)
            rows.append({"seed": seed, "default": mine, "careful": theirs})
            print(json.dumps({"set": name, **rows[-1]}), flush=True)
        acc = {s: float(np.mean([r[s]["val_acc"] for r in rows])) for s in ("default", "careful")}
        secs = {
            s: float(np.mean([r[s]["process_s"] for r in rows])) for s in ("default", "careful")
        }
        ratios = [r["default"]["process_s"] / r["careful"]["process_s"] for r in rows]
        report["sets"][name] = {
            "images": rows[0]["careful"]["images"],
            "engine_conversion_run_s": first,
            "val_acc_mean": {k: round(v, 4) for k, v in acc.items()},
            "careful_best_epoch_on_val_mean": round(
                float(np.mean([r["careful"]["best_epoch_on_val_acc"] for r in rows])), 4
            ),
            "process_s_mean": {k: round(v, 1) for k, v in secs.items()},
            "time_ratio_of_means": round(secs["default"] / secs["careful"], 3),
            "time_ratio_per_seed": [round(r, 3) for r in ratios],
            "accuracy_gap_points": round(100 * (acc["default"] - acc["careful"]), 2),
            "bar_time_ok": secs["default"] / secs["careful"] <= 1.5,
            "bar_accuracy_ok": acc["default"] >= acc["careful"] - 0.003,
            "decisions": [
                {
                    "seed": r["seed"],
                    "views": r["default"]["views"],
                    "decision": r["default"]["views_decision"],
                    "cost_vs_eval_extraction": decision_share(r["default"]["views_decision"]),
                    "recipe": r["default"]["recipe"],
                    "margin": r["default"]["recipe_margin"],
                }
                for r in rows
            ],
            "per_seed": rows,
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
