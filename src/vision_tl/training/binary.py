"""Two-class problems: ranking quality (ROC-AUC, PR-AUC and their curves) and an operating
threshold on the positive class's probability chosen on val for a target precision or
recall, which the checkpoint carries and `predict` applies.

Accuracy at 0.5 hides what a binary user must choose: how many false alarms to trade for
each miss. The threshold is fitted on the calibrated val probabilities of the best
checkpoint, the same probabilities `predict` computes.

torchmetrics and matplotlib are imported where a curve is computed: `predict` and `serve`
only apply a fitted point, and skip their ~2.4 s of imports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vision_tl.core.errors import ConfigError
from vision_tl.core.validate import did_you_mean


@dataclass(frozen=True)
class OperatingPoint:
    """Predict `positive` when its probability is at least `threshold`; what it gave on val."""

    positive: str
    threshold: float
    target: str  # "precision" or "recall"
    value: float  # the target asked for
    precision: float  # on the val images it was fitted on
    recall: float
    num_images: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> OperatingPoint | None:
        return None if not data else cls(**data)

    def labels(self, probs: torch.Tensor, class_names: Sequence[str]) -> list[str]:
        """Each image's label at this threshold (probabilities in `class_names` order)."""
        index = list(class_names).index(self.positive)
        other = class_names[1 - index]
        return [self.positive if p >= self.threshold else other for p in probs[:, index].tolist()]


def positive_index(class_names: Sequence[str], positive: str | None) -> int:
    """The positive class: the one named, else the second (`1` in sorted folder order)."""
    if positive is None:
        return 1
    if positive not in class_names:
        raise ConfigError(
            f"operating_point.positive_class={positive}: not a class "
            f"({', '.join(class_names)}){did_you_mean(str(positive), class_names)}"
        )
    return list(class_names).index(positive)


def fit_operating_point(
    probs: torch.Tensor,
    target: torch.Tensor,
    class_names: Sequence[str],
    precision: float | None = None,
    recall: float | None = None,
    positive: str | None = None,
) -> OperatingPoint | None:
    """The threshold meeting `precision` with the most recall (or `recall` with the most
    precision) on these images; None when no threshold meets it (logged by the caller)."""
    from torchmetrics.functional.classification import binary_precision_recall_curve

    if len(class_names) != 2 or (precision is None and recall is None) or len(target) == 0:
        return None
    index = positive_index(class_names, positive)
    scores, truth = probs[:, index].double(), (target == index).long()
    curve_p, curve_r, thresholds = binary_precision_recall_curve(scores, truth)
    curve_p, curve_r = curve_p[:-1], curve_r[:-1]  # the last point has no threshold
    if precision is not None:
        ok = curve_p >= precision - 1e-12
        if not ok.any():
            return None
        best = int(torch.where(ok, curve_r, torch.full_like(curve_r, -1)).argmax())
        kind, value = "precision", float(precision)
    else:
        ok = curve_r >= float(recall) - 1e-12
        best = int(torch.where(ok, curve_p, torch.full_like(curve_p, -1)).argmax())
        kind, value = "recall", float(recall)
    # Halfway to the next lower score: the same images pass on val, and a probability
    # recomputed in another batch or precision does not fall off the edge.
    chosen = float(thresholds[best])
    lower = scores[scores < chosen]
    threshold = (chosen + float(lower.max())) / 2 if len(lower) else chosen / 2
    return OperatingPoint(
        positive=class_names[index],
        threshold=threshold,
        target=kind,
        value=value,
        precision=round(float(curve_p[best]), 6),
        recall=round(float(curve_r[best]), 6),
        num_images=len(target),
    )


def binary_metrics(
    probs: torch.Tensor, target: torch.Tensor, class_names: Sequence[str], positive: str | None
) -> dict[str, Any]:
    """ROC-AUC and PR-AUC (average precision) of the positive class's probability."""
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    index = positive_index(class_names, positive)
    scores, truth = probs[:, index].double(), (target == index).long()
    both = 0 < int(truth.sum()) < len(truth)
    return {
        "positive_class": class_names[index],
        "roc_auc": float(binary_auroc(scores, truth)) if both else None,
        "pr_auc": float(binary_average_precision(scores, truth)) if both else None,
    }


def write_curves(
    probs: torch.Tensor,
    target: torch.Tensor,
    class_names: Sequence[str],
    positive: str | None,
    out: Path,
    point: OperatingPoint | None = None,
) -> list[Path]:
    """`roc_curve.png` and `pr_curve.png`, with the operating point marked when there is one."""
    import matplotlib.pyplot as plt
    from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc

    from vision_tl.core.plots import save_figure

    index = positive_index(class_names, positive)
    scores, truth = probs[:, index].double(), (target == index).long()
    if not 0 < int(truth.sum()) < len(truth):
        return []
    fpr, tpr, _ = binary_roc(scores, truth)
    precision, recall, _ = binary_precision_recall_curve(scores, truth)
    written = []
    for name, x, y, labels in (
        ("roc_curve.png", fpr, tpr, ("false positive rate", "true positive rate")),
        ("pr_curve.png", recall, precision, ("recall", "precision")),
    ):
        fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=90)
        ax.plot(x.numpy(), y.numpy(), color="tab:blue")
        if name == "roc_curve.png":
            ax.plot([0, 1], [0, 1], "--", color="tab:gray", linewidth=0.8)
        elif point is not None:
            ax.plot([point.recall], [point.precision], "o", color="tab:red", label="threshold")
            ax.legend(loc="lower left")
        ax.set(xlabel=labels[0], ylabel=labels[1], xlim=(0, 1), ylim=(0, 1.02))
        ax.set_title(f"{name[:-10].upper()} curve, positive class: {class_names[index]}")
        fig.tight_layout()
        save_figure(fig, out / name)
        written.append(out / name)
    return written
