"""Bench: unlabelled images and unknown classes on vehicles6, through the real commands.

    .venv/bin/python bench/unlabelled.py [--seeds 0 1 2] [--labelled 20 50]
        [--unknown juggernaut minibus] [--work /tmp/vtl_unlabelled]

Per seed, from `../shared/datasets/vehicles6` (6 classes, 800 photos each): the classes
in `--unknown` are held out; of each known class, `--labelled` images are labelled
(`train/`), 100 are `val/`, 100 are `test/`, and `--pool` more go into the unlabelled
pool with `--pool` of each unknown class; 100 other images of each unknown class are the
example unknown set of eval. Everything is a symlink under `--work`. Every run is the
EfficientNet-Lite0 probe with the shared ImageNet weights, as a whole process. Side by
side in one run, for each seed:

- **pseudo-labels**: `train data.unlabeled=POOL` on the labelled images, and `train
  semi=pseudo_label data.unlabeled=POOL` on the same split: known-class test accuracy (a
  split nothing tuned on) without and with the pseudo-labels, at each `--labelled`;
- **open set**: `eval unknown=UNKNOWN` of the labelled run: AUROC and FPR at 95% TPR by
  the default score (`pool_msp`, learnt from the pool), by every other score the
  checkpoint carries (`knn_msp`, `knn`, `energy`) and by the maximum-softmax baseline,
  and the share of known test images kept at the threshold fitted on val;
- **discovery**: `discover` over the pool: the adjusted Rand index of its groups against
  the true classes, over the held-out classes' images it grouped (and over every image
  it grouped), and whether `groups.html` renders every thumbnail in headless Chromium;
- **label next**: `suggest k=60` over the pool; the 60 suggested images are labelled
  (those of a held-out class cannot be, and are dropped) and the probe trained again,
  against 60 random pool images labelled the same way: known-class test accuracy.

Prints one JSON document with every figure per seed and the means.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO, VEHICLES, WEIGHTS

LITE0 = [
    "model.backbone.name=timm/tf_efficientnet_lite0",
    f"model.backbone.weights_path={WEIGHTS}",
    "finetune=linear_probe",
    "logger=none",
]


def link(files: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        target = folder / f.name
        if not target.exists():
            target.symlink_to(f)
        out.append(target)
    return out


def assign(
    seed: int, labelled: int, unknown: list[str], pool: int, pool_unknown: int | None = None
) -> dict[str, dict[str, list[Path]]]:
    """The seed's files per part (train, val, test, pool, unknown) and class: of each known
    class `labelled` train, 100 val, 100 test and `pool` pool images; of each class in
    `unknown`, `pool_unknown` (default `pool`) pool images and 100 other unknown ones."""
    rng = random.Random(seed)
    parts: dict[str, dict[str, list[Path]]] = {
        k: {} for k in ("train", "val", "test", "pool", "unknown")
    }
    for cls in sorted(p.name for p in VEHICLES.iterdir() if p.is_dir()):
        files = sorted((VEHICLES / cls).iterdir())
        rng.shuffle(files)
        if cls in unknown:
            parts["pool"][cls] = files[: pool if pool_unknown is None else pool_unknown]
            parts["unknown"][cls] = files[pool : pool + 100]
            continue
        parts["train"][cls] = files[:labelled]
        parts["val"][cls] = files[labelled : labelled + 100]
        parts["test"][cls] = files[labelled + 100 : labelled + 200]
        parts["pool"][cls] = files[labelled + 200 : labelled + 200 + pool]
    return parts


def build(work: Path, seed: int, labelled: int, unknown: list[str], pool: int) -> dict[str, Path]:
    """The seed's folders (`assign`): data (train/val/test of the known classes), pool,
    unknown."""
    root = work / f"seed{seed}_L{labelled}"
    data, pool_dir, unknown_dir = root / "data", root / "pool", root / "unknown"
    folders = {"pool": pool_dir, "unknown": unknown_dir}
    for part, by_class in assign(seed, labelled, unknown, pool).items():
        for cls, files in by_class.items():
            link(files, folders.get(part, data / part) / cls)
    return {"root": root, "data": data, "pool": pool_dir, "unknown": unknown_dir}


def command(name: str, args: list[str], log: Path) -> float:
    """Run `python -m vision_tl.<name> args` as a user would; seconds taken."""
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", f"vision_tl.{name}", *args], stdout=out, stderr=out
        )
    if done.returncode != 0:
        raise SystemExit(f"{name} failed, see {log}")
    return round(time.perf_counter() - start, 1)


def train(data: Path, run: Path, seed: int, *extra: str) -> dict:
    if not (run / "metrics.json").is_file():
        args = [*LITE0, f"data.root={data}", f"seed={seed}", f"hydra.run.dir={run}", *extra]
        command("train", args, run.parent / f"{run.name}.log")
    return json.loads((run / "metrics.json").read_text())


def ari(truth: list[str], groups: list[int]) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(truth, groups))


def labelled_copy(base: dict[str, Path], picked: list[Path], name: str, unknown: list[str]) -> Path:
    """`base`'s data with the picked pool images labelled by their true class (a held-out
    class's images cannot be labelled with a known class: dropped)."""
    out = base["root"] / name
    for split in ("train", "val", "test"):
        for cls_dir in (base["data"] / split).iterdir():
            link([p.resolve() for p in cls_dir.iterdir()], out / split / cls_dir.name)
    for path in picked:
        if path.parent.name not in unknown:
            link([path.resolve()], out / "train" / path.parent.name)
    return out


def browser(page: Path) -> dict:
    png = page.with_suffix(".png")
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "audit_browser.py"), str(page), str(png)],
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-300:]}


def one_seed(args: argparse.Namespace, seed: int) -> dict:
    result: dict = {"seed": seed}
    for labelled in args.labelled:
        base = build(args.work, seed, labelled, args.unknown, args.pool)
        # The labelled run sees the pool too: its open-set detector learns from it (the
        # default score with a pool, pool_msp); only pseudo-labels change the classifier.
        plain = train(base["data"], base["root"] / "plain", seed, f"data.unlabeled={base['pool']}")
        semi = train(
            base["data"],
            base["root"] / "semi",
            seed,
            "semi=pseudo_label",
            f"data.unlabeled={base['pool']}",
        )
        rounds = semi["semi"]["rounds"]
        result[f"L{labelled}"] = {
            "test_acc_without": plain["test_acc"],
            "test_acc_with": semi["test_acc"],
            "gain_pts": round(100 * (semi["test_acc"] - plain["test_acc"]), 2),
            "val_acc_without": semi["semi"]["val_acc_without"],
            "val_acc_with": semi["semi"]["val_acc_with"],
            "pseudo_used": rounds[1]["used"],
            "pseudo_used_per_class": rounds[1]["used_per_class"],
            "unknown_excluded": rounds[1]["unknown_excluded"],
            "pseudo_unknown_leaked": leaked(base["root"] / "semi" / "round_1", args.unknown),
            "pseudo_wrong": wrong(base["root"] / "semi" / "round_1", args.unknown),
        }
        if labelled != args.labelled[0]:
            continue
        ckpt = base["root"] / "plain" / "checkpoints" / "best.ckpt"
        out = base["root"] / "eval"
        if not (out / "metrics.json").is_file():
            command(
                "eval",
                [
                    f"ckpt_path={ckpt}",
                    f"data.root={base['data']}",
                    f"unknown={base['unknown']}",
                    "review.write=false",
                    f"hydra.run.dir={out}",
                ],
                base["root"] / "eval.log",
            )
        measured = json.loads((out / "metrics.json").read_text())
        result["open_set"] = {
            k: measured[k]
            for k in measured
            if k.startswith("open_set_") and isinstance(measured[k], float | str)
        }
        out = base["root"] / "discover"
        if not (out / "groups.csv").is_file():
            command(
                "discover",
                [f"ckpt_path={ckpt}", f"input={base['pool']}", f"hydra.run.dir={out}"],
                base["root"] / "discover.log",
            )
        import pandas as pd

        groups = pd.read_csv(out / "groups.csv")
        truth = groups["path"].str.split("/").str[0]
        held = truth.isin(args.unknown)
        result["discovery"] = {
            "groups": int(groups["group"].nunique()),
            "images": len(groups),
            "held_out_share": round(float(held.mean()), 4),
            "held_out_recall": round(float(held.sum()) / (args.pool * len(args.unknown)), 4),
            "ari_held_out": round(ari(list(truth[held]), list(groups["group"][held])), 4),
            "ari_all": round(ari(list(truth), list(groups["group"])), 4),
            "page": browser(out / "groups.html"),
        }
        out = base["root"] / "suggest"
        if not (out / "label_next.csv").is_file():
            command(
                "suggest",
                [
                    f"ckpt_path={ckpt}",
                    f"input={base['pool']}",
                    f"k={args.k}",
                    f"hydra.run.dir={out}",
                ],
                base["root"] / "suggest.log",
            )
        picked = [base["pool"] / p for p in pd.read_csv(out / "label_next.csv")["path"]]
        pool_files = sorted(base["pool"].rglob("*.*"))
        chance = random.Random(seed).sample(pool_files, args.k)
        chosen = labelled_copy(base, picked, "data_suggested", args.unknown)
        randomly = labelled_copy(base, chance, "data_random", args.unknown)
        by_suggest = train(chosen, base["root"] / "plus_suggested", seed)
        by_random = train(randomly, base["root"] / "plus_random", seed)
        result["label_next"] = {
            "k": args.k,
            "suggested_usable": sum(p.parent.name not in args.unknown for p in picked),
            "random_usable": sum(p.parent.name not in args.unknown for p in chance),
            "test_acc_base": plain["test_acc"],
            "test_acc_suggested": by_suggest["test_acc"],
            "test_acc_random": by_random["test_acc"],
            "gain_over_random_pts": round(
                100 * (by_suggest["test_acc"] - by_random["test_acc"]), 2
            ),
        }
    return result


def leaked(run: Path, unknown: list[str]) -> int:
    """Pseudo-labelled training images of a held-out class."""
    import pandas as pd

    split = pd.read_csv(run / "split.csv")
    train = split[(split["split"] == "train") & split["path"].str.contains("/pool/")]
    return int(train["path"].map(lambda p: Path(p).parent.name).isin(unknown).sum())


def wrong(run: Path, unknown: list[str]) -> int:
    """Pseudo-labelled images of a known class given another known class."""
    import pandas as pd

    split = pd.read_csv(run / "split.csv")
    train = split[(split["split"] == "train") & split["path"].str.contains("/pool/")]
    true = train["path"].map(lambda p: Path(p).parent.name)
    return int(((true != train["label"]) & ~true.isin(unknown)).sum())


def means(results: list[dict], labelled: list[int]) -> dict:
    def mean(values: list[float]) -> float:
        return round(float(np.mean(values)), 4)

    out: dict = {}
    for L in labelled:
        rows = [r[f"L{L}"] for r in results]
        out[f"L{L}"] = {
            k: mean([r[k] for r in rows])
            for k in ("test_acc_without", "test_acc_with", "gain_pts", "val_acc_without",
                      "val_acc_with", "pseudo_used", "pseudo_unknown_leaked", "pseudo_wrong")
        }  # fmt: skip
    first = [r for r in results if "open_set" in r]
    out["open_set"] = {
        k: mean([r["open_set"][k] for r in first])
        for k in first[0]["open_set"]
        if isinstance(first[0]["open_set"][k], float)
    }
    out["discovery"] = {
        k: mean([r["discovery"][k] for r in first])
        for k in ("groups", "held_out_share", "held_out_recall", "ari_held_out", "ari_all")
    }
    out["label_next"] = {
        k: mean([r["label_next"][k] for r in first])
        for k in ("suggested_usable", "random_usable", "test_acc_base", "test_acc_suggested",
                  "test_acc_random", "gain_over_random_pts")
    }  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labelled", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--unknown", nargs="+", default=["juggernaut", "minibus"])
    parser.add_argument("--pool", type=int, default=150)
    parser.add_argument("--k", type=int, default=60)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vtl_unlabelled"))
    args = parser.parse_args()
    if not VEHICLES.is_dir() or not WEIGHTS.is_file():
        raise SystemExit(f"needs {VEHICLES} and {WEIGHTS}")
    os.environ.setdefault("VISION_TL_CACHE", str(args.work / "cache"))
    start = time.perf_counter()
    results = [one_seed(args, seed) for seed in args.seeds]
    print(
        json.dumps(
            {
                "bench": "unlabelled",
                "settings": {k: str(v) for k, v in vars(args).items()},
                "seconds": round(time.perf_counter() - start, 1),
                "mean": means(results, args.labelled),
                "per_seed": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
