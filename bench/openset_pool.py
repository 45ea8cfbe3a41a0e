"""Study: open-set scores that learn from the unlabelled pool, on cached vehicles6 features.

    .venv/bin/python bench/openset_pool.py [--seeds 0 1 2] [--labelled 20 50]
        [--holdouts juggernaut,minibus pickup,truck bike,car car,truck] [--pool-unknown 150]

Frozen EfficientNet-Lite0 features of vehicles6 (`openset_research.extract`, cached in
/tmp/v6_feats.npz). For each hold-out of two classes, each `--labelled` count per known
class and each seed, the split is `bench/unlabelled.py`'s: 100 val and 100 test images
per known class; a pool of 150 per class, the held-out classes included (`--pool-unknown
0`: known classes only); 100 more images of each held-out class as unseen unknowns. A
logistic-regression probe (standardised features, C=1) gives the logits; `fit_open_set`
(the package's own) fits every score with the pool. Reported per score, mean over
seeds: AUROC of known test vs unseen unknown images, the share of known test images kept
at the val threshold, the pool's own AUROC; and for discovery, Ward's clustering
(`discover.cluster`) of the pool images the default score flags: their held-out share
and the adjusted Rand index over the held-out images. `pool_knn_msp` (pool, knn and msp
summed) is a variant measured here only; `default` is the score the detector chose
(`knn_msp` where the pool looks like the known classes).
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from openset_research import CLASSES, extract
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, roc_auc_score
from sklearn.preprocessing import StandardScaler
from unlabelled import assign

from vision_tl.inference.discover import cluster
from vision_tl.training.openset import fit_open_set, standardised_sum, threshold_at_tpr

HOLDOUTS = ["juggernaut,minibus", "pickup,truck", "bike,car", "car,truck"]
KINDS = ("msp", "energy", "knn", "knn_msp", "pool", "pool_msp", "pool_knn_msp", "default")


def split(
    paths: list[str], seed: int, labelled: int, unknown: tuple[str, ...], pool_unknown: int
) -> dict[str, np.ndarray]:
    """Row indices of `paths` per part: `bench/unlabelled.py`'s `assign`, 150 per pool."""
    index = {p: i for i, p in enumerate(paths)}
    parts = assign(seed, labelled, list(unknown), 150, pool_unknown)
    return {
        part: np.array([index[str(f)] for files in by_class.values() for f in files])
        for part, by_class in parts.items()
    }


def one(features, labels, paths, seed, labelled, unknown, pool_unknown) -> dict[str, float]:
    parts = split(paths, seed, labelled, unknown, pool_unknown)
    scaler = StandardScaler().fit(features[parts["train"]])
    probe = LogisticRegression(C=1.0, max_iter=3000).fit(
        scaler.transform(features[parts["train"]]), labels[parts["train"]]
    )

    def outs(part: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = features[parts[part]]
        logits = probe.decision_function(scaler.transform(x))
        return torch.as_tensor(x), torch.as_tensor(logits, dtype=torch.float32)

    (val_x, val_l), (test_x, test_l), (unk_x, unk_l), (pool_x, pool_l) = map(
        outs, ("val", "test", "unknown", "pool")
    )
    train_x = torch.as_tensor(features[parts["train"]])
    detector = fit_open_set("pool_msp", val_x, val_l, train_x, pool=pool_x)
    held = np.isin(labels[parts["pool"]], [CLASSES.index(c) for c in unknown])
    row: dict[str, float] = {}
    target = np.r_[np.ones(len(test_l)), np.zeros(len(unk_l))]

    def score(x: torch.Tensor, logits: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "pool_knn_msp":  # a variant studied, not registered
            return standardised_sum(("pool", "knn", "msp"), x, logits, 1.0, detector)
        return detector.scores(x, logits, kind=detector.kind if kind == "default" else kind)

    # Without a fitted direction (a pool like the known classes) knn_msp decides.
    row["pool_fitted"] = float(detector.direction is not None)
    kinds = [*detector.kinds(), "default"]
    if detector.direction is not None:
        kinds.append("pool_knn_msp")
        detector.thresholds["pool_knn_msp"] = threshold_at_tpr(
            score(val_x, val_l, "pool_knn_msp"), 0.95
        )
    detector.thresholds["default"] = detector.threshold
    for kind in kinds:
        known = score(test_x, test_l, kind)
        other = score(unk_x, unk_l, kind)
        row[f"auroc_{kind}"] = roc_auc_score(target, torch.cat([known, other]).numpy())
        row[f"kept_{kind}"] = float((known >= detector.thresholds[kind]).double().mean())
        if held.any():
            row[f"pool_auroc_{kind}"] = roc_auc_score(~held, score(pool_x, pool_l, kind).numpy())
    row["pool_share_flagged"] = float(
        (score(pool_x, pool_l, "default") < detector.threshold).double().mean()
    )
    if not held.any():
        return row
    for kind in ("knn_msp", "default"):
        flagged = (score(pool_x, pool_l, kind) < detector.thresholds[kind]).numpy()
        groups, _, _ = cluster(pool_x.numpy()[flagged], None, 10, 0, seed)
        truth = labels[parts["pool"]][flagged]
        mine = held[flagged]
        row[f"flag_share_{kind}"] = float(mine.mean())
        row[f"flag_recall_{kind}"] = float(mine.sum() / held.sum())
        row[f"groups_{kind}"] = float(len(set(groups)))
        row[f"ari_{kind}"] = adjusted_rand_score(truth[mine], groups[mine])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labelled", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--holdouts", nargs="+", default=HOLDOUTS)
    parser.add_argument(
        "--pool-unknown", type=int, default=150, help="pool images per held-out class"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    features, labels, paths = extract()
    paths = [str(p) for p in paths]
    for unknown in (tuple(h.split(",")) for h in args.holdouts):
        for labelled in args.labelled:
            rows = [
                one(features, labels, paths, s, labelled, unknown, args.pool_unknown)
                for s in args.seeds
            ]
            keys = dict.fromkeys(k for r in rows for k in r)
            mean = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}
            shown = [k for k in KINDS if f"auroc_{k}" in mean]
            print(f"\n{'+'.join(unknown)}  L={labelled}  ({len(rows)} seeds)")
            print(f"  pool direction fitted in {mean['pool_fitted']:.2f} of the seeds")
            print("  AUROC     " + "  ".join(f"{k} {mean[f'auroc_{k}']:.3f}" for k in shown))
            print("  kept      " + "  ".join(f"{k} {mean[f'kept_{k}']:.3f}" for k in shown))
            print(f"  pool share flagged by the default {mean['pool_share_flagged']:.3f}")
            if "pool_auroc_msp" not in mean:
                continue
            print("  pool AUROC " + "  ".join(f"{k} {mean[f'pool_auroc_{k}']:.3f}" for k in shown))
            for kind in ("knn_msp", "default"):
                print(
                    f"  discovery by {kind}: flagged held-out share "
                    f"{mean[f'flag_share_{kind}']:.3f}, recall {mean[f'flag_recall_{kind}']:.3f}, "
                    f"groups {mean[f'groups_{kind}']:.1f}, ARI {mean[f'ari_{kind}']:.3f}"
                )


if __name__ == "__main__":
    main()
