"""`run_audit(cfg)`: what is wrong with a dataset before anyone trusts a number trained on it
(worker of `python -m vision_tl.audit`).

The data is read exactly as training reads it (layouts, manifest, split, pre-flight scan),
and the backbone's features come from the same feature store a linear probe uses, so an
audit after training (or a second audit) recomputes no feature. On top of them:

- copies: a perceptual hash (`imagehash.phash`) of every image, compared within a Hamming
  radius and confirmed by feature similarity; a copy across splits is a leak, within one a
  duplicate;
- label errors: out-of-fold probabilities of a logistic-regression probe (k-fold on train,
  the train-fit probe for val and test), flagged where confident learning's per-class
  thresholds point at another class, ranked by how little the given label is believed;
- outliers: images far from their nearest neighbours in feature space, or that no class
  claims (a low top probability);
- statistics: images per class and split, sizes, aspect ratios, modes, unusable files.

Nothing under the data root is moved, changed or deleted: the results are files in the run
dir, `clean_manifest.csv` among them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vision_tl.core.errors import ConfigError
from vision_tl.core.io import read_json, read_regular, write_csv, write_json
from vision_tl.core.runtime import available_cpus, resolve_device
from vision_tl.data.decode import ReadLimits, load_rgb
from vision_tl.data.features import build_features
from vision_tl.data.folder import file_signature
from vision_tl.data.preprocess import per_member
from vision_tl.data.source import SPLITS, Catalog
from vision_tl.data.sources import FolderSource
from vision_tl.data.stats import class_count_rows, imbalance
from vision_tl.inference.audit_page import write_page
from vision_tl.training.build import Run, build_run

log = logging.getLogger(__name__)

ISSUES = ("leak", "duplicate", "label", "outlier", "bad_file")
ISSUE_COLUMNS = ["path", "issue", "score", "detail"]
FINGERPRINT_VERSION = 1
HASH_BITS = 64
HASH_SIDE = 128  # JPEGs decode in draft mode down to this side; phash looks at 32x32


@dataclass(frozen=True)
class Finding:
    """One row of issues.csv (`detail`: a copy's partner, the suggested label, the reason a
    file is unusable); `note` is extra context shown only on the page."""

    path: str
    issue: str
    score: float
    detail: str
    note: str = ""


# ------------------------------------------------------------------ fingerprints


def _fingerprint(path: str, limits: ReadLimits) -> list[Any]:
    """[sha256 of the bytes, 64-bit phash as hex, width, height, mode]; a file that will
    not decode (changed since the scan) or is no regular file within `limits` gets empty
    hashes and takes no part in copies."""
    try:
        data, _ = read_regular(path, limits.max_file_bytes)
        with Image.open(io.BytesIO(data)) as image:
            width, height, mode = *image.size, image.mode
        phash = str(imagehash.phash(load_rgb(io.BytesIO(data), min_side=HASH_SIDE, limits=limits)))
        return [hashlib.sha256(data).hexdigest(), phash, width, height, mode]
    except Exception:
        return ["", "", 0, 0, ""]


def fingerprints(
    paths: Sequence[str], cache_file: Path | None, limits: ReadLimits | None = None
) -> pd.DataFrame:
    """Byte digest, perceptual hash, size and mode of every file (threads: Pillow releases
    the GIL while decoding); cached by path + size + mtime, so a second audit only stats."""
    cached = read_json(cache_file) if cache_file else None
    known = cached["files"] if cached and cached.get("version") == FINGERPRINT_VERSION else {}
    rows: dict[str, list[Any]] = {}
    todo = []
    for path in paths:
        key = file_signature([path])[0][1:]  # [size, mtime_ns]; [-1, -1] if it is gone
        entry = known.get(path)
        if entry and entry[:2] == key and key[0] >= 0:
            rows[path] = entry
        else:
            todo.append((path, key))
    if todo:
        with ThreadPoolExecutor(min(16, 2 * available_cpus())) as pool:
            for (path, key), values in zip(
                todo,
                pool.map(lambda t: _fingerprint(t[0], limits or ReadLimits()), todo),
                strict=True,
            ):
                rows[path] = key + values
        if cache_file:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            done = {p: row for p, row in rows.items() if row[2]}  # failures are retried
            write_json(cache_file, {"version": FINGERPRINT_VERSION, "files": {**known, **done}})
    columns = ["size", "mtime_ns", "sha256", "phash", "width", "height", "mode"]
    frame = pd.DataFrame([rows[p] for p in paths], columns=columns, index=list(paths))
    return frame.drop(columns=["size", "mtime_ns"])


def _hash_bits(hex_hashes: Sequence[str]) -> np.ndarray:
    """(n, 64) 0/1 array of the hex perceptual hashes (none: an empty (0, 64) array)."""
    if not hex_hashes:
        return np.zeros((0, HASH_BITS), dtype=np.uint8)
    raw = np.array([bytes.fromhex(h) for h in hex_hashes], dtype=f"S{HASH_BITS // 8}")
    return np.unpackbits(raw.view(np.uint8).reshape(len(hex_hashes), -1), axis=1)


# ------------------------------------------------------------------ findings


def find_copies(
    images: pd.DataFrame,
    features: np.ndarray,
    max_distance: int,
    min_similarity: float,
    sure_distance: int,
) -> list[Finding]:
    """Identical and near-identical images (resized, re-encoded).

    Two images are copies when their bytes are identical, or their perceptual hashes are
    at most `sure_distance` bits apart, or at most `max_distance` apart with features that
    agree (cosine >= `min_similarity`): a resized copy of a small image can move its
    features, while two different photos with the same layout can come close in hash.
    Hashes of images without low-frequency structure (flat, or fine stripes) carry no
    information and match nothing. In each group of copies the first training image (else
    the first file) is kept; every other member is a `leak` when it sits in another split
    than the kept one, else a `duplicate`, with the kept file as its partner."""
    sha = images["sha256"].to_numpy()
    pairs: dict[tuple[int, int], int] = {}
    for group in images.groupby("sha256").indices.values():
        first, *rest = sorted(group)
        pairs.update({(first, k): 0 for k in rest if sha[first]})
    hashed = np.flatnonzero(images["phash"].str.len() > 0)
    bits = _hash_bits(images["phash"].iloc[hashed].tolist())
    ones = bits.sum(axis=1)
    informative = (ones >= HASH_BITS // 4) & (ones <= 3 * HASH_BITS // 4)  # a median split
    hashed, bits = hashed[informative], bits[informative]
    if len(hashed) >= 2:
        radius = (max_distance + 0.5) / HASH_BITS
        nn = NearestNeighbors(radius=radius, metric="hamming").fit(bits)
        distances, neighbours = nn.radius_neighbors(bits, return_distance=True)
        for a, (dist, near) in enumerate(zip(distances, neighbours, strict=True)):
            for d, b in zip(np.rint(dist * HASH_BITS).astype(int), near, strict=True):
                i, j = hashed[a], hashed[b]
                if i >= j or (i, j) in pairs:
                    continue
                if d <= sure_distance or float(features[i] @ features[j]) >= min_similarity:
                    pairs[(i, j)] = int(d)
    if not pairs:
        return []
    n = len(images)
    i, j = np.array(list(pairs)).T
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    _, group = connected_components(graph, directed=False)
    split_rank = images["split"].map({s: r for r, s in enumerate(SPLITS)}).to_numpy()
    findings = []
    members = pd.Series(range(n)).groupby(group)
    for indices in members.groups.values():
        if len(indices) < 2:
            continue
        keep = min(indices, key=lambda k: (split_rank[k], images["path"].iloc[k]))
        for k in sorted(indices):
            if k == keep:
                continue
            pair = (min(k, keep), max(k, keep))
            distance = pairs.get(pair, max_distance)  # linked through a third copy
            kind = "duplicate" if split_rank[k] == split_rank[keep] else "leak"
            how = "identical bytes" if sha[k] == sha[keep] else f"{distance} of 64 hash bits differ"
            findings.append(
                Finding(
                    images["path"].iloc[k],
                    kind,
                    round(1.0 - distance / HASH_BITS, 4),
                    images["path"].iloc[keep],
                    note=f"{images['split'].iloc[k]} copy of a {images['split'].iloc[keep]} "
                    f"image: {how}",
                )
            )
    return findings


def probe_probabilities(
    features: np.ndarray, labels: np.ndarray, is_train: np.ndarray, folds: int, seed: int
) -> np.ndarray | None:
    """Class probabilities of every image from a probe that never saw its label: out-of-fold
    (stratified k-fold) for training images, the probe fit on all of train for the rest.
    None when a class has fewer than two training images (no fold could hold it out)."""
    counts = np.bincount(labels[is_train])
    folds = min(folds, int(counts.min()))
    if folds < 2 or len(counts) < 2:
        return None

    def probe() -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))

    x_train, y_train = features[is_train], labels[is_train]
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    probs = np.zeros((len(features), len(counts)))
    probs[is_train] = cross_val_predict(probe(), x_train, y_train, cv=cv, method="predict_proba")
    if (~is_train).any():
        probs[~is_train] = probe().fit(x_train, y_train).predict_proba(features[~is_train])
    return probs


def find_label_errors(
    images: pd.DataFrame, probs: np.ndarray, class_names: Sequence[str]
) -> list[Finding]:
    """Confident learning (Northcutt et al.): class k's threshold is the mean probability
    of k over the training images labelled k; an image is suspect when a class other than
    its own clears its threshold and is the likeliest such class. The score is how little
    the probe believes the given label (1 - its probability); the detail is the suggestion."""
    labels = images["label"].to_numpy()
    train = (images["split"] == "train").to_numpy()
    thresholds = np.array([probs[train & (labels == k), k].mean() for k in range(len(class_names))])
    confident = np.where(probs >= thresholds, probs, -1.0)
    suggested = confident.argmax(axis=1)
    suspect = (confident.max(axis=1) >= 0) & (suggested != labels)
    return [
        Finding(
            images["path"].iloc[i],
            "label",
            round(float(1.0 - probs[i, labels[i]]), 4),
            class_names[suggested[i]],
            note=f"given {class_names[labels[i]]} ({images['split'].iloc[i]}), "
            f"suggested {class_names[suggested[i]]} (p={probs[i, suggested[i]]:.2f})",
        )
        for i in np.flatnonzero(suspect)
    ]


def find_outliers(
    images: pd.DataFrame,
    features: np.ndarray,
    probs: np.ndarray | None,
    neighbours: int,
    cutoff: float,
    unclaimed: float,
) -> list[Finding]:
    """Images unlike any class. The score is a robust z-score (median, MAD) of the cosine
    distance to the `neighbours`-th nearest other image: low density in feature space. The
    k-th neighbour, not the mean of k, so that a handful of intruders that resemble each
    other still stand out; copies of an image are not counted as its neighbours. Listed:
    scores above `cutoff`, and images no class claims (a top probability this close to
    uniform: 1 means exactly 1 / classes)."""
    n = len(features)
    k = min(neighbours, n - 1)
    if k < 1:
        return []
    nn = NearestNeighbors(n_neighbors=min(n, 2 * k + 1), metric="cosine").fit(features)
    distance, index = nn.kneighbors(features)
    sha = images["sha256"].to_numpy()
    copies = (index == np.arange(n)[:, None]) | (distance < 1e-4) | (sha[index] == sha[:, None])
    distance = np.where(copies, np.inf, distance)
    kth = np.sort(distance, axis=1)[:, k - 1]
    finite = np.isfinite(kth)  # fewer than k other images that are not copies
    kth[~finite] = kth[finite].max() if finite.any() else 0.0
    score = _robust_z(kth)
    listed = score > cutoff
    if probs is not None:
        classes = probs.shape[1]
        spread = (1.0 - probs.max(axis=1)) / (1.0 - 1.0 / classes)
        listed |= spread >= unclaimed
    findings = []
    for i in np.flatnonzero(listed):
        detail = f"distance to {k}th nearest image {kth[i]:.3f}"
        if probs is not None:
            detail += f"; top probability {probs[i].max():.2f}"
            detail += " (no class claims it)" if spread[i] >= unclaimed else ""
        findings.append(
            Finding(images["path"].iloc[i], "outlier", round(float(score[i]), 4), detail)
        )
    return findings


def _robust_z(values: np.ndarray) -> np.ndarray:
    """(value - median) / (1.4826 * MAD): a z-score that a few outliers cannot inflate."""
    median = np.median(values)
    mad = 1.4826 * np.median(np.abs(values - median))
    return (values - median) / max(mad, 1e-9)


# ------------------------------------------------------------------ statistics


def dataset_statistics(catalog: Catalog, images: pd.DataFrame, input_size: int) -> dict[str, Any]:
    """Imbalance, sizes, aspect ratios and modes: what a person checks before training."""
    split = catalog
    splits, rows = class_count_rows(split)
    counts = {
        name: dict(zip(splits, row, strict=True))
        for name, row in zip(split.class_names, rows, strict=True)
    }
    sized = images[images["width"] > 0]
    aspect = sized["width"] / sized["height"]
    short = sized[["width", "height"]].min(axis=1)
    quantiles = [0.0, 0.05, 0.5, 0.95, 1.0]

    def spread(values: pd.Series) -> dict[str, float]:
        q = values.quantile(quantiles) if len(values) else pd.Series([np.nan] * 5)
        return {
            k: round(float(v), 3)
            for k, v in zip(("min", "p5", "median", "p95", "max"), q, strict=True)
        }

    return {
        "images": len(images),
        "classes": len(split.class_names),
        "per_class": counts,
        "imbalance_train": round(imbalance(split.class_counts("train")), 3),
        "width": spread(sized["width"]),
        "height": spread(sized["height"]),
        "aspect": spread(aspect),
        "smaller_than_input": int((short < input_size).sum()),
        "input_size": input_size,
        "extreme_aspect": int(((aspect > 2.5) | (aspect < 0.4)).sum()),
        "modes": {str(k): int(v) for k, v in sized["mode"].value_counts().items()},
        "scan_notes": dict(split.scan.notes) if split.scan else {},
        "bad_files": len(split.bad),
    }


# ------------------------------------------------------------------ the command


def image_features(run: Run, device: Any) -> tuple[pd.DataFrame, np.ndarray, list[Finding], bool]:
    """Every image with features (path, label index, split), its L2-normalised features,
    the files that failed extraction, and whether the store was reused. The store is the
    one a linear probe builds: computed once, reused by any later audit or probe."""
    dm = run.datamodule
    cached = build_features(run.data.feature_spec, dm, run.task.model, device)
    store = cached.eval_store
    index = store.index()
    rows = [
        (path, label, split)
        for split in SPLITS
        for path, label in dm.catalog.samples.get(split, [])
        if path in index
    ]
    images = pd.DataFrame(rows, columns=["path", "label", "split"])
    features = store.read_rows([index[p] for p in images["path"]]).astype(np.float64)
    features /= np.linalg.norm(features, axis=1, keepdims=True).clip(min=1e-12)
    failed = [Finding(p, "bad_file", 1.0, why) for p, why in store.failed.items()]
    return images, features, failed, all(cached.hits.values())


def clean_manifest(catalog: Catalog, findings: Sequence[Finding]) -> pd.DataFrame:
    """Every image of the split except the flagged ones, with absolute paths, so the CSV
    works as `data.manifest=` with or without `data.root`, and keeps the split."""
    flagged = {f.path for f in findings}
    frame = catalog.to_frame()
    frame = frame[~frame["path"].isin(flagged)].copy()
    frame["path"] = [os.path.abspath(p) for p in frame["path"]]
    return frame


def run_audit(cfg: DictConfig) -> dict[str, Any]:
    """Write audit.html, issues.csv, clean_manifest.csv and audit.json into the run dir."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    options = cfg.audit
    seconds: dict[str, float] = {}
    start = last = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        seconds[name] = round(now - last, 3)
        last = now

    torch.manual_seed(cfg.seed)  # random weights (model.pretrained=false) are the same each run
    run = build_run(cfg)
    catalog, task = run.data.catalog, run.task
    lap("scan_and_model")
    device = resolve_device(cfg.get("device", "auto"))
    images, features, failed, reused = image_features(run, device)
    lap("features")
    source = run.data.source
    if not isinstance(source, FolderSource):
        raise ConfigError(f"audit reads image files; data.source={source.name} has none")
    anchor = str(source.anchor)
    digest = hashlib.sha1(os.fsencode(source.anchor.resolve())).hexdigest()[:20]
    cache_file = run.data.settings.cache_root / "fingerprints" / f"{digest}.json"
    prints = fingerprints(images["path"].tolist(), cache_file, source.limits)
    images = images.join(prints, on="path")
    lap("fingerprints")

    class_names = catalog.class_names
    findings = find_copies(
        images, features, options.hash_distance, options.min_similarity, options.sure_distance
    )
    lap("copies")
    labels = images["label"].to_numpy()
    is_train = (images["split"] == "train").to_numpy()
    probs = probe_probabilities(features, labels, is_train, options.folds, cfg.seed)
    if probs is None:
        log.warning("Label check skipped: a class has fewer than 2 training images")
    else:
        findings += find_label_errors(images, probs, class_names)
    lap("labels")
    findings += find_outliers(
        images, features, probs, options.neighbours, options.outlier_z, options.unclaimed
    )
    lap("outliers")
    findings += [Finding(b.path, "bad_file", 1.0, b.reason) for b in catalog.bad] + failed

    rank = {name: i for i, name in enumerate(ISSUES)}
    findings.sort(key=lambda f: (rank[f.issue], -f.score, f.path))
    issues = pd.DataFrame([asdict(f) for f in findings], columns=[*ISSUE_COLUMNS, "note"])
    write_csv(issues[ISSUE_COLUMNS], out / "issues.csv", index=False)
    clean = clean_manifest(catalog, findings)
    write_csv(clean, out / "clean_manifest.csv", index=False)
    counts = {name: sum(f.issue == name for f in findings) for name in ISSUES}
    members = per_member(task.preprocess, len(task.model.backbones()))
    stats = dataset_statistics(catalog, images, max(p.input_size for p in members))
    lap("csv")
    given = dict(zip(images["path"], (class_names[i] for i in labels), strict=True))
    write_page(
        out / "audit.html",
        findings,
        counts,
        stats,
        given=given,
        where=anchor,
        thumbnails=int(options.thumbnails),
        background=task.preprocess.background,
    )
    lap("page")
    total = time.perf_counter() - start
    summary = {
        "counts": counts,
        "images": len(images),
        "clean_images": len(clean),
        "features_reused": reused,
        "statistics": stats,
        "seconds": {**seconds, "total": round(total, 3)},
        "seconds_per_image": round(total / max(1, len(images)), 5),
    }
    write_json(out / "audit.json", summary)
    log.info(
        "Audit of %d images in %.1f s (features %s): %s; %d images in clean_manifest.csv; page: %s",
        len(images),
        total,
        "reused" if reused else "computed",
        ", ".join(f"{n} {name}" for name, n in counts.items()),
        len(clean),
        out / "audit.html",
    )
    return summary
