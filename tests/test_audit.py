"""`python -m vision_tl.audit` on a small planted set: leaks, a duplicate, flipped labels,
intruders and a broken file; its CSVs, its page, and a clean manifest that trains."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_WEIGHTS, TINY, browser_check, run_cli
from PIL import Image, ImageDraw

from vision_tl.training.train import run_training

pytestmark = pytest.mark.integration

CLASSES = ("disc", "square", "triangle")
COLOURS = ((230, 30, 30), (30, 210, 30), (30, 30, 230))
# Features that mean something (labels, outliers) need pretrained weights; without them the
# copies, the unusable file, the CSVs, the page and the clean manifest are still checked.
BACKBONE = (
    [
        "model.backbone.name=timm/tf_efficientnet_lite0",
        f"model.backbone.weights_path={SHARED_WEIGHTS}",
        "data.image_size=64",
    ]
    if SHARED_WEIGHTS.is_file()
    else ["model.pretrained=false", "data.image_size=32"]
)


def _picture(kind: int, seed: int, size: int = 64) -> Image.Image:
    """A red disc, green square or blue triangle on a smooth random background (every
    picture hashes differently)."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(40, 140, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(grid).resize((size, size), Image.BICUBIC)
    x, y, r = (int(v) for v in (*rng.integers(22, 42, 2), rng.integers(12, 20)))
    draw, colour = ImageDraw.Draw(image), COLOURS[kind]
    if kind == 0:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif kind == 1:
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
    return image


def _intruder(kind: int, size: int = 64) -> Image.Image:
    """Black and white, no shape: stripes, a checkerboard or rings."""
    yy, xx = np.mgrid[:size, :size]
    rings = np.hypot(xx - size // 2, yy - size // 2).astype(int) // 5 % 2
    pattern = [xx // 3 % 2, (xx // 8 + yy // 8) % 2, rings][kind]
    return Image.fromarray((pattern * 255).astype(np.uint8)).convert("RGB")


def plant(root: Path) -> dict[str, set]:
    """train/val class folders of discs, with the problems the audit must find."""
    for s, (split, count) in enumerate((("train", 16), ("val", 6))):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                _picture(c, 1000 * s + 100 * c + i).save(folder / f"{name}_{i}.png")
    train = root / "train"
    planted: dict[str, set] = {kind: set() for kind in ("leak", "duplicate", "label")}
    planted["outlier"], planted["bad_file"] = set(), set()
    for i, name in enumerate(CLASSES):
        src = train / name / f"{name}_0.png"
        same = root / "val" / name / f"copy_{name}.png"
        shutil.copy2(src, same)  # an identical leak
        resized = root / "val" / name / f"resized_{name}.jpg"
        with Image.open(src) as image:
            image.resize((48, 48), Image.BICUBIC).save(resized, quality=80)  # re-encoded
        planted["leak"] |= {str(same), str(resized)}
        flipped = train / CLASSES[(i + 1) % 3] / f"flipped_{name}.png"
        shutil.move(train / name / f"{name}_1.png", flipped)
        planted["label"].add(str(flipped))
        intruder = train / name / f"intruder_{i}.png"
        _intruder(i).save(intruder)
        planted["outlier"].add(str(intruder))
    duplicate = train / "disc" / "again_disc_2.png"
    shutil.copy2(train / "disc" / "disc_2.png", duplicate)
    planted["duplicate"].add((str(duplicate), str(train / "disc" / "disc_2.png")))
    broken = train / "square" / "broken.png"
    broken.write_bytes((train / "square" / "square_3.png").read_bytes()[:60])
    planted["bad_file"].add(str(broken))
    return planted


def _state(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, set]]:
    base = tmp_path_factory.mktemp("audit")
    root, out = base / "data", base / "out"
    planted = plant(root)
    before = _state(root)
    result = run_cli(
        [
            "vision_tl.audit",
            f"data.root={root}",
            *BACKBONE,
            "data.num_workers=0",
            f"data.cache={base / 'cache'}",
            f"hydra.run.dir={out}",
        ],
        cwd=base,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _state(root) == before  # nothing moved, changed or deleted
    return root, out, planted


def _listed(issues: pd.DataFrame, kind: str) -> list[str]:
    return issues[issues["issue"] == kind].sort_values("score", ascending=False)["path"].tolist()


def test_audit_finds_what_was_planted(audited) -> None:
    root, out, planted = audited
    issues = pd.read_csv(out / "issues.csv")
    assert list(issues.columns) == ["path", "issue", "score", "detail"]
    assert set(issues["issue"]) <= {"leak", "duplicate", "label", "outlier", "bad_file"}
    leaks = issues[issues["issue"] == "leak"]
    assert set(leaks["path"]) == planted["leak"]  # identical and resized + re-encoded
    partners = dict(zip(leaks["path"], leaks["detail"], strict=True))
    for name in CLASSES:
        source = str(root / "train" / name / f"{name}_0.png")
        assert partners[str(root / "val" / name / f"copy_{name}.png")] == source
        assert partners[str(root / "val" / name / f"resized_{name}.jpg")] == source
    duplicates = issues[issues["issue"] == "duplicate"]
    (pair,) = planted["duplicate"]
    assert len(duplicates) == 1 and set(duplicates.iloc[0][["path", "detail"]]) == set(pair)
    assert set(_listed(issues, "bad_file")) == planted["bad_file"]

    summary = json.loads((out / "audit.json").read_text())
    assert summary["counts"]["leak"] == 6 and summary["statistics"]["imbalance_train"] >= 1
    page = (out / "audit.html").read_text()
    assert page.count('src="data:image/jpeg;base64,') >= 6 + 1 + 3
    assert "http://" not in page and "https://" not in page  # readable offline


@pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason="needs pretrained weights (../shared)")
def test_audit_ranks_flipped_labels_and_intruders_first(audited) -> None:
    _, out, planted = audited
    issues = pd.read_csv(out / "issues.csv")
    labels = issues[issues["issue"] == "label"].sort_values("score", ascending=False)
    top = labels.head(8)  # the intruders are claimed by some class too
    assert len(set(top["path"]) & planted["label"]) >= 2
    suggested = dict(zip(labels["path"], labels["detail"], strict=True))
    for path in planted["label"] & set(top["path"]):  # the class the image came from
        assert suggested[path] == Path(path).stem.removeprefix("flipped_")
    assert set(_listed(issues, "outlier")[:5]) >= planted["outlier"]


def test_clean_manifest_trains_and_keeps_the_split(audited, compose_train) -> None:
    _, out, planted = audited
    manifest = pd.read_csv(out / "clean_manifest.csv")
    assert list(manifest.columns) == ["path", "label", "split"]
    flagged = set(pd.read_csv(out / "issues.csv")["path"])
    assert not flagged & set(manifest["path"]) and set(manifest["split"]) == {"train", "val"}
    assert planted["leak"] & flagged and not planted["leak"] & set(manifest["path"])

    run_dir = out.parent / "train_clean"
    overrides = [*TINY, f"data.manifest={out / 'clean_manifest.csv'}", "trainer.max_epochs=1"]
    no_logger = ["logger=none", "callbacks.learning_rate_monitor=null", "test=false"]
    cfg = compose_train([*overrides, *no_logger], run_dir)
    metrics = run_training(cfg)
    assert metrics["num_classes"] == 3
    used = pd.read_csv(run_dir / "split.csv").sort_values("path", ignore_index=True)
    pd.testing.assert_frame_equal(used, manifest.sort_values("path", ignore_index=True))


@pytest.mark.skipif(
    shutil.which("chromium") is None and os.environ.get("CI") != "true",
    reason="needs Debian's chromium (.ci/run installs it; under CI=true a missing one fails)",
)
def test_page_renders_in_headless_chromium(audited, tmp_path: Path) -> None:
    """The real browser loads the page and decodes every thumbnail."""
    _, out, _ = audited
    png = tmp_path / "audit.png"
    checks = browser_check(out / "audit.html", png)
    assert checks["images"] >= 10 and checks["loaded"] == checks["images"]
    assert checks["title"] == "Dataset audit" and png.stat().st_size > 10_000
