"""Fine-tuning recipes in real training runs on tiny generated data: EMA weights are what is
validated, saved, calibrated and evaluated; a time budget ends with a finished schedule;
the LR finder writes its plot and trains with its suggestion."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, make_image_folder
from helpers.data import datamodule
from hydra import compose, initialize_config_dir

from vision_tl.core.config import config_dir
from vision_tl.inference.eval import run_eval
from vision_tl.training.recipes import TimeBudget
from vision_tl.training.task import ClassificationTask
from vision_tl.training.train import run_training

pytestmark = pytest.mark.integration

QUIET = [*TINY, "logger=none", "callbacks.learning_rate_monitor=null", "test=false"]


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", per_class=4, size=32)


def _val_nll(task: ClassificationTask, root: Path, state: dict) -> float:
    task.load_state_dict(state)
    task.eval()
    dm = datamodule(preprocess=task.preprocess, root=str(root), num_workers=0, batch_size=64)
    x, y = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        return float(F.cross_entropy(task(dm.normalize(x)), y))


def _train_in_five_minutes(
    compose_train, monkeypatch: pytest.MonkeyPatch, root: Path, run_dir: Path, extra: list[str]
) -> dict:
    """Train with a 300 s `trainer.max_time` whose `TimeBudget` clock reads 80 s later each
    time: epoch 1 "takes" 80 s, so 3 epochs fit (220 s left x 0.9 margin). Lightning's own
    timer stays real."""
    ticks = itertools.count(0, 80)
    monkeypatch.setattr(TimeBudget, "clock", staticmethod(lambda: float(next(ticks))))
    budget = [*QUIET, f"data.root={root}", "trainer.max_time=00:00:05:00"]
    return run_training(compose_train([*budget, *extra], run_dir))


def test_ema_mixup_layer_decay_within_a_time_budget(
    compose_train, small_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    recipes = [
        "trainer.max_epochs=20",
        "ema.decay=0.9",
        "mixup.prob=1.0",
        "finetune.layer_decay=0.5",
        "data.batch_size=4",  # two steps an epoch, and steps large enough that the
        "optimizer.lr=0.01",  # best epoch's EMA differs from its raw weights
    ]
    metrics = _train_in_five_minutes(compose_train, monkeypatch, small_folder, run_dir, recipes)
    assert metrics["planned_epochs"] == 3 and metrics["epochs"] == 3
    history = pd.read_csv(run_dir / "history.csv")
    assert len(history) == 3 and history["lr"].iloc[-1] == 0.0  # cosine ran to its end

    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    ema, raw = best["state_dict"], best["current_model_state"]
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if k.endswith("weight"))
    task = ClassificationTask(**{**best["hyper_parameters"], "load_pretrained": False})
    ema_nll = _val_nll(task, small_folder, ema)
    assert ema_nll != pytest.approx(_val_nll(task, small_folder, raw), rel=1e-4)
    # calibration and eval score the EMA weights of best.ckpt
    assert metrics["val_nll_uncalibrated"] == pytest.approx(ema_nll, rel=1e-4)
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        eval_cfg = compose(
            "eval",
            overrides=[
                f"data.root={small_folder}",
                f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}",
                "split=val",
                "progress=false",
                "num_workers=0",
                "calibrate=false",
                f"paths.output_dir={tmp_path / 'eval'}",
            ],
        )
    scores = run_eval(eval_cfg)
    assert scores["loss"] == pytest.approx(ema_nll, rel=1e-4)
    assert scores["acc"] == pytest.approx(metrics["best_val_acc"])


def test_an_open_ended_fit_ends_with_its_time_budget_and_a_finished_schedule(
    compose_train, small_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # trainer.max_epochs=-1: the budget alone sets the length (3 epochs, as above), and the
    # cosine laid out over a provisional horizon is re-planned to end on the last step.
    run_dir = tmp_path / "run"
    open_ended = ["trainer.max_epochs=-1", "scheduler.warmup_epochs=0"]
    metrics = _train_in_five_minutes(compose_train, monkeypatch, small_folder, run_dir, open_ended)
    assert metrics["planned_epochs"] == 3 and metrics["epochs"] == 3
    lrs = pd.read_csv(run_dir / "history.csv")["lr"].tolist()
    assert len(lrs) == 3 and lrs[-1] == 0.0 and lrs[0] > lrs[1] > lrs[2]
    assert lrs[0] > 0.99e-3  # the provisional horizon kept the first epoch near the peak


def test_lr_finder_writes_its_plot_and_trains_with_its_suggestion(
    compose_train, small_folder: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    overrides = [
        *QUIET,
        f"data.root={small_folder}",
        "trainer.max_epochs=1",
        "lr_find=true",
        "lr_find_steps=20",
        "finetune=gradual",
    ]
    metrics = run_training(compose_train(overrides, run_dir))
    found = json.loads((run_dir / "lr_find.json").read_text())
    assert (run_dir / "lr_find.png").stat().st_size > 0
    assert len(found["lr"]) == len(found["loss"]) > 10
    suggestion = metrics["lr_find_suggestion"]
    assert suggestion == found["suggestion"] and suggestion in found["lr"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    (group,) = last["optimizer_states"][0]["param_groups"]  # gradual: still a probe
    assert group["initial_lr"] == pytest.approx(suggestion)
