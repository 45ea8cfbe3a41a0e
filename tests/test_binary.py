"""Two-class problems: ROC-AUC and PR-AUC with their curves in eval, and a threshold fitted
on val for a target precision or recall that the checkpoint carries and predict applies."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY, compose_entry, make_image_folder
from sklearn.metrics import average_precision_score, roc_auc_score

from vision_tl.core.errors import ConfigError
from vision_tl.inference.checkpoint import load_checkpoint
from vision_tl.inference.eval import run_eval
from vision_tl.inference.predict import run_predict
from vision_tl.inference.predictor import LabelRule, predictions_frame
from vision_tl.training.binary import OperatingPoint, binary_metrics, fit_operating_point
from vision_tl.training.train import run_training

CLASSES = ["ants", "bees"]


def _scores(n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """Bees score higher on average, with overlap: no threshold is perfect."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, 2, (n,), generator=generator)
    logit = target * 1.5 + torch.randn(n, generator=generator)
    p = logit.sigmoid()
    return torch.stack([1 - p, p], 1), target


@pytest.mark.unit
def test_roc_and_pr_auc_match_scikit_learn() -> None:
    probs, target = _scores()
    report = binary_metrics(probs, target, CLASSES, None)
    assert report["positive_class"] == "bees"
    assert report["roc_auc"] == pytest.approx(roc_auc_score(target, probs[:, 1]), abs=1e-6)
    assert report["pr_auc"] == pytest.approx(average_precision_score(target, probs[:, 1]), abs=1e-6)
    flipped = binary_metrics(probs, target, CLASSES, "ants")
    assert flipped["roc_auc"] == pytest.approx(report["roc_auc"], abs=1e-6)
    with pytest.raises(ConfigError, match="positive_class=wasps: not a class"):
        binary_metrics(probs, target, CLASSES, "wasps")


@pytest.mark.unit
@pytest.mark.parametrize("goal", [0.8, 0.95])
def test_threshold_meets_the_precision_with_the_most_recall(goal: float) -> None:
    probs, target = _scores()
    point = fit_operating_point(probs, target, CLASSES, precision=goal)
    assert point is not None and point.target == "precision" and point.num_images == 400
    chosen = probs[:, 1] >= point.threshold
    hits = int((chosen & (target == 1)).sum())
    assert hits / int(chosen.sum()) >= goal
    assert point.recall == pytest.approx(hits / int((target == 1).sum()), abs=1e-6)
    # every lower threshold misses the precision: this one has the most recall that meets it
    for lower in probs[:, 1][probs[:, 1] < point.threshold].unique():
        picked = probs[:, 1] >= lower
        assert int((picked & (target == 1)).sum()) / int(picked.sum()) < goal
    labels = point.labels(probs, CLASSES)
    assert [label == "bees" for label in labels] == chosen.tolist()


@pytest.mark.unit
def test_recall_target_and_unreachable_precision() -> None:
    probs, target = _scores()
    point = fit_operating_point(probs, target, CLASSES, recall=0.9)
    chosen = probs[:, 1] >= point.threshold
    assert int((chosen & (target == 1)).sum()) / int((target == 1).sum()) >= 0.9
    assert OperatingPoint.from_dict(point.as_dict()) == point
    noise = torch.tensor([[0.5, 0.5]] * 10)
    assert fit_operating_point(noise, torch.tensor([0, 1] * 5), CLASSES, precision=0.99) is None
    assert fit_operating_point(probs, target, CLASSES) is None, "no target, no threshold"


@pytest.mark.unit
def test_predictions_follow_the_operating_point_not_the_argmax() -> None:
    probs = torch.tensor([[0.7, 0.3], [0.9, 0.1], [0.2, 0.8]])
    point = OperatingPoint("bees", 0.25, "recall", 1.0, 1.0, 1.0, 3)
    frame = predictions_frame(["a", "b", "c"], probs, CLASSES, LabelRule(operating_point=point))
    assert frame.label.tolist() == ["bees", "ants", "bees"]
    assert frame.top1_label.tolist() == ["ants", "ants", "bees"]


@pytest.mark.unit
@pytest.mark.parametrize("reject", [None, 0.75])
def test_serve_answers_follow_the_operating_point_as_predict_rows_do(reject) -> None:
    """`Scorer.answers` (serve) and `predictions_frame` (predict) label by one rule."""
    from vision_tl.inference.serving.scorer import Scorer

    probs = torch.tensor([[0.7, 0.3], [0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    point = OperatingPoint("bees", 0.25, "recall", 1.0, 1.0, 1.0, 3)
    names = ["a", "b", "c", "d"]
    rule = LabelRule(reject_threshold=reject, operating_point=point)
    frame = predictions_frame(names, probs, CLASSES, rule)
    scorer = Scorer(None, CLASSES, {}, rule)  # type: ignore[arg-type]  # answers only
    answers = scorer.answers(names, probs.numpy())
    assert [a.label for a in answers] == frame.label.tolist()
    if reject is None:
        assert [a.label for a in answers][:3] == ["bees", "ants", "bees"]
    assert [a.top_k[0][0] for a in answers] == frame.top1_label.tolist()
    assert [a.confidence for a in answers] == pytest.approx(frame.confidence.tolist())
    assert [a.unknown for a in answers] == [label == "unknown" for label in frame.label]


@pytest.mark.slow  # out of the suite for its 10-minute budget; run with -m slow
def test_a_binary_run_stores_its_threshold_and_eval_and_predict_use_it(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", classes=tuple(CLASSES), per_class=8)
    quiet = ["logger=none", "callbacks.learning_rate_monitor=null", "trainer.max_epochs=1"]
    train = [*TINY, *quiet, f"data.root={root}", "operating_point.target_recall=1.0"]
    metrics = run_training(compose_entry("train", train, tmp_path / "run"))
    point = metrics["operating_point"]
    assert point["positive"] == "bees" and point["recall"] == 1.0 and point["num_images"] == 16
    best = tmp_path / "run" / "checkpoints" / "best.ckpt"
    loaded = load_checkpoint(best)
    assert loaded.operating_point == OperatingPoint.from_dict(point)

    report = run_eval(
        compose_entry(
            "eval", [f"ckpt_path={best}", f"data.root={root}", "num_workers=0"], tmp_path / "eval"
        )
    )
    assert 0.0 <= report["roc_auc"] <= 1.0 and 0.0 <= report["pr_auc"] <= 1.0
    assert report["operating_point"]["split_recall"] == 1.0, "val is where it was fitted"
    for curve in ("roc_curve.png", "pr_curve.png"):
        assert (tmp_path / "eval" / curve).stat().st_size > 1000
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["roc_auc"] == report["roc_auc"]

    frames = {}
    for name, flag in (("point", "true"), ("argmax", "false")):
        overrides = [f"ckpt_path={best}", f"input={root / 'val'}", "num_workers=0"]
        overrides.append("apply_open_set=false")  # the operating point alone decides
        frames[name] = run_predict(
            compose_entry("predict", [*overrides, f"apply_operating_point={flag}"], tmp_path / name)
        )
    expected = ["bees" if p >= point["threshold"] else "ants" for p in frames["point"].prob_bees]
    assert frames["point"].label.tolist() == expected
    assert frames["argmax"].label.tolist() == frames["argmax"].top1_label.tolist()
    on_disk = pd.read_csv(tmp_path / "point" / "predictions.csv")
    assert on_disk.label.tolist() == expected

    from vision_tl.inference.serving.scorer import build_scorer

    files = [root / "val" / p for p in frames["point"].path]
    for name, flag in (("point", True), ("argmax", False)):
        entry = {"ckpt_path": str(best), "apply_open_set": False, "apply_operating_point": flag}
        scorer = build_scorer(entry)
        rows = scorer.rows([scorer.decode(f.read_bytes()) for f in files]).numpy()
        served = [a.label for a in scorer.answers([f.name for f in files], rows)]
        assert served == frames[name].label.tolist(), "serve labels as predict does"
