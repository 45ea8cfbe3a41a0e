"""`run_discover(cfg)`: group the images a checkpoint calls unknown into candidate new
classes (worker of `python -m vision_tl.discover`).

The images flagged unknown by the checkpoint's open-set detector (or a predict run's
`unknown` rows) are clustered in its feature space: Ward's agglomerative clustering of
the L2-normalised features for every group count from 2 to `max_groups`, keeping the
count with the best silhouette (`groups=N` fixes it). On vehicles6's held-out classes it
matched them better than k-means, and than either after PCA (`bench/unlabelled.py`).
`groups.csv` lists `path,group` (each group's most central images first) and
`groups.html` shows each group's thumbnails, so a person can name or merge groups, move
them into class folders and train again.
"""

from __future__ import annotations

import html
import logging
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from sklearn.cluster import AgglomerativeClustering
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score

from vision_tl.core.errors import ConfigError
from vision_tl.core.io import write_csv, write_json, write_text
from vision_tl.inference.audit_page import CSS, thumbnail_uri
from vision_tl.inference.checkpoint import load_checkpoint
from vision_tl.inference.pool import run_pool
from vision_tl.inference.predictor import predictor_from_config

log = logging.getLogger(__name__)

# Ward's clustering keeps a distance matrix: beyond this many images it is fitted on a
# seeded sample of them and the rest join their nearest group.
MAX_FIT = 4000


def cluster(
    features: np.ndarray,
    groups: int | None,
    max_groups: int,
    dims: int,
    seed: int,
    min_group_size: int = 5,
) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
    """(group per row, distance to its group's centre, silhouette per group count tried):
    Ward's agglomerative clustering of the L2-normalised features (PCA to `dims` first
    when `dims` > 0), on at most `MAX_FIT` images (the rest join their nearest group).
    Counts tried go up to `max_groups` and to one group per `min_group_size` images: on a
    few images the silhouette favours groups of one or two, which name no class."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    dims = min(dims, len(x) - 1, x.shape[1])
    if dims >= 2:
        x = PCA(dims, random_state=seed).fit_transform(x)
    rng = np.random.default_rng(seed)
    fit = np.sort(rng.choice(len(x), MAX_FIT, replace=False)) if len(x) > MAX_FIT else None
    sample = x if fit is None else x[fit]
    most = min(max_groups, len(sample) - 1, max(2, len(sample) // max(1, min_group_size)))
    counts = [groups] if groups else list(range(2, most + 1))
    tried: dict[int, float] = {}
    best: tuple[int, np.ndarray] | None = None
    for k in counts:
        labels = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(sample)
        tried[k] = float(silhouette_score(sample, labels)) if 1 < k < len(sample) else 0.0
        if best is None or tried[k] > tried[best[0]]:
            best = (k, labels)
    assert best is not None
    k, labels = best
    centres = np.stack([sample[labels == g].mean(0) for g in range(k)])
    if fit is None:
        assigned = labels
    else:  # the images left out of the fit join their nearest group
        assigned = np.stack([((x - c) ** 2).sum(1) for c in centres], axis=1).argmin(1)
        assigned[fit] = labels
    distance = np.linalg.norm(x - centres[assigned], axis=1)
    return assigned, distance, tried


def write_groups_page(
    path: Path, frame: pd.DataFrame, files: dict[str, Path], per_group: int, title: str
) -> None:
    """One offline HTML file: each group's size and its most central thumbnails."""

    @cache
    def thumb(name: str) -> str:
        return thumbnail_uri(str(files[name]))

    body = [f"<h1>{html.escape(title)}</h1>"]
    for group, rows in frame.groupby("group", sort=True):
        body.append(f'<h2 id="group-{group}">Group {group} ({len(rows)} images)</h2>')
        cards = []
        for name in rows["path"].head(per_group):
            uri = thumb(name)
            image = f'<img src="{uri}" alt="{html.escape(name)}">' if uri else "(unreadable)"
            cards.append(f"<figure>{image}<figcaption>{html.escape(name)}</figcaption></figure>")
        more = len(rows) - per_group
        if more > 0:
            cards.append(f'<p class="more">and {more} more in groups.csv</p>')
        body.append(f'<div class="pics grid">{"".join(cards)}</div>')
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        + "".join(body)
        + "</body></html>"
    )
    write_text(path, page)


def run_discover(cfg: DictConfig) -> dict[str, Any]:
    """Write `groups.csv`, `groups.html` and `discover.json` into the run dir."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_checkpoint(cfg.get("ckpt_path"))
    predictor = predictor_from_config(loaded, cfg)
    pool = run_pool(loaded, predictor, cfg, need_flags=not cfg.get("all_images", False))
    chosen = pool if cfg.get("all_images", False) else pool.subset(pool.unknown)
    log.info("%d of %d pool image(s) are unknown to %s", len(chosen), len(pool), loaded.path)
    if len(chosen) < 4:
        raise ConfigError(
            f"only {len(chosen)} unknown image(s) in input={cfg.get('input')}: at least 4 "
            "are needed to form groups (all_images=true groups every image)"
        )
    groups, distance, tried = cluster(
        chosen.features.numpy(),
        cfg.get("groups"),
        int(cfg.get("max_groups", 10)),
        int(cfg.get("pca_dims") or 0),
        int(cfg.get("seed") or 0),
        int(cfg.get("min_group_size", 5)),
    )
    frame = pd.DataFrame({"path": chosen.names, "group": groups, "distance": distance})
    frame = frame.sort_values(["group", "distance"], kind="stable").reset_index(drop=True)
    write_csv(frame[["path", "group"]], out / "groups.csv", index=False)
    files = dict(zip(chosen.names, chosen.files, strict=True))
    count = int(frame["group"].nunique())
    write_groups_page(
        out / "groups.html",
        frame,
        files,
        int(cfg.get("per_group", 48)),
        f"{count} candidate new classes among {len(chosen)} unknown images",
    )
    summary = {
        "groups": count,
        "images": len(chosen),
        "pool_images": len(pool),
        "silhouette": {str(k): round(v, 4) for k, v in tried.items()},
        "sizes": {str(g): int(n) for g, n in frame["group"].value_counts().sort_index().items()},
    }
    write_json(out / "discover.json", summary)
    log.info(
        "%d group(s) of %d unknown image(s) in %s and %s",
        count,
        len(chosen),
        out / "groups.csv",
        out / "groups.html",
    )
    return summary
