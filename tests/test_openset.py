"""Unlabelled images and unknown classes: the open-set detector, pseudo-labels, discovery
and what to label next, on generated images with planted unknown classes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import QUICK_PROBE, TINY, TINY_ANY_MODEL, _draw, run_cli
from sklearn.metrics import adjusted_rand_score

from vision_tl.core.cli import check_command_line
from vision_tl.core.errors import ConfigError
from vision_tl.data.unlabeled import list_images, unlabeled_pool
from vision_tl.inference.checkpoint import load_checkpoint
from vision_tl.inference.discover import cluster
from vision_tl.inference.serving.scorer import build_scorer
from vision_tl.inference.suggest import cluster_margin, margins
from vision_tl.sweeps.pseudo_label import capped, class_thresholds, confident
from vision_tl.training.openset import (
    OpenSet,
    OpenSetSettings,
    best_separating,
    fit_open_set,
    knn_similarity,
    open_set_metrics,
    risk_coverage,
    threshold_at_tpr,
)
from vision_tl.training.train import run_training

# Colours `_draw` paints by label: 0 red, 1 green, 2 blue, 3 yellow.
KNOWN = {"red": 0, "green": 1}
UNKNOWN = {"blue": 2, "yellow": 3}
PROBE = [*QUICK_PROBE, "logger=none"]


def draw_folder(root: Path, colours: dict[str, int], per_class: int, seed: int) -> Path:
    """`root/<name>/<name>_<i>.png`, each image drawn from its own seed (never a copy of
    another folder's)."""
    for name, label in colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _draw(label, seed=seed + 100 * label + i, size=40).save(root / name / f"{name}_{i}.png")
    return root


# --------------------------------------------------------------------------- the pieces


def test_knn_similarity_is_the_kth_nearest_cosine() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    query = torch.tensor([[2.0, 0.0], [-1.0, 0.0]])
    first = knn_similarity(query, bank, k=1)
    second = knn_similarity(query, bank, k=2)
    assert torch.allclose(first, torch.tensor([1.0, 0.0]), atol=1e-6)
    assert torch.allclose(second, torch.tensor([2**-0.5, -(2**-0.5)]), atol=1e-6)


def test_thresholds_keep_the_asked_share_and_separate_examples() -> None:
    known = torch.arange(100, dtype=torch.float32)
    threshold = threshold_at_tpr(known, 0.95)
    assert (known >= threshold).float().mean() >= 0.95
    assert (known >= threshold + 1).float().mean() < 0.95
    unknown = torch.tensor([1.0, 2.0, 3.0])
    separating = best_separating(known, unknown, 0.9)
    assert separating > 3.0  # rejects every example and still keeps >= 90% of known
    assert (known >= separating).float().mean() >= 0.9
    with pytest.raises(ConfigError, match=r"open_set\.tpr=1\.5"):
        threshold_at_tpr(known, 1.5)


def test_metrics_and_risk_coverage_follow_the_scores() -> None:
    known = torch.tensor([0.9, 0.8, 0.7, 0.6])
    unknown = torch.tensor([0.1, 0.2])
    assert open_set_metrics(known, unknown) == {"open_set_auroc": 1.0, "open_set_fpr95": 0.0}
    swapped = open_set_metrics(unknown, known)
    assert swapped["open_set_auroc"] == 0.0 and swapped["open_set_fpr95"] == 1.0
    coverage, risk = risk_coverage(torch.cat([known, unknown]), torch.tensor([1, 1, 0, 1, 0, 0]))
    assert coverage[-1] == 1.0 and risk == pytest.approx([0, 0, 1 / 3, 1 / 4, 2 / 5, 3 / 6])


def test_a_fitted_detector_flags_a_planted_cluster_and_survives_the_checkpoint() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(8)[:3] * 5
    train = torch.cat([c + torch.randn(30, 8, generator=gen) * 0.3 for c in centres])
    val = torch.cat([c + torch.randn(10, 8, generator=gen) * 0.3 for c in centres])
    logits = val @ centres.T
    detector = fit_open_set("knn", val, logits, train, tpr=0.9, k=1)
    assert set(detector.thresholds) == {"knn_msp", "knn", "energy", "msp"}
    outsider = torch.eye(8)[5:6] * 5 + torch.randn(5, 8, generator=gen) * 0.3
    assert detector.unknown(outsider, outsider @ centres.T).all()
    assert detector.unknown(val, logits).float().mean() <= 0.1
    loaded = OpenSet.from_dict(detector.as_dict())
    assert loaded is not None and loaded.kind == "knn" and loaded.bank.dtype == torch.float32
    assert torch.equal(loaded.unknown(outsider, outsider @ centres.T), torch.ones(5, dtype=bool))
    card = detector.card()
    assert card == {"kind": "energy", "threshold": detector.thresholds["energy"], "tpr": 0.9}
    assert OpenSet.from_dict(card).threshold == card["threshold"]


def planted_features(seed: int) -> dict[str, torch.Tensor]:
    """Two known classes and an unknown one in 64 noisy dimensions, each class on its own
    axis: with 10 training images per class the nearest-neighbour score is weak, and the
    pool (known images and the unknown class) shows where the unknown class lies."""
    gen = torch.Generator().manual_seed(seed)

    def cloud(axis: int, n: int) -> torch.Tensor:
        return torch.eye(64)[axis] * 4 + torch.randn(n, 64, generator=gen) * 1.5

    def known(n: int) -> torch.Tensor:
        return torch.cat([cloud(0, n), cloud(1, n)])

    weights = torch.eye(64)[:2]
    return {
        "train": known(10),
        "val": known(30),
        "test": known(100),
        "pool": torch.cat([known(80), cloud(2, 80)]),
        "unknown": cloud(2, 100),
        "weights": weights,
    }


def test_the_pool_score_learns_where_the_pools_unknown_class_lies() -> None:
    data = planted_features(seed=1)
    logits = {k: data[k] @ data["weights"].T for k in ("val", "test", "unknown")}
    detector = fit_open_set(
        "pool_msp", data["val"], logits["val"], data["train"], tpr=0.95, pool=data["pool"]
    )
    assert detector.kind == "pool_msp" and detector.fitted_on["pool_images"] == 240
    assert set(detector.kinds()) == {"knn_msp", "knn", "energy", "msp", "pool", "pool_msp"}
    auroc = {
        kind: open_set_metrics(
            detector.scores(data["test"], logits["test"], kind=kind),
            detector.scores(data["unknown"], logits["unknown"], kind=kind),
        )["open_set_auroc"]
        for kind in ("pool_msp", "knn_msp", "msp")
    }
    assert auroc["pool_msp"] >= 0.9
    assert auroc["pool_msp"] >= auroc["knn_msp"] + 0.05 and auroc["pool_msp"] > auroc["msp"]
    kept = ~detector.unknown(data["test"], logits["test"])
    assert 0.85 <= kept.float().mean() <= 1.0
    loaded = OpenSet.from_dict(detector.as_dict())
    assert loaded is not None and torch.equal(
        loaded.unknown(data["unknown"], logits["unknown"]),
        detector.unknown(data["unknown"], logits["unknown"]),
    )
    # A pool of the known classes alone teaches nothing: the kNN score decides.
    known_only = data["pool"][:160]
    same = fit_open_set("pool_msp", data["val"], logits["val"], data["train"], pool=known_only)
    assert same.kind == "knn_msp" and same.direction is None and "pool" not in same.kinds()


def test_auto_picks_the_pool_score_only_when_there_is_a_pool() -> None:
    assert OpenSetSettings.from_config({"score": "auto"}, pool="/data/pool").score == "pool_msp"
    assert OpenSetSettings.from_config({"score": "auto"}).score == "knn_msp"
    assert OpenSetSettings.from_config({}, pool="/data/pool").score == "pool_msp"
    assert OpenSetSettings.from_config({"score": None}, pool="/data/pool").score is None
    with pytest.raises(ConfigError, match=r"open_set\.score=pool_msp needs data\.unlabeled"):
        OpenSetSettings.from_config({"score": "pool_msp"})


def test_pseudo_label_selection_is_per_class_capped_and_skips_unknown() -> None:
    train_probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6], [0.6, 0.4]])
    labels = torch.tensor([0, 0, 1, 1, 1])  # the last is wrong: it does not count
    thresholds = class_thresholds(train_probs, labels, quantile=0.0, floor=0.5)
    assert thresholds.tolist() == pytest.approx([0.8, 0.6])
    assert class_thresholds(train_probs, labels, None, 0.9).tolist() == pytest.approx([0.9] * 2)
    pool = torch.tensor(
        [[0.95, 0.05], [0.85, 0.15], [0.82, 0.18], [0.81, 0.19], [0.7, 0.3], [0.1, 0.9], [0.2, 0.8]]
    )
    unknown = torch.tensor([False, False, False, False, False, True, False])
    passing = confident(pool, unknown, thresholds)
    chosen = capped(passing, max_ratio=None)
    assert chosen == [(0, 0), (1, 0), (2, 0), (3, 0), (6, 1)]  # row 5 is unknown
    two_x = capped(passing, max_ratio=2.0)  # 2 x the lower median (1)
    assert two_x == [(0, 0), (1, 0), (6, 1)]
    # Relative to the labelled shares: class 0 holds 3/4 of them, so 3 per class-1 image.
    shares = torch.tensor([0.75, 0.25])
    assert capped(passing, 1.0, shares) == [(0, 0), (1, 0), (2, 0), (6, 1)]
    # A teacher sure of one class only: that class must not take over training.
    one_class = confident(pool, torch.tensor([False] * 5 + [True] * 2), thresholds)
    assert capped(one_class, 2.0) == []
    # With more classes, one the pool lacks does not stop the others: the median of 3, 1, 0
    # is 1, so 2 per class.
    three = torch.tensor([[0.95, 0.05, 0.0]] * 3 + [[0.05, 0.95, 0.0]])
    kept = capped(confident(three, torch.zeros(4, dtype=torch.bool), torch.full((3,), 0.9)), 2.0)
    assert kept == [(0, 0), (1, 0), (3, 1)]


def test_discovery_recovers_two_planted_groups() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.1, (12, 16)) + np.eye(16)[0] * 3
    b = rng.normal(0, 0.1, (12, 16)) + np.eye(16)[1] * 3
    groups, distance, tried = cluster(np.vstack([a, b]), None, 6, 8, seed=0)
    assert adjusted_rand_score([0] * 12 + [1] * 12, groups) == 1.0
    assert max(tried, key=tried.get) == 2 and (distance >= 0).all()


def test_suggestions_are_uncertain_and_spread_over_the_pool() -> None:
    rng = np.random.default_rng(0)
    features = np.vstack([rng.normal(0, 0.05, (10, 8)) + np.eye(8)[i] for i in range(3)])
    margin = rng.uniform(0.2, 1.0, 30)
    margin[[3, 14, 25]] = [0.01, 0.02, 0.03]
    rows = cluster_margin(features, margin, k=3)
    assert rows == [3, 14, 25]
    assert margins(torch.tensor([[0.7, 0.2, 0.1]])).tolist() == pytest.approx([0.5])


def test_a_pool_that_is_empty_or_already_labelled_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no image files"):
        list_images(tmp_path / "empty", "data.unlabeled")
    labelled = draw_folder(tmp_path / "labelled", KNOWN, 2, seed=0)
    files = [str(p) for p in sorted(labelled.rglob("*.png"))]
    with pytest.raises(ConfigError, match="already labelled"):
        unlabeled_pool(labelled, files)
    extra = draw_folder(tmp_path / "labelled" / "more", {"blue": 2}, 1, seed=50)
    assert unlabeled_pool(labelled, files) == [str((extra / "blue" / "blue_0.png").absolute())]


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("semi.min_confidence=1.5", "semi.min_confidence=1.5: a number > 0 and < 1"),
        ("semi.min_confidence=0", "semi.min_confidence=0: a number > 0 and < 1"),
        ("open_set.tpr=0", "open_set.tpr=0: a number > 0 and < 1"),
        ("open_set.score=maxlogit", "open_set.score=maxlogit"),
    ],
)
def test_bad_values_stop_before_any_work(override: str, words: str, tmp_path: Path) -> None:
    pool = draw_folder(tmp_path / "pool", {"blue": 2}, 1, seed=0)
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        check_command_line("train", ["semi=pseudo_label", f"data.unlabeled={pool}", override])


def test_pseudo_labels_without_a_pool_stop_before_any_work() -> None:
    with pytest.raises(ConfigError, match=r"semi=pseudo_label needs data\.unlabeled"):
        check_command_line("train", ["semi=pseudo_label"])
    with pytest.raises(ConfigError, match=r"open_set\.score=pool needs data\.unlabeled"):
        check_command_line("train", ["open_set.score=pool"])


# --------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two known colours (labelled), and a pool of known colours plus two unknown ones."""
    root = tmp_path_factory.mktemp("planted")
    data = root / "data"
    draw_folder(data / "train", KNOWN, 8, seed=0)
    draw_folder(data / "val", KNOWN, 6, seed=10_000)
    pool = draw_folder(root / "pool", {**KNOWN, **UNKNOWN}, 6, seed=20_000)
    unknown = draw_folder(root / "unknown", UNKNOWN, 4, seed=30_000)
    return {"root": root, "data": data, "pool": pool, "unknown": unknown}


@pytest.mark.integration
def test_unknown_images_are_flagged_measured_grouped_and_skipped_by_suggest(
    planted: dict[str, Path], tmp_path: Path, compose_train
) -> None:
    run = tmp_path / "run"  # trained in-process (the semi test trains through the CLI)
    pool = f"data.unlabeled={planted['pool']}"  # no pseudo-labels: the detector learns from it
    run_training(compose_train([*TINY, *PROBE, f"data.root={planted['data']}", pool], run))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["open_set"]["kind"] == "pool_msp" and metrics["open_set"]["tpr"] == 0.95
    assert metrics["open_set"]["fitted_on"]["pool_images"] == 24
    ckpt = run / "checkpoints" / "best.ckpt"
    detector = load_checkpoint(ckpt).open_set
    assert detector.bank.shape[0] == 16 and detector.direction is not None  # every train image

    out = tmp_path / "predict"
    done = run_cli(
        [
            "vision_tl.predict",
            f"ckpt_path={ckpt}",
            f"input={planted['pool']}",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    frame = pd.read_csv(out / "predictions.csv")
    colour = frame["path"].str.split("/").str[0]
    flagged = frame["label"] == "unknown"
    assert flagged[colour.isin(UNKNOWN)].mean() >= 0.9
    assert flagged[colour.isin(KNOWN)].mean() <= 0.25
    assert "open_set_score" in frame.columns
    scorer = build_scorer({"ckpt_path": str(ckpt), "serve": {"max_batch_size": 8}})
    files = sorted(planted["pool"].rglob("*.png"))
    answers = scorer.answers(
        [f.name for f in files], scorer.rows([scorer.decode(f.read_bytes()) for f in files]).numpy()
    )
    served = {
        f.relative_to(planted["pool"]).as_posix(): a.label
        for f, a in zip(files, answers, strict=True)
    }
    assert served == dict(
        zip(frame["path"], frame["label"], strict=True)
    )  # serve answers as predict

    out = tmp_path / "eval"
    done = run_cli(
        [
            "vision_tl.eval",
            f"ckpt_path={ckpt}",
            f"data.root={planted['data']}",
            f"unknown={planted['unknown']}",
            "review.write=false",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads((out / "metrics.json").read_text())
    assert measured["open_set_auroc"] >= 0.9 and measured["open_set_score"] == "pool_msp"
    assert measured["open_set_fpr95"] <= 0.5 and measured["num_unknown"] == 8
    kinds = ("msp", "energy", "knn_msp", "pool")
    assert {f"open_set_auroc_{kind}" for kind in kinds} <= measured.keys()
    assert (out / "open_set_risk_coverage.png").stat().st_size > 1000

    out = tmp_path / "discover"
    args = [f"ckpt_path={ckpt}", f"input={planted['pool']}", f"hydra.run.dir={out}"]
    done = run_cli(["vision_tl.discover", *args], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    groups = pd.read_csv(out / "groups.csv")
    truth = groups["path"].str.split("/").str[0]
    assert truth.isin(UNKNOWN).mean() >= 0.75
    assert adjusted_rand_score(truth, groups["group"]) >= 0.6
    page = (out / "groups.html").read_text()
    assert page.count("<img ") == len(groups) and "data:image/jpeg;base64," in page

    out = tmp_path / "suggest"
    args = [f"ckpt_path={ckpt}", f"input={planted['pool']}", "k=4", f"hydra.run.dir={out}"]
    done = run_cli(["vision_tl.suggest", *args], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    suggested = pd.read_csv(out / "label_next.csv")
    assert len(suggested) == 4 and suggested["path"].is_unique
    assert suggested["margin"].is_monotonic_increasing
    assert not suggested["path"].str.split("/").str[0].isin(UNKNOWN).any()


@pytest.mark.slow  # 13 s; the selection rules are unit-tested above
def test_pseudo_labels_join_training_with_the_right_labels_and_leave_unknowns_out(
    planted: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "semi"
    done = run_cli(
        [
            "vision_tl.train",
            *TINY_ANY_MODEL,  # resnet18: features that make confident pseudo-labels
            *PROBE,
            f"data.root={planted['data']}",
            "semi=pseudo_label",
            f"data.unlabeled={planted['pool']}",
            "test=false",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    semi = json.loads((run / "metrics.json").read_text())["semi"]
    used = semi["rounds"][1]
    assert used["used"] > 0 and used["unknown_excluded"] >= 1
    assert semi["val_acc_without"] == semi["rounds"][0]["val_acc"]  # round 0: labelled only
    assert semi["val_acc_with"] == semi["rounds"][1]["val_acc"]
    split = pd.read_csv(run / "round_1" / "split.csv")
    pseudo = split[split["path"].str.contains(str(planted["pool"]))]
    assert len(pseudo) == used["used"]
    true_colour = pseudo["path"].map(lambda p: Path(p).parent.name)
    assert (true_colour == pseudo["label"]).all()  # right labels, and no unknown colour
    assert (split[split["split"] == "val"]["path"].str.contains("/val/")).all()
