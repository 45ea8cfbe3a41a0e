"""Bench: does `python -m vision_tl.audit` find problems planted in a real dataset?

    .venv/bin/python bench/audit_planted.py [--seed 0] [--keep DIR]

A copy of hymenoptera (in a temporary folder; ../shared is never touched) gets:
- 10 leaks: 10 train images copied into val, 5 byte-identical and 5 resized (0.6-0.85x) and
  re-encoded as JPEG at quality 70;
- 10 flipped labels: 10 other train images moved into the other class's folder;
- 5 intruders: 5 vehicles6 photos (one per class, bike to pickup) in train, alternately
  filed as ants and bees.

The audit runs twice with the shared EfficientNet-Lite0 weights: with an empty cache (it
computes the features) and again (the features exist). The issue's targets: at least 9 of
10 leaks listed, 7 of 10 flipped labels among the 20 highest `label` scores, 4 of 5
intruders among the 10 highest `outlier` scores; precision and recall of every list.

Side by side, in the same run, what a careful user writes by hand on the same features
(read from vision_tl's store, so the comparison is about the method, not the backbone):
MD5 of every file for copies, a logistic regression fit on all of train ranked by its
in-sample loss for labels, and the lowest top probability of that fit for outliers.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import HYMENOPTERA, VEHICLES, WEIGHTS, emit, require_shared, scratch
from PIL import Image

CLASSES = ("ants", "bees")


def plant(root: Path, seed: int) -> dict[str, set[str]]:
    """Copy hymenoptera to `root` and plant the problems; returns the planted paths
    (leaks: the val copies; labels: the moved files; outliers: the intruders)."""
    shutil.copytree(HYMENOPTERA, root)
    rng = random.Random(seed)
    train = {c: sorted((root / "train" / c).glob("*.jpg")) for c in CLASSES}
    picks = {c: rng.sample(train[c], 10) for c in CLASSES}  # 5 leaks + 5 flips per class
    planted: dict[str, set[str]] = {"leak": set(), "label": set(), "outlier": set()}
    for c in CLASSES:
        identical = 3 if c == "ants" else 2  # 5 identical copies in all, 5 resized
        for i, src in enumerate(picks[c][:5]):
            dst = root / "val" / c / f"leak_{src.name}"
            if i < identical:
                shutil.copy2(src, dst)
            else:
                with Image.open(src) as image:
                    scale = rng.uniform(0.6, 0.85)
                    size = (round(image.width * scale), round(image.height * scale))
                    image.convert("RGB").resize(size, Image.BICUBIC).save(dst, quality=70)
            planted["leak"].add(str(dst))
        other = CLASSES[1 - CLASSES.index(c)]
        for src in picks[c][5:]:
            dst = root / "train" / other / src.name
            shutil.move(src, dst)
            planted["label"].add(str(dst))
    vehicles = sorted(p for p in VEHICLES.iterdir() if p.is_dir())[:5]
    for i, folder in enumerate(vehicles):
        src = sorted(folder.glob("*.jpg"))[rng.randrange(100)]
        dst = root / "train" / CLASSES[i % 2] / f"intruder_{folder.name}_{src.name}"
        shutil.copy2(src, dst)
        planted["outlier"].add(str(dst))
    return planted


def audit(root: Path, out: Path, cache: Path) -> tuple[pd.DataFrame, dict, float]:
    command = [
        sys.executable,
        "-m",
        "vision_tl.audit",
        f"data.root={root}",
        "model.backbone.name=timm/tf_efficientnet_lite0",
        f"model.backbone.weights_path={WEIGHTS}",
        f"data.cache={cache}",
        f"hydra.run.dir={out}",
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    import json

    return pd.read_csv(out / "issues.csv"), json.loads((out / "audit.json").read_text()), wall


def scores(found: list[str], planted: set[str], top: int | None = None) -> dict:
    """Recall and precision of a list of flagged paths (best first) against the plant."""
    hits = sum(p in planted for p in found)
    result = {
        "listed": len(found),
        "hits": hits,
        "recall": round(hits / len(planted), 3),
        "precision": round(hits / len(found), 3) if found else None,
    }
    if top:
        result[f"hits_in_top_{top}"] = sum(p in planted for p in found[:top])
    return result


def vision_tl_scores(issues: pd.DataFrame, planted: dict[str, set[str]]) -> dict:
    def listed(kind: str) -> list[str]:
        rows = issues[issues["issue"] == kind].sort_values("score", ascending=False)
        return rows["path"].tolist()

    return {
        "leak": scores(listed("leak"), planted["leak"]),
        "label": scores(listed("label"), planted["label"], top=20),
        "outlier": scores(listed("outlier"), planted["outlier"], top=10),
        "duplicate_listed": len(listed("duplicate")),
    }


def by_hand(root: Path, cache: Path, planted: dict[str, set[str]]) -> tuple[dict, float]:
    """The careful user's version: MD5 duplicates; in-sample probe loss; low top probability."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from vision_tl.data.features import FeatureStore

    start = time.perf_counter()
    files = sorted(str(p) for p in root.rglob("*.jpg"))
    split = {f: Path(f).relative_to(root).parts[0] for f in files}
    label = {f: CLASSES.index(Path(f).relative_to(root).parts[1]) for f in files}
    digests: dict[str, str] = {}
    leaks = []
    for f in sorted(files, key=lambda f: split[f] != "train"):
        digest = hashlib.md5(Path(f).read_bytes()).hexdigest()
        if digest in digests and split[digests[digest]] != split[f]:
            leaks.append(f)
        digests.setdefault(digest, f)
    (store_dir,) = [p.parent for p in (cache / "features").glob("*/meta.json")]
    store = FeatureStore.open(store_dir)
    index = store.index()
    kept = [f for f in files if f in index]
    x = store.read_rows([index[f] for f in kept])
    y = np.array([label[f] for f in kept])
    train = np.array([split[f] == "train" for f in kept])
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    probe.fit(x[train], y[train])
    probs = probe.predict_proba(x)
    loss = -np.log(probs[np.arange(len(y)), y].clip(1e-12))
    by_loss = [kept[i] for i in np.argsort(-loss) if train[i]]
    by_top = [kept[i] for i in np.argsort(probs.max(axis=1))]
    seconds = time.perf_counter() - start
    return {
        "leak": scores(leaks, planted["leak"]),
        "label": scores(by_loss[:20], planted["label"], top=20),
        "outlier": scores(by_top[:10], planted["outlier"], top=10),
    }, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="also copy the run dir here")
    args = parser.parse_args()
    require_shared()
    with scratch("audit") as tmp:
        root, cache = tmp / "hymenoptera_planted", tmp / "cache"
        planted = plant(root, args.seed)
        _, cold, cold_wall = audit(root, tmp / "cold", cache)
        issues, warm, warm_wall = audit(root, tmp / "warm", cache)
        hand, hand_seconds = by_hand(root, cache, planted)
        if args.keep:
            shutil.copytree(tmp / "warm", args.keep, dirs_exist_ok=True)
        result = {
            "images": warm["images"],
            "planted": {k: len(v) for k, v in planted.items()},
            "vision_tl": vision_tl_scores(issues, planted),
            "by_hand_on_the_same_features": hand,
            "counts": warm["counts"],
            "clean_images": warm["clean_images"],
            "seconds": {
                "cold_audit_wall": round(cold_wall, 2),
                "cold_audit_inside": cold["seconds"]["total"],
                "warm_audit_wall": round(warm_wall, 2),
                "warm_audit_inside": warm["seconds"]["total"],
                "warm_stages": warm["seconds"],
                "by_hand_after_features": round(hand_seconds, 2),
            },
            "warm_seconds_per_image": warm["seconds_per_image"],
            "cold_seconds_per_image": cold["seconds_per_image"],
            "features_reused_on_second_run": warm["features_reused"],
        }
    emit("audit_planted", result)


if __name__ == "__main__":
    main()
