"""cv.folds=K: K runs over train+val, out-of-fold predictions for every image, the folds'
mean and interval, the eval-view features extracted once, and a fold ensemble that
averages the linear heads exactly and that eval and predict accept."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY, compose_entry, make_image_folder
from PIL import Image

from vision_tl.core.errors import ConfigError
from vision_tl.inference.checkpoint import load_checkpoint
from vision_tl.inference.eval import run_eval
from vision_tl.inference.predict import run_predict
from vision_tl.sweeps.cv import fold_catalogs, run_cv
from vision_tl.training.train import run_training

PROBE = [
    "finetune=linear_probe",
    "finetune.epochs=3",
    "finetune.folds=2",
    "finetune.short_epochs=0",
    "data.augment=flip_crop",
    "data.feature_views=2",
    "finetune.views_subset=18",
    "data.feature_precision=fp32",
    "logger=none",
    "callbacks.learning_rate_monitor=null",
]


@pytest.mark.slow  # out of the suite for its 10-minute budget; run with -m slow
def test_probe_cv_writes_folds_oof_summary_and_an_exact_fold_ensemble(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vision_tl.models.backbones import Backbone

    monkeypatch.setenv("VISION_TL_CACHE", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "data", per_class=6)
    seen: list[int] = []
    forward = Backbone.forward
    monkeypatch.setattr(
        Backbone, "forward", lambda self, x: seen.append(len(x)) or forward(self, x)
    )
    overrides = [*TINY, *PROBE, f"data.root={root}", "cv.folds=3"]
    out = tmp_path / "cv"
    summary = run_cv(compose_entry("train", overrides, out), train=run_training)
    extracted = sum(seen)

    folds = summary["fold_results"]
    assert [f["fold"] for f in folds] == [0, 1, 2]
    assert all((out / f"fold_{k}" / "metrics.json").is_file() for k in range(3))
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert len(oof) == 36 and oof.path.is_unique, "every train+val image once"
    assert sorted(oof.groupby("fold").size()) == [12, 12, 12]
    assert summary["oof_acc"] == pytest.approx((oof.label == oof.true_label).mean(), abs=1e-6)
    accs = [f["best_val_acc"] for f in folds]
    assert summary["mean_val_acc"] == pytest.approx(sum(accs) / 3, abs=1e-6)
    lo, hi = summary["mean_val_acc_ci95"]
    assert lo <= summary["mean_val_acc"] <= hi
    assert json.loads((out / "cv_summary.json").read_text())["folds"] == 3
    # the backbone saw every image's eval view once, the views of the pool's subset once,
    # the views of the rest of the pool once if any fold's views decision took them, and
    # each held-out image once more for the out-of-fold predictions
    decisions = [
        json.loads((out / f"fold_{k}" / "metrics.json").read_text())["probe"]["views_decision"]
        for k in range(3)
    ]
    took_views = any(d["views"] for d in decisions)
    assert extracted == 36 + 2 * 18 + (2 * 18 if took_views else 0) + 36, decisions
    entries = list((tmp_path / "cache" / "features").glob("*/meta.json"))
    assert len(entries) == 2 + took_views, "eval view, subset views (and the pool's views)"

    # the fold ensemble's logits are the mean of the folds' logits
    ensemble = load_checkpoint(summary["ensemble_checkpoint"])
    members = [load_checkpoint(f["best_checkpoint"]).model for f in folds]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = torch.stack([m(x) for m in members]).mean(0)
        torch.testing.assert_close(ensemble.model(x), expected, atol=1e-5, rtol=1e-5)
    assert ensemble.temperature == summary["oof_temperature"]

    ckpt = f"ckpt_path={summary['ensemble_checkpoint']}"
    scores = run_eval(
        compose_entry("eval", [ckpt, f"data.root={root}", "num_workers=0"], tmp_path / "e")
    )
    assert scores["num_images"] == 18
    frame = run_predict(
        compose_entry("predict", [ckpt, f"input={root / 'val'}", "num_workers=0"], tmp_path / "p")
    )
    assert len(frame) == 18

    # a rerun reuses the finished folds
    seen.clear()
    stamps = [(out / f"fold_{k}" / "metrics.json").stat().st_mtime_ns for k in range(3)]
    again = run_cv(compose_entry("train", overrides, out), train=run_training)
    assert [(out / f"fold_{k}" / "metrics.json").stat().st_mtime_ns for k in range(3)] == stamps
    assert again["mean_val_acc"] == summary["mean_val_acc"]
    assert sum(seen) == 36, "no fold trained or extracted again: only out-of-fold predictions"


@pytest.mark.unit
def test_folds_are_stratified_disjoint_and_refuse_too_small_classes(tmp_path: Path) -> None:
    from vision_tl.data.source import Catalog

    samples = {
        "train": [(f"a{i}", 0) for i in range(8)] + [(f"b{i}", 1) for i in range(4)],
        "val": [("a8", 0), ("b4", 1)],
        "test": [("t0", 0)],
    }
    catalog = Catalog(["a", "b"], samples)
    folds = fold_catalogs(catalog, 2, seed=0)
    vals = [set(k for k, _ in f.samples["val"]) for f in folds]
    assert vals[0].isdisjoint(vals[1]) and len(vals[0] | vals[1]) == 14
    for fold, val in zip(folds, vals, strict=True):
        assert val.isdisjoint(k for k, _ in fold.samples["train"])
        assert sum(label for _, label in fold.samples["val"]) in (2, 3), "stratified"
        assert fold.samples["test"] == [("t0", 0)]
    assert fold_catalogs(catalog, 2, seed=0)[0].samples == folds[0].samples, "seeded"
    with pytest.raises(ConfigError, match=r"cv\.folds=6: class 'b' has 5 image"):
        fold_catalogs(catalog, 6, seed=0)


@pytest.mark.unit
def test_grouped_folds_keep_a_manifests_groups_together(tmp_path: Path) -> None:
    from vision_tl.data.folder import file_catalog

    rows = ["path,label,group"]
    for c in "ab":
        for i in range(12):
            path = tmp_path / c / f"{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(path)
            rows.append(f"{c}/{i}.png,{c},{c}{i // 3}")  # 4 groups of 3 near-copies per class
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    catalog = file_catalog(None, manifest=tmp_path / "m.csv")
    assert len(set(catalog.groups.values())) == 8
    folds = fold_catalogs(catalog, 4, seed=1)
    for fold in folds:
        val_groups = {catalog.groups[k] for k, _ in fold.samples["val"]}
        train_groups = {catalog.groups[k] for k, _ in fold.samples["train"]}
        assert val_groups and val_groups.isdisjoint(train_groups), "a group on one side"
        assert {label for _, label in fold.samples["val"]} == {0, 1}, "still stratified"
        assert len(fold.view_samples()) == 24, "views drawn over the whole pool"
    with pytest.raises(ConfigError, match=r"cv\.folds=9: .*8 group\(s\)"):
        fold_catalogs(catalog, 9, seed=1)
