"""`vision_tl.select`: candidates ranked by the converged probe, failures recorded, resumable."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY, make_image_folder
from hydra import compose, initialize_config_dir

from vision_tl.core.config import config_dir
from vision_tl.sweeps.select import find_weights, parse_candidates, run_select
from vision_tl.training.train import run_training

pytestmark = pytest.mark.integration

FAST = [
    "finetune.epochs=3",
    "finetune.folds=2",
    "finetune.batch_size=8",
    "finetune.lrs=[0.01]",
    "finetune.l2s=[0,0.01]",
]


def test_weights_dir_finds_files_named_after_the_model(tmp_path: Path) -> None:
    (tmp_path / "tf_efficientnet_lite0.in1k.safetensors").write_bytes(b"")
    (tmp_path / "tf_efficientnet_lite1.in1k.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    found = find_weights("timm/tf_efficientnet_lite0", tmp_path)
    assert found is not None and found.name == "tf_efficientnet_lite0.in1k.safetensors"
    assert find_weights("resnet18", tmp_path) is None
    candidates = parse_candidates(
        ["timm/tf_efficientnet_lite1", {"name": "resnet18", "weights_path": "/w.pth"}],
        str(tmp_path),
        on_gpu=False,
    )
    assert candidates[0].weights_path.endswith("tf_efficientnet_lite1.in1k.safetensors")
    assert candidates[1].weights_path == "/w.pth"


def test_select_ranks_records_a_failure_and_resumes(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=6)
    out = tmp_path / "select"
    overrides = [
        *TINY,
        *FAST,
        f"data.root={root}",
        "candidates=[resnet18,{name:mobilenet_v3_large},no_such_net]",
        f"paths.output_dir={out}",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("select", overrides=overrides)

    calls: list[str] = []

    def train(run_cfg):
        calls.append(run_cfg.model.backbone.name)
        return run_training(run_cfg)

    run_select(cfg, train)
    board = pd.read_csv(out / "leaderboard.csv")
    assert list(board.columns[:11]) == [
        "backbone",
        "status",
        "val_acc",
        "val_acc_lo",
        "val_acc_hi",
        "tied_with_best",
        "macro_f1",
        "params",
        "feature_dim",
        "images_per_s",
        "seconds",
    ]
    assert set(board["backbone"]) == {"resnet18", "mobilenet_v3_large", "no_such_net"}
    failed = board[board["backbone"] == "no_such_net"].iloc[0]
    assert failed["status"].startswith("failed: unknown backbone")
    done = board[board["status"] == "done"]
    assert len(done) == 2 and list(done["val_acc"]) == sorted(done["val_acc"], reverse=True)
    assert board.iloc[-1]["backbone"] == "no_such_net"
    assert (done["val_acc_lo"] <= done["val_acc"]).all() and (
        done["val_acc"] <= done["val_acc_hi"]
    ).all()
    assert done.iloc[0]["tied_with_best"], "the best candidate is tied with itself"
    overlap = done.iloc[1]["val_acc_hi"] >= done.iloc[0]["val_acc_lo"]
    assert done.iloc[1]["tied_with_best"] == overlap
    assert (out / "pareto.png").stat().st_size > 0
    line = (out / "winner.txt").read_text()
    assert line.startswith("python -m vision_tl.train") and "finetune=linear_probe" in line
    assert f"model.backbone.name={done.iloc[0]['backbone']}" in line

    # the leaderboard's val acc is what a single train run with those settings gives
    single = [*TINY, *FAST, f"data.root={root}", "finetune=linear_probe", "test=false"]
    single.append("model.backbone.name=resnet18")
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        alone = compose("train", overrides=[*single, f"paths.output_dir={tmp_path / 'alone'}"])
    metrics = run_training(alone)
    row = board[board["backbone"] == "resnet18"].iloc[0]
    assert metrics["best_val_acc"] == pytest.approx(row["val_acc"], abs=1e-9)

    # a second run reuses both finished candidates and retries only the failed one
    calls.clear()
    run_select(cfg, train)
    assert calls == ["no_such_net"]
    again = pd.read_csv(out / "leaderboard.csv")
    columns = ["backbone", "val_acc", "seconds"]
    pd.testing.assert_frame_equal(again[columns].iloc[:2], board[columns].iloc[:2])
