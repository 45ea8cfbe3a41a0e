"""The converged linear probe: settings chosen on the training split only, recorded, loadable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import QUICK_PROBE, TINY, make_image_folder
from helpers.intervals import accuracies_without_interval

from vision_tl.inference.checkpoint import load_checkpoint
from vision_tl.training.train import run_training

pytestmark = pytest.mark.integration

PROBE = QUICK_PROBE
SPY = ["+callbacks.spy._target_=helpers.spies.RunSpy"]


def _shuffle_val_labels(root: Path, to: Path) -> Path:
    """A copy of `root` whose val images sit in other classes' folders (train unchanged)."""
    shutil.copytree(root, to)
    classes = sorted(p.name for p in (to / "val").iterdir())
    for i, name in enumerate(classes):
        target = classes[(i + 1) % len(classes)]
        for image in sorted((root / "val" / name).glob("*.png")):
            (to / "val" / name / image.name).unlink()
            shutil.copy(image, to / "val" / target / f"moved_{image.name}")
    return to


def test_probe_search_never_reads_val_and_records_its_choice(compose_train, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=6)
    shuffled = _shuffle_val_labels(root, tmp_path / "shuffled")
    runs = {}
    for name, data in (("real", root), ("shuffled", shuffled)):
        cfg = compose_train([*TINY, f"data.root={data}", *PROBE, *SPY], tmp_path / name)
        runs[name] = run_training(cfg)
    real, other = runs["real"]["probe"], runs["shuffled"]["probe"]
    assert runs["real"]["val_loss"] != runs["shuffled"]["val_loss"]  # val did change
    timing = ("search_s", "features_s", "features_images_per_s")
    assert {k: v for k, v in real.items() if k not in timing} == {
        k: v for k, v in other.items() if k not in timing
    }
    # 2 views (the default augmentation is random) x 2 LRs x 5 L2 penalties, on the train split
    assert len(real["candidates"]) == 20
    assert {c["views"] for c in real["candidates"]} == {"augmented", "eval"}
    assert real["epochs"] == 3 and real["folds"] == 2 and real["search_s"] > 0

    metrics = json.loads((tmp_path / "real" / "metrics.json").read_text())
    assert metrics["probe"]["lr"] == real["lr"]
    assert metrics["probe"]["num_images"] == 18  # every training image held out once
    assert accuracies_without_interval(metrics) == []
    assert metrics["epochs"] == 3  # the probe's epochs, not trainer.max_epochs=2
    assert metrics["best_epoch"] == 2  # validated once, after the last epoch
    ckpt = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["vision_tl"]["probe"]["l2"] == real["l2"]
    # The penalty is in the loss: the optimizer's own (AdamW's 0.01 here) decay is off.
    assert ckpt["optimizer_states"][0]["param_groups"][0]["weight_decay"] == 0.0
    assert load_checkpoint(metrics["best_checkpoint"]) is not None
    start = json.loads((tmp_path / "real" / "spy.json").read_text())["start"]
    assert start["logit_layers_abs_max"] == 0.0  # the fit starts from the zero head
    assert start["group_weight_decays"] == [0.0]


def test_the_fit_trains_with_the_chosen_l2_penalty(compose_train, tmp_path: Path) -> None:
    """The chosen penalty is the fit's too, not the search's alone: one setting searched,
    with and without a strong penalty, and the penalised head ends far smaller."""
    root = make_image_folder(tmp_path / "data", per_class=4)
    norms = {}
    for l2 in (0, 30):
        fixed = [f"finetune.l2s=[{l2}]", "finetune.lrs=[0.01]", "data.augment=none"]
        cfg = compose_train([*TINY, f"data.root={root}", *PROBE, *fixed], tmp_path / str(l2))
        metrics = run_training(cfg)
        assert metrics["probe"]["l2"] == l2
        state = torch.load(metrics["last_checkpoint"], map_location="cpu", weights_only=False)
        norms[l2] = float(state["state_dict"]["model.head.0.weight"].norm())
    assert norms[30] < 0.5 * norms[0], norms


def test_search_off_keeps_the_configured_optimizer_and_epochs(
    compose_train, tmp_path: Path
) -> None:
    root = make_image_folder(tmp_path / "data", per_class=4)
    cfg = compose_train(
        [*TINY, f"data.root={root}", "finetune=linear_probe", "finetune.search=false", *SPY],
        tmp_path,
    )
    metrics = run_training(cfg)
    assert metrics["probe"] is None
    assert metrics["epochs"] == 2
    ckpt = torch.load(metrics["last_checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["weight_decay"] == 0.01
    assert "probe" not in ckpt["vision_tl"]
    start = json.loads((tmp_path / "spy.json").read_text())["start"]
    assert start["logit_layers_abs_max"] > 0  # the head's own initialisation, as before


def test_the_search_weighs_the_early_stopped_recipe_and_the_fit_follows_the_winner(
    compose_train, tmp_path: Path
) -> None:
    """Beside the converged grid, the early-stopped recipe's epoch is chosen inside the
    training split's folds; a converged grid that cannot learn (LR 1e-7) must lose to it,
    and the fit then trains exactly that recipe: its epochs, batch, LR and the optimizer's
    own weight decay, at a constant LR."""
    root = make_image_folder(tmp_path / "data", per_class=6)
    hopeless = ["finetune.lrs=[1e-7]", "finetune.l2s=[0.0]", "finetune.short_epochs=6"]
    quick = ["finetune.short_batch_size=4", "finetune.short_lr=0.01", "data.augment=none"]
    cfg = compose_train([*TINY, f"data.root={root}", *PROBE, *hopeless, *quick, *SPY], tmp_path)
    metrics = run_training(cfg)
    probe = metrics["probe"]
    assert probe["recipe"] == "short" and set(probe["recipes"]) == {"converged", "short"}
    assert probe["recipe_margin"] == pytest.approx(
        probe["recipes"]["short"] - probe["recipes"]["converged"]
    )
    assert probe["recipe_margin"] > 0
    short = [c for c in probe["candidates"] if c["recipe"] == "short"]
    assert len(short) == 1 and len(short[0]["curve"]) == 6  # one held-out score per epoch
    assert (
        probe["epochs"] == short[0]["epochs"] == 1 + short[0]["curve"].index(max(short[0]["curve"]))
    )
    assert metrics["epochs"] == probe["epochs"] and probe["batch_size"] == 4
    ckpt = torch.load(metrics["best_checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["lr_schedulers"] == [], "a constant LR, as its folds trained it"
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert group["lr"] == 0.01 and group["weight_decay"] == 0.01  # AdamW's own decay
    start = json.loads((tmp_path / "spy.json").read_text())["start"]
    assert start["group_weight_decays"] == [0.01] and start["logit_layers_abs_max"] == 0.0


def test_views_are_extracted_for_the_rest_only_when_a_subset_says_they_pay(
    compose_train, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The views decision runs on a stratified subset, two views first and one more a
    round while they improve; the backbone then sees every image once (the eval view) plus
    the views the subset's rounds drew, and all the views of the rest only if they won."""
    from vision_tl.models.backbones import Backbone

    root = make_image_folder(tmp_path / "data", per_class=10)  # 30 train, 30 val
    seen: list[int] = []
    forward = Backbone.forward
    monkeypatch.setattr(
        Backbone, "forward", lambda self, x: seen.append(len(x)) or forward(self, x)
    )
    subset = ["finetune.views_subset=9", "data.feature_views=3", "data.feature_precision=fp32"]
    cfg = compose_train([*TINY, f"data.root={root}", *PROBE, *subset], tmp_path / "run")
    probe = run_training(cfg)["probe"]
    decision = probe["views_decision"]
    assert decision["num_images"] == 9 and decision["search_s"] > 0
    assert decision["subset_views_s"] > 0 and decision["eval_features_s"] > 0
    margin = decision["margin_needed"]
    assert decision["views"] == (decision["augmented_acc"] > decision["eval_acc"] + margin)
    drawn = [r["views"] for r in decision["rounds"]]
    assert drawn == list(range(2, drawn[-1] + 1)) and drawn[-1] <= 3
    subset_passes = 9 * (3 if decision["views"] else drawn[-1])
    rest = 21 * 3 if decision["views"] else 0
    assert sum(seen) == 60 + subset_passes + rest, "eval view of all, the views drawn"
    assert {c["views"] for c in probe["candidates"]} == {
        "augmented" if decision["views"] else "eval"
    }, "the full search weighs only the option the subset chose"
