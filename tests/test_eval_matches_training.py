"""`eval` on the val split of a finished run counts exactly the correct images training counted.

Training, the feature cache and eval decode, resize and normalise through one path, with the
preprocessing stored in the checkpoint; a second path that drifted would show up here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY, make_image_folder
from helpers.intervals import accuracies_without_interval
from hydra import compose, initialize_config_dir
from PIL import Image

from vision_tl.core.config import config_dir
from vision_tl.inference.eval import run_eval
from vision_tl.training.train import run_training

pytestmark = pytest.mark.integration


def _jpeg_folder(root: Path) -> Path:
    make_image_folder(root, splits=("train", "val"), per_class=8, size=48)
    for png in root.rglob("*.png"):
        Image.open(png).save(png.with_suffix(".jpg"), quality=85)
        png.unlink()
    return root


def _compose(name: str, overrides: list[str], out: Path):
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return compose(name, overrides=[*overrides, f"paths.output_dir={out}"])


@pytest.mark.parametrize(
    ("layout", "finetune"),
    [("folder", "full"), ("manifest", "linear_probe")],
    ids=["jpeg-folder-finetune", "manifest-probe-from-feature-cache"],
)
def test_eval_on_val_reproduces_best_val_accuracy(
    tmp_path: Path, layout: str, finetune: str
) -> None:
    root = _jpeg_folder(tmp_path / "data")
    if layout == "folder":
        data = [f"data.root={root}"]
    else:
        rows = [
            f"{p.relative_to(root).as_posix()},{p.parent.name},{p.parts[-3]}"
            for p in sorted(root.rglob("*.jpg"))
        ]
        manifest = tmp_path / "labels.csv"
        manifest.write_text("path,label,split\n" + "\n".join(rows) + "\n")
        data = [f"data.manifest={manifest}", f"data.root={root}"]
    train = [
        *TINY,
        *data,
        f"finetune={finetune}",
        "trainer.max_epochs=3",
        "data.image_size=40",
        "data.augment=none",
        "optimizer.lr=0.003",
        "logger=none",
        "callbacks.learning_rate_monitor=null",
    ]
    metrics = run_training(_compose("train", train, tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    scores = run_eval(
        _compose(
            "eval",
            [*data, f"ckpt_path={ckpt}", "split=val", "progress=false", "num_workers=0"],
            tmp_path / "eval",
        )
    )
    n = scores["num_images"]
    assert n == 24 and scores["split"] == "val"
    assert round(scores["acc"] * n) == round(metrics["best_val_acc"] * n)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["acc"] == scores["acc"] and accuracies_without_interval(written) == []
    for name, row in written["per_class"].items():
        assert row["recall_lo"] <= row["recall"] <= row["recall_hi"], name
