"""Intervals beside accuracies (`core.stats`)."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from helpers.intervals import accuracies_without_interval

from vision_tl.core.stats import overlaps, tied_with_best, wilson_interval, with_intervals

pytestmark = pytest.mark.unit


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(145, 153), (30, 30), (0, 12), (7, 9)])
def test_wilson_interval_is_the_textbook_formula(k: int, n: int) -> None:
    lo, hi = wilson_interval(k / n, n)
    assert (lo, hi) == pytest.approx(_wilson(k, n), abs=2e-6)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_a_perfect_score_on_few_images_is_not_certain() -> None:
    lo, hi = wilson_interval(1.0, 30)
    assert hi == 1.0 and lo < 0.9, "100% on 30 images is compatible with 89%"
    assert wilson_interval(1.0, 3000)[0] > 0.998
    assert wilson_interval(0.9, 0) is None and wilson_interval(float("nan"), 10) is None


def test_every_accuracy_gets_an_interval_on_its_own_images() -> None:
    record = {
        "best_val_acc": 0.9,
        "final_train_acc": 0.95,
        "test_acc": 0.8,
        "val_loss": 0.3,
        "acc_top5": None,
        "val_acc_members": {"a": 0.9, "b": 0.7},
        "probe": {
            "num_images": 40,
            "holdout_acc": 0.75,
            "candidates": [{"holdout_acc": 0.5, "lr": 0.1}],
        },
    }
    sizes = {"train": 200, "val": 100, "test": 50}
    out = with_intervals(record, sizes)
    assert accuracies_without_interval(out) == []
    assert accuracies_without_interval(record) != [], "the check itself must see a gap"
    assert out["best_val_acc_ci95"] == wilson_interval(0.9, 100)
    assert out["final_train_acc_ci95"] == wilson_interval(0.95, 200)
    assert out["test_acc_ci95"] == wilson_interval(0.8, 50)
    assert out["probe"]["holdout_acc_ci95"] == wilson_interval(0.75, 40)
    assert out["probe"]["candidates"][0]["holdout_acc_ci95"] == wilson_interval(0.5, 40)
    assert out["val_acc_members_ci95"]["b"] == wilson_interval(0.7, 100)
    assert "val_loss_ci95" not in out and "acc_top5_ci95" not in out


def test_rows_whose_intervals_overlap_the_best_are_tied() -> None:
    frame = pd.DataFrame({"acc": [0.95, 0.93, 0.70, None], "n": [150, 150, 150, 150]})
    bounds = [
        wilson_interval(a, n) if a == a and a is not None else [None, None]
        for a, n in zip(frame["acc"], frame["n"], strict=True)
    ]
    frame["acc_lo"] = [b[0] for b in bounds]
    frame["acc_hi"] = [b[1] for b in bounds]
    tied = tied_with_best(frame, "acc").tolist()
    assert tied[:3] == [True, True, False] and math.isnan(tied[3])
    assert overlaps([0.1, 0.2], [0.2, 0.3]) and not overlaps([0.1, 0.2], [0.25, 0.3])
    assert not overlaps(None, [0.1, 0.2])
