"""review.html: eval's page of a run's mistakes, checked in headless Chromium: every
thumbnail decodes, and clicking a confusion-matrix count shows the images it counts."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY, browser_check, compose_entry, make_image_folder

from vision_tl.inference.eval import run_eval
from vision_tl.training.train import run_training

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("review")
    root = make_image_folder(base / "data", per_class=6)
    quiet = ["logger=none", "callbacks.learning_rate_monitor=null", "trainer.max_epochs=1"]
    run_training(compose_entry("train", [*TINY, *quiet, f"data.root={root}"], base / "run"))
    ckpt = base / "run" / "checkpoints" / "best.ckpt"
    overrides = [f"ckpt_path={ckpt}", f"data.root={root}", "num_workers=0", "num_highest_loss=4"]
    run_eval(compose_entry("eval", overrides, base / "eval"))
    return base / "eval"


@pytest.mark.integration
def test_page_holds_every_image_in_its_confusion_cell(reviewed: Path) -> None:
    page = (reviewed / "review.html").read_text()
    frame = pd.read_csv(reviewed / "predictions.csv")
    classes = sorted(set(frame.true_label))
    cells = frame.groupby(["true_label", "top1_label"]).size()
    sections = dict(re.findall(r'<section class="cell" id="(cell-\d+-\d+)">(.*?)</section>', page))
    expected = {f"cell-{classes.index(t)}-{classes.index(p)}": n for (t, p), n in cells.items()}
    assert {k: v.count("<img ") for k, v in sections.items()} == expected
    for cell in expected:
        assert f'href="#{cell}"' in page, "each count links to its images"
    assert page.count("<figcaption>Grad-CAM of the predicted class</figcaption>") == 4
    assert "95% interval" in page and "Most-confused pairs" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page


@pytest.mark.skipif(
    shutil.which("chromium") is None and os.environ.get("CI") != "true",
    reason="needs Debian's chromium (.ci/run installs it; under CI=true a missing one fails)",
)
@pytest.mark.integration
def test_clicking_a_confusion_count_shows_its_images_in_chromium(
    reviewed: Path, tmp_path: Path
) -> None:
    frame = pd.read_csv(reviewed / "predictions.csv")
    classes = sorted(set(frame.true_label))
    wrong = frame[frame.true_label != frame.top1_label]
    true, predicted = (wrong.iloc[0] if len(wrong) else frame.iloc[0])[["true_label", "top1_label"]]
    cell = f"cell-{classes.index(true)}-{classes.index(predicted)}"
    count = int(((frame.true_label == true) & (frame.top1_label == predicted)).sum())
    seen = browser_check(
        reviewed / "review.html",
        tmp_path / "review.png",
        "--click",
        f'a[href="#{cell}"]',
        "--after-png",
        str(tmp_path / "cell.png"),
        timeout=180,
    )
    assert seen["title"] == "Review" and seen["images"] == len(frame) + 2 * 4
    assert seen["loaded"] == seen["images"], "every thumbnail and overlay decodes"
    assert seen["clicked"] and seen["visible"] == [cell], "only the clicked cell's images"
    assert seen["visible_images"] == seen["visible_loaded"] == count
    assert seen["visible_heights"][0] > 144
    assert (tmp_path / "cell.png").stat().st_size > 10_000
