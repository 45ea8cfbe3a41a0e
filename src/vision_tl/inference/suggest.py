"""`run_suggest(cfg)`: which unlabelled images to label next (worker of
`python -m vision_tl.suggest`).

The pool, without the images the checkpoint calls unknown (no known label fits them;
`include_unknown=true` keeps them), is ranked by the margin between the two most
probable classes, smallest first (`strategy=margin`, the default). `strategy=
cluster_margin` spreads the picks instead: k-means splits the pool into `k` clusters in
the feature space and each gives its smallest-margin image (Citovsky et al., NeurIPS
2021). On vehicles6 (60 picks, 20 labelled per class, two classes held out, 3 seeds) the
plain margin beat random picks, cluster-margin and k-center greedy
(`bench/unlabelled.py`). `label_next.csv` lists them with the checkpoint's guess.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from sklearn.cluster import KMeans

from vision_tl.core.errors import ConfigError
from vision_tl.core.io import write_csv
from vision_tl.inference.checkpoint import load_checkpoint
from vision_tl.inference.pool import run_pool
from vision_tl.inference.predictor import predictor_from_config

log = logging.getLogger(__name__)


def margins(probs: torch.Tensor) -> torch.Tensor:
    """Top probability minus the second (1 for a single class): small = uncertain."""
    if probs.shape[1] < 2:
        return torch.ones(len(probs))
    top = probs.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def cluster_margin(features: np.ndarray, margin: np.ndarray, k: int, seed: int = 0) -> list[int]:
    """Rows of the `k` chosen images: the smallest-margin image of each of `k` k-means
    clusters of the L2-normalised features, smallest margin first (all rows when k >= n)."""
    if k >= len(features):
        return [int(i) for i in np.argsort(margin, kind="stable")]
    x = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    clusters = KMeans(k, n_init=3, random_state=seed).fit_predict(x)
    chosen = []
    for c in range(k):
        members = np.flatnonzero(clusters == c)
        if len(members):
            chosen.append(int(members[np.argmin(margin[members])]))
    return sorted(chosen, key=lambda i: (margin[i], i))


def run_suggest(cfg: DictConfig) -> pd.DataFrame:
    """Write `label_next.csv` (path, best first; with margin and the model's guess)."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    k = cfg.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"k={k}: how many images to suggest, a positive integer")
    loaded = load_checkpoint(cfg.get("ckpt_path"))
    predictor = predictor_from_config(loaded, cfg)
    include_unknown = bool(cfg.get("include_unknown", False))
    pool = run_pool(loaded, predictor, cfg, need_flags=False)
    chosen_pool = pool if include_unknown else pool.subset(~pool.unknown)
    if len(chosen_pool) == 0:
        raise ConfigError(
            f"every image in input={cfg.get('input')} looks unknown to the checkpoint; "
            "include_unknown=true suggests from them anyway"
        )
    margin = margins(chosen_pool.probs).numpy()
    strategy = str(cfg.get("strategy") or "margin")
    if strategy == "cluster_margin":
        rows = cluster_margin(chosen_pool.features.numpy(), margin, k, int(cfg.get("seed") or 0))
    else:
        rows = [int(i) for i in np.argsort(margin, kind="stable")[:k]]
    top = chosen_pool.probs.argmax(1).tolist()
    frame = pd.DataFrame(
        {
            "path": [chosen_pool.names[i] for i in rows],
            "margin": [float(margin[i]) for i in rows],
            "predicted": [loaded.class_names[top[i]] for i in rows],
        }
    )
    write_csv(frame, out / "label_next.csv", index=False, float_format="%.6g")
    left_out = int(pool.unknown.sum()) if not include_unknown else 0
    log.info(
        "%d image(s) to label next of %d in the pool (%d unknown-looking left out) in %s",
        len(frame),
        len(pool),
        left_out,
        out / "label_next.csv",
    )
    return frame
