"""Intervals beside accuracies: on a val split of 153 images one image is 0.65 points, so a
number without its interval invites ranking two runs that do not differ.

Every accuracy vision_tl writes to JSON gets a `<key>_ci95` sibling, a 95% Wilson score
interval (scipy's `binomtest`) over the images it was measured on. Wilson rather than the
normal approximation: it stays inside [0, 1] and is honest at 100% on a few dozen images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

CONFIDENCE = 0.95
SUFFIX = "_ci95"
SPLITS = ("train", "test", "val")  # a key naming none of them is a val accuracy


def wilson_interval(accuracy: float, n: int, confidence: float = CONFIDENCE) -> list[float] | None:
    """The Wilson score interval of `accuracy` measured on `n` images; None without images
    or a number."""
    if not n or accuracy is None or not math.isfinite(float(accuracy)):
        return None
    correct = min(n, max(0, round(float(accuracy) * n)))
    from scipy.stats import binomtest  # ~1 s of imports, which a command without an interval skips

    ci = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return [round(float(ci.low), 6), round(float(ci.high), 6)]


def is_accuracy(key: str) -> bool:
    """`acc`, `acc_top5`, `val_acc`, `best_val_acc`, `holdout_acc`... (not `acc_ci95`)."""
    if key.endswith(SUFFIX):
        return False
    parts = key.split("_")
    return "acc" in parts


def split_of(key: str) -> str:
    parts = key.split("_")
    return next((s for s in SPLITS if s in parts), "val")


def with_intervals(record: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[str, Any]:
    """`record` with a `<key>_ci95` beside each accuracy, recursively.

    `sizes` gives the images per split (an accuracy's split is the one its key names, val
    when it names none). A nested record that says its own `num_images` (the probe's
    held-out images, an eval's split) is measured on those, for every accuracy in it. A
    dict of accuracies by name (ensemble members) gets a dict of intervals.
    """
    if isinstance(record.get("num_images"), int):
        sizes = dict.fromkeys(SPLITS, record["num_images"])
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            value = with_intervals(value, sizes)
        elif isinstance(value, list) and any(isinstance(v, Mapping) for v in value):
            value = [with_intervals(v, sizes) if isinstance(v, Mapping) else v for v in value]
        out[key] = value
        if not is_accuracy(key) or f"{key}{SUFFIX}" in record:
            continue
        n = sizes.get(split_of(key), 0)
        if isinstance(value, Mapping):
            out[f"{key}{SUFFIX}"] = {
                name: wilson_interval(acc, n)
                for name, acc in value.items()
                if isinstance(acc, (int, float))
            }
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{key}{SUFFIX}"] = wilson_interval(value, n)
    return out


def overlaps(a: list[float] | None, b: list[float] | None) -> bool:
    """Whether two intervals share a point: two runs that overlap are not ranked apart."""
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def format_interval(ci: list[float] | None) -> str:
    """`0.912-0.971` for logs and pages; `n/a` without one."""
    return "n/a" if ci is None else f"{ci[0]:.3f}-{ci[1]:.3f}"


def tied_with_best(frame: pd.DataFrame, column: str) -> pd.Series:
    """Per row, whether the interval `<column>_lo`..`<column>_hi` overlaps the best row's
    (by `column`; the best row itself included): rows that overlap are not ranked apart.
    NaN where a row has no interval."""
    lo, hi = frame[f"{column}_lo"], frame[f"{column}_hi"]
    known = lo.notna() & hi.notna() & frame[column].notna()
    if not known.any():
        return pd.Series(math.nan, index=frame.index, dtype=object)
    top = frame.loc[known, column].idxmax()
    best = [lo[top], hi[top]]
    return pd.Series(
        [overlaps([lo[i], hi[i]], best) if known[i] else math.nan for i in frame.index],
        index=frame.index,
        dtype=object,
    )
