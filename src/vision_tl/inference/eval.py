"""`run_eval(cfg)`: judge a checkpoint on a labelled split (worker of `python -m vision_tl.eval`).

The data is read exactly as training reads it (same layouts, manifest and split rules),
and images go through the checkpoint's own preprocessing on the training decode path.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_calibration_error,
    multiclass_confusion_matrix,
    multiclass_f1_score,
    multiclass_precision,
    multiclass_recall,
)

from vision_tl.core.errors import ConfigError
from vision_tl.core.io import write_csv, write_json
from vision_tl.core.plots import confusion_matrix_figure, save_figure
from vision_tl.core.stats import format_interval, wilson_interval, with_intervals
from vision_tl.core.validate import did_you_mean
from vision_tl.data.decode import ReadLimits, load_rgb
from vision_tl.data.source import SPLITS
from vision_tl.data.unlabeled import list_images
from vision_tl.inference.checkpoint import LoadedModel, check_class_names, load_checkpoint
from vision_tl.inference.explain import explain
from vision_tl.inference.predictor import (
    Predictions,
    predictions_frame,
    predictor_from_config,
    write_unreadable,
)
from vision_tl.inference.review_page import write_review
from vision_tl.training.binary import binary_metrics, write_curves
from vision_tl.training.build import build_data
from vision_tl.training.openset import (
    OpenSet,
    open_set_metrics,
    plot_risk_coverage,
    risk_coverage,
)

log = logging.getLogger(__name__)

EVAL_SPLITS = ("auto", *SPLITS, "all")


def select_split(samples: dict[str, list[tuple[str, int]]], split: str) -> tuple[str, list]:
    """`auto` is the test split when the data has one, else val; `all` is every image."""
    if split not in EVAL_SPLITS:
        raise ConfigError(
            f"split={split}: one of {', '.join(EVAL_SPLITS)}{did_you_mean(str(split), EVAL_SPLITS)}"
        )
    if split == "auto":
        split = "test" if samples.get("test") else "val"
    if split == "all":
        return split, [s for name in SPLITS for s in samples.get(name, [])]
    if not samples.get(split):
        present = [name for name in SPLITS if samples.get(name)]
        raise ConfigError(f"the data has no labelled {split} split (it has {', '.join(present)})")
    return split, list(samples[split])


def per_image_loss(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the true class, from (TTA-averaged) probabilities."""
    return -probs.gather(1, target[:, None])[:, 0].clamp_min(torch.finfo(probs.dtype).tiny).log()


def classification_metrics(
    probs: torch.Tensor, target: torch.Tensor, class_names: Sequence[str], ece_bins: int = 15
) -> tuple[dict[str, Any], pd.DataFrame, torch.Tensor]:
    """Scalar metrics, a per-class table and the confusion matrix (true class per row).

    `acc_top5` is null with 5 classes or fewer, where it would always be 1.
    """
    n = len(class_names)
    scalars: dict[str, Any] = {
        "acc": float(multiclass_accuracy(probs, target, n, average="micro")),
        "acc_top5": float(multiclass_accuracy(probs, target, n, average="micro", top_k=5))
        if n > 5
        else None,
        "f1_macro": float(multiclass_f1_score(probs, target, n, average="macro")),
        "ece": float(multiclass_calibration_error(probs, target, n, n_bins=ece_bins, norm="l1")),
        "loss": float(per_image_loss(probs, target).mean()),
    }
    per_class = pd.DataFrame(
        {
            "class": list(class_names),
            "precision": multiclass_precision(probs, target, n, average=None).numpy(),
            "recall": multiclass_recall(probs, target, n, average=None).numpy(),
            "f1": multiclass_f1_score(probs, target, n, average=None).numpy(),
            "support": torch.bincount(target, minlength=n).numpy(),
        }
    )
    confmat = multiclass_confusion_matrix(probs, target, n)
    predicted, support = confmat.sum(0).tolist(), confmat.sum(1).tolist()
    for column, counts in (("precision", predicted), ("recall", support)):
        bounds = [
            wilson_interval(v, int(c)) or [math.nan, math.nan]
            for v, c in zip(per_class[column], counts, strict=True)
        ]
        per_class[f"{column}_lo"] = [b[0] for b in bounds]
        per_class[f"{column}_hi"] = [b[1] for b in bounds]
    return scalars, per_class, confmat


def json_records(frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """{row: {column: value}} with missing values (an interval over no images) as null."""
    return frame.astype(object).where(frame.notna(), None).to_dict(orient="index")


def highest_loss_figure(
    files: Sequence[str | Path],
    titles: Sequence[str],
    background: tuple[int, int, int] = (255, 255, 255),
    thumbnail: int = 256,
    limits: ReadLimits | None = None,
) -> Figure:
    """A grid of whole images (not the network's crop, to show what was cut away) with a
    title each (true and predicted label), worst first."""
    n = max(1, len(files))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), dpi=80, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, file, title in zip(axes.flat, files, titles, strict=False):
        image = load_rgb(file, background, limits=limits)
        image.thumbnail((thumbnail, thumbnail))
        ax.imshow(image)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def _save(fig: Figure, path: Path) -> None:
    save_figure(fig, path)


def highest_loss_cams(
    loaded: LoadedModel, files: Sequence[Path | None], rows: Sequence[int], cfg: DictConfig
) -> dict[int, Any]:
    """Grad-CAM overlays of the predicted class for these rows (the first member's, for an
    ensemble), by row; images without a file or that no longer read are left out."""
    chosen = [r for r in rows if files[r] is not None]
    if not chosen:
        return {}
    explanations, _ = explain(
        loaded,
        [Path(files[r]) for r in chosen],
        device=str(cfg.get("device", "auto")),
        limits=ReadLimits.from_config(cfg.data),
    )
    return {chosen[e.index]: next(iter(e.overlays.values())) for e in explanations}


def two_class_report(
    probs: torch.Tensor, target: torch.Tensor, loaded: LoadedModel, cfg: DictConfig, out: Path
) -> dict[str, Any]:
    """ROC-AUC, PR-AUC and both curves for the positive class (the checkpoint's operating
    point's, else `positive_class`, else the second), and what its threshold gives here."""
    point = loaded.operating_point
    positive = point.positive if point else cfg.get("positive_class")
    report = binary_metrics(probs, target, loaded.class_names, positive)
    write_curves(probs, target, loaded.class_names, positive, out, point)
    if point is not None:
        labels = point.labels(probs, loaded.class_names)
        index = loaded.class_names.index(point.positive)
        chosen = torch.tensor([label == point.positive for label in labels])
        truth = target == index
        hits = int((chosen & truth).sum())
        report["operating_point"] = {
            **point.as_dict(),
            "split_precision": hits / int(chosen.sum()) if chosen.any() else None,
            "split_recall": hits / int(truth.sum()) if truth.any() else None,
        }
    return report


def open_set_report(
    loaded: LoadedModel,
    known: Predictions,
    target: torch.Tensor,
    unknown: Predictions,
    temperature: float,
    out: Path,
) -> dict[str, Any]:
    """Known images against `unknown=DIR`'s: AUROC and FPR at 95% TPR by the checkpoint's
    open-set score (the top probability when it has none), the same for every score kind
    it can compute, the shares kept and rejected at the fitted threshold, and
    `open_set_risk_coverage.png`."""
    if not unknown.indices:
        raise ConfigError("unknown: none of its images could be read")
    detector = loaded.open_set or OpenSet("msp", {})
    kinds = detector.kinds()
    correct_known = known.probs.argmax(1) == target
    correct = torch.cat([correct_known, torch.zeros(len(unknown.indices), dtype=torch.bool)])
    report: dict[str, Any] = {"open_set_score": detector.kind, "num_unknown": len(unknown.indices)}
    curves = {}
    for kind in kinds:
        inside = detector.scores(known.features, known.logits, temperature, kind)  # type: ignore[arg-type]
        outside = detector.scores(unknown.features, unknown.logits, temperature, kind)  # type: ignore[arg-type]
        measured = open_set_metrics(inside, outside)
        report.update({f"{name}_{kind}": value for name, value in measured.items()})
        if kind == detector.kind:
            report.update(measured)
            if kind in detector.thresholds:
                report["open_set_threshold"] = detector.threshold
                report["open_set_known_kept"] = float(
                    (inside >= detector.threshold).double().mean()
                )
                report["open_set_unknown_rejected"] = float(
                    (outside < detector.threshold).double().mean()
                )
        curves[kind] = risk_coverage(torch.cat([inside, outside]), correct)
    plot_risk_coverage(curves, out / "open_set_risk_coverage.png")
    log.info(
        "Open set (%s score) on %d unknown image(s): AUROC %.4f, FPR at 95%% TPR %.4f",
        detector.kind,
        len(unknown.indices),
        report["open_set_auroc"],
        report["open_set_fpr95"],
    )
    return report


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Write metrics, per-class and per-image CSVs and two PNGs into the run dir."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_checkpoint(cfg.get("ckpt_path"))
    data = build_data(cfg.data)
    source, where = data.source, data.source.describe()
    check_class_names(loaded.class_names, data.catalog.class_names, where)
    split, samples = select_split(data.catalog.samples, str(cfg.get("split", "auto")))
    keys = [key for key, _ in samples]
    names = [source.name_of(key) for key in keys]
    log.info("Evaluating %s on %d %s image(s) from %s", loaded.path, len(keys), split, where)

    predictor = predictor_from_config(loaded, cfg, measured=True)
    unknown_spec = cfg.get("unknown")
    unknown_files = list_images(unknown_spec, "unknown") if unknown_spec else []
    result = predictor.predict(keys, source.reader(loaded.preprocess), bool(unknown_files))
    write_unreadable(out / "unreadable.csv", names, result.unreadable)
    if not result.indices:
        raise ConfigError(f"none of the {len(keys)} {split} image(s) of {where} could be read")
    target = torch.tensor([samples[i][1] for i in result.indices])
    probs = result.probs
    scalars, per_class, confmat = classification_metrics(probs, target, loaded.class_names)

    frame = predictions_frame([names[i] for i in result.indices], probs, loaded.class_names)
    frame.insert(1, "true_label", [loaded.class_names[t] for t in target.tolist()])
    frame.insert(4, "loss", per_image_loss(probs, target).numpy())
    write_csv(frame, out / "predictions.csv", index=False, float_format="%.6g")
    write_csv(per_class, out / "per_class.csv", index=False, float_format="%.6g")
    counts = pd.DataFrame(confmat.numpy(), index=loaded.class_names, columns=loaded.class_names)
    write_csv(counts.rename_axis("true").reset_index(), out / "confusion_matrix.csv", index=False)
    _save(confusion_matrix_figure(confmat, loaded.class_names), out / "confusion_matrix.png")
    worst = frame.sort_values("loss", ascending=False, kind="stable").head(cfg.num_highest_loss)
    titles = [
        f"true: {r.true_label}\npred: {r.top1_label} ({r.confidence:.2f})"
        for r in worst.itertuples()
    ]
    worst_files = [source.file(keys[result.indices[row]]) for row in worst.index]
    shown = [(f, t) for f, t in zip(worst_files, titles, strict=True) if f is not None]
    _save(
        highest_loss_figure(
            [f for f, _ in shown],
            [t for _, t in shown],
            loaded.preprocess.background,
            limits=ReadLimits.from_config(cfg.data),
        ),
        out / "highest_loss.png",
    )

    metrics = {
        **scalars,
        "split": split,
        "num_images": len(result.indices),
        "num_unreadable": len(result.unreadable),
        "class_names": loaded.class_names,
        "per_class": json_records(per_class.set_index("class")),
        "ckpt_path": str(loaded.path),
        "data": where,
        "data_root": cfg.data.get("root"),
        "manifest": cfg.data.get("manifest"),
        "tta": OmegaConf.to_container(cfg.tta),
        "temperature": predictor.temperature,
        "engine": predictor.engine,
        "precision": predictor.precision,
        "images_per_s": round(result.images_per_second, 2),
    }
    if len(loaded.class_names) == 2:
        metrics.update(two_class_report(probs, target, loaded, cfg, out))
    if unknown_files:
        unknown = predictor.predict(unknown_files, keep_outputs=True)
        metrics.update(open_set_report(loaded, result, target, unknown, predictor.temperature, out))
    metrics = with_intervals(metrics, {})  # `num_images` is every accuracy's n here
    write_json(out / "metrics.json", metrics)
    review = cfg.get("review") or {}
    if review.get("write", True):
        files = [source.file(keys[i]) for i in result.indices]
        write_review(
            out / "review.html",
            predictions=frame,
            files=files,
            classes=loaded.class_names,
            confmat=confmat,
            per_class=per_class,
            metrics=metrics,
            cams=highest_loss_cams(loaded, files, list(worst.index), cfg)
            if review.get("gradcam", True)
            else {},
            per_cell=int(review.get("per_cell", 48)),
            background=loaded.preprocess.background,
        )
    top5 = "" if scalars["acc_top5"] is None else f", top-5 {scalars['acc_top5']:.4f}"
    log.info(
        "%s acc %.4f (95%% interval %s, %d images)%s, macro F1 %.4f, ECE %.4f; files in %s",
        split,
        scalars["acc"],
        format_interval(metrics["acc_ci95"]),
        len(result.indices),
        top5,
        scalars["f1_macro"],
        scalars["ece"],
        out,
    )
    return metrics
