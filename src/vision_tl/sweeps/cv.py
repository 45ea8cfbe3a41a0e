"""Cross-validation (`cv.folds=K`): K runs over train+val, each holding out one stratified,
seeded fold as its val split; out-of-fold predictions for every image; the mean, spread
and an interval of the folds' accuracies; and, when the folds differ only in a linear head
(a linear probe on a frozen backbone), one checkpoint that averages them.

On a few hundred images one val split is a noisy number (one image of 153 is 0.65
points); K folds use every image as val once. Each fold is an ordinary run (its own
folder, checkpoints and metrics.json) reading the data through `FoldSource`, a `Source`
whose catalog is the fold's. The features of a frozen backbone are keyed by the images,
not the split, so the eval-view features are extracted once for all folds, and the
augmented views are drawn over the whole pool (`Catalog.views_pool`) and extracted once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from scipy.stats import t as student_t
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from vision_tl.core.errors import ConfigError
from vision_tl.core.io import read_json, write_csv, write_json
from vision_tl.core.stats import format_interval, wilson_interval
from vision_tl.data.preprocess import AnyPreprocess
from vision_tl.data.source import Catalog, Source
from vision_tl.training.build import build_data
from vision_tl.training.calibration import fit_temperature
from vision_tl.training.checkpoints import save_checkpoint

log = logging.getLogger(__name__)

TrainFn = Callable[..., dict[str, Any]]


class FoldSource(Source):
    """`base`'s samples with another catalog (a fold's splits); everything else is the
    base's, so cached features and resized copies are shared by every fold."""

    def __init__(self, base: Source, catalog: Catalog) -> None:
        self.base, self.fold = base, catalog
        self.name = base.name
        self.iterable = base.iterable

    def catalog(self) -> Catalog:
        return self.fold

    def open(self, key: str, preprocess: AnyPreprocess) -> torch.Tensor:
        return self.base.open(key, preprocess)

    def signature(self, keys: Sequence[str]) -> str:
        return self.base.signature(keys)

    def file(self, key: str) -> str | None:
        return self.base.file(key)

    def describe(self) -> str:
        return self.base.describe()

    def name_of(self, key: str) -> str:
        return self.base.name_of(key)

    def preprocess_defaults(self) -> dict[str, Any]:
        return self.base.preprocess_defaults()


def fold_catalogs(catalog: Catalog, folds: int, seed: int) -> list[Catalog]:
    """K catalogs over train+val: fold k is val, the rest train (stratified, shuffled by
    `seed`; grouped when the catalog has groups, so a group's images share a fold); a test
    split, if any, stays the test split of every fold. Every fold draws its augmented
    views from the whole pool, so the feature cache extracts them once for all folds."""
    pool = [*catalog.samples.get("train", []), *catalog.samples.get("val", [])]
    labels = np.array([label for _, label in pool])
    counts = np.bincount(labels, minlength=len(catalog.class_names))
    if counts.min() < folds:
        name = catalog.class_names[int(counts.argmin())]
        raise ConfigError(
            f"cv.folds={folds}: class {name!r} has {int(counts.min())} image(s) in train+val; "
            f"every class needs at least {folds} (lower cv.folds)"
        )
    if catalog.groups:
        groups = [catalog.groups.get(key, f"\0{key}") for key, _ in pool]  # ungrouped: alone
        if len(set(groups)) < folds:
            raise ConfigError(
                f"cv.folds={folds}: the manifest's group column has {len(set(groups))} "
                f"group(s) in train+val; grouped folds need at least {folds}"
            )
        splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
        parts = splitter.split(np.zeros(len(pool)), labels, groups)
    else:
        parts = StratifiedKFold(folds, shuffle=True, random_state=seed).split(pool, labels)
    out = []
    for train_rows, val_rows in parts:
        samples = {"train": [pool[i] for i in train_rows], "val": [pool[i] for i in val_rows]}
        if catalog.samples.get("test"):
            samples["test"] = list(catalog.samples["test"])
        out.append(dataclasses.replace(catalog, samples=samples, views_pool=pool))
    return out


def fold_config(cfg: DictConfig, fold_dir: Path) -> DictConfig:
    """A fold's run: this config in `fold_dir`, no CV of its own, no predictions."""
    run = cfg.copy()
    with open_dict(run):
        run.paths.output_dir = str(fold_dir)
        run.cv.folds = None
        run.predict_input = None
    return run


def finished_run(fold_cfg: DictConfig, fold_dir: Path) -> dict[str, Any] | None:
    """A fold's metrics when it already finished with this exact config (a rerun after a
    stop continues with the next fold)."""
    metrics = read_json(fold_dir / "metrics.json")
    written = fold_dir / "config.yaml"
    if not metrics or not written.is_file() or not metrics.get("best_checkpoint"):
        return None
    if written.read_text() != OmegaConf.to_yaml(fold_cfg, resolve=True):
        return None
    return metrics if Path(metrics["best_checkpoint"]).is_file() else None


def out_of_fold(
    cfg: DictConfig, ckpt: str, source: Source, samples: list[tuple[str, int]], fold: int
) -> tuple[pd.DataFrame, torch.Tensor, torch.Tensor]:
    """The fold's held-out images predicted by the fold's best checkpoint (calibrated by
    its temperature): a frame of rows, and their log-probabilities and labels."""
    from vision_tl.inference.checkpoint import load_checkpoint
    from vision_tl.inference.predictor import predictor_from_config, run_settings

    loaded = load_checkpoint(ckpt)
    keys = [key for key, _ in samples]
    predictor = predictor_from_config(loaded, run_settings(cfg))
    result = predictor.predict(keys, source.reader(loaded.preprocess))
    classes = loaded.class_names
    target = torch.tensor([samples[i][1] for i in result.indices])
    probs = result.probs
    frame = pd.DataFrame(
        {
            "path": [source.name_of(keys[i]) for i in result.indices],
            "fold": fold,
            "true_label": [classes[t] for t in target.tolist()],
            "label": [classes[i] for i in probs.argmax(1).tolist()],
            "confidence": probs.max(1).values.numpy(),
            **{f"prob_{c}": probs[:, j].numpy() for j, c in enumerate(classes)},
        }
    )
    log_probs = probs.clamp_min(torch.finfo(probs.dtype).tiny).log() * loaded.temperature
    return frame, log_probs, target


def average_heads(paths: Sequence[str], out: Path, temperature: float) -> str | None:
    """One checkpoint whose linear head is the folds' average: exactly the mean of the
    folds' logits, when every fold has the same backbone (frozen) and a linear head.
    Returns why not, or None when written."""
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    weights = [s["state_dict"] for s in states]
    differ = [k for k in weights[0] if any(not torch.equal(weights[0][k], w[k]) for w in weights)]
    head = [k for k in weights[0] if k.startswith("model.head.")]
    if any(not k.startswith("model.head.") for k in differ):
        return "the folds trained the backbone (only linear probes average exactly)"
    kinds = {k.rsplit(".", 2)[-2] for k in head}
    if not head or len(kinds) > 1:  # one Linear (after an optional Dropout): an affine map
        return "the head is not a single linear layer (only linear heads average exactly)"
    merged = states[0]
    for key in head:
        merged["state_dict"][key] = torch.stack([w[key].float() for w in weights]).mean(0)
    meta = merged.setdefault("vision_tl", {})
    meta["temperature"] = float(temperature)
    meta["cv"] = {"folds": len(paths), "checkpoints": [str(p) for p in paths]}
    meta.pop("operating_point", None)  # fitted on one fold's val: not the average's
    save_checkpoint(merged, out)
    return None


def summarize(accuracies: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and a 95% t-interval of the folds' accuracies."""
    values = np.asarray(accuracies, dtype=float)
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    half = float(student_t.ppf(0.975, len(values) - 1)) * std / math.sqrt(len(values))
    return {
        "mean_val_acc": round(mean, 6),
        "std_val_acc": round(std, 6),
        "mean_val_acc_ci95": [round(max(0.0, mean - half), 6), round(min(1.0, mean + half), 6)],
    }


def run_cv(cfg: DictConfig, train: TrainFn, predict: Any = None) -> dict[str, Any]:
    """Train `cfg.cv.folds` folds with `train(cfg, source=...)` (`run_training`), write
    `oof_predictions.csv`, `cv_summary.json` (also as `metrics.json`, for sweeps and the
    report) and, where the heads average exactly, `fold_ensemble.ckpt`."""
    folds = int(cfg.cv.folds)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(cfg.data)
    seed = int(cfg.get("seed") or 0)
    catalogs = fold_catalogs(data.catalog, folds, seed)
    log.info("Cross-validation: %d folds of train+val in %s", folds, out)
    results, frames, logits, targets = [], [], [], []
    for k, catalog in enumerate(catalogs):
        fold_dir = out / f"fold_{k}"
        run_cfg = fold_config(cfg, fold_dir)
        source = FoldSource(data.source, catalog)
        metrics = finished_run(run_cfg, fold_dir)
        if metrics is None:
            log.info("Fold %d/%d: %d train, %d val images", k + 1, folds, *_sizes(catalog))
            metrics = train(run_cfg, source=source)
        else:
            log.info("Fold %d/%d finished in an earlier run: reusing it", k + 1, folds)
        ckpt = metrics.get("best_checkpoint") or metrics.get("last_checkpoint")
        frame, fold_logits, target = out_of_fold(cfg, ckpt, source, catalog.samples["val"], k)
        frames.append(frame)
        logits.append(fold_logits)
        targets.append(target)
        results.append(
            {
                "fold": k,
                "best_val_acc": metrics["best_val_acc"],
                "best_val_acc_ci95": metrics.get("best_val_acc_ci95"),
                "num_images": len(catalog.samples["val"]),
                "run_dir": str(fold_dir),
                "best_checkpoint": ckpt,
            }
        )
    oof = pd.concat(frames, ignore_index=True)
    write_csv(oof, out / "oof_predictions.csv", index=False, float_format="%.6g")
    oof_acc = float((oof["label"] == oof["true_label"]).mean())
    all_logits, all_targets = torch.cat(logits), torch.cat(targets)
    temperature = fit_temperature(all_logits.float(), all_targets)
    summary: dict[str, Any] = {
        "folds": folds,
        "seed": seed,
        "fold_results": results,
        **summarize([r["best_val_acc"] for r in results]),
        "oof_acc": round(oof_acc, 6),
        "oof_acc_ci95": wilson_interval(oof_acc, len(oof)),
        "num_images": len(oof),
        "class_names": data.catalog.class_names,
        "oof_temperature": temperature,
    }
    why_not = (
        average_heads(
            [r["best_checkpoint"] for r in results], out / "fold_ensemble.ckpt", temperature
        )
        if cfg.cv.get("ensemble", True)
        else "cv.ensemble=false"
    )
    summary["ensemble_checkpoint"] = None if why_not else str(out / "fold_ensemble.ckpt")
    summary["ensemble_skipped"] = why_not
    if why_not is None and predict is not None and cfg.get("predict_input"):
        summary["predictions"] = str(predict(cfg, summary["ensemble_checkpoint"], out))
    summary["best_val_acc"] = summary["mean_val_acc"]  # what a sweep over CV runs optimises
    write_json(out / "cv_summary.json", summary)
    write_json(out / "metrics.json", summary)
    log.info(
        "Cross-validation: mean val acc %.4f +- %.4f over %d folds (95%% interval %s); "
        "out-of-fold acc %.4f (%s, %d images); %s",
        summary["mean_val_acc"],
        summary["std_val_acc"],
        folds,
        format_interval(summary["mean_val_acc_ci95"]),
        oof_acc,
        format_interval(summary["oof_acc_ci95"]),
        len(oof),
        f"fold ensemble: {summary['ensemble_checkpoint']}"
        if why_not is None
        else f"no fold ensemble: {why_not}",
    )
    return summary


def _sizes(catalog: Catalog) -> tuple[int, int]:
    return len(catalog.samples["train"]), len(catalog.samples["val"])
