"""Evaluate, predict, explain, export: one tiny trained model (and ensemble), real commands."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import QUICK_TRAIN, TINY_NET, compose_entry, make_image_folder, run_cli
from omegaconf import DictConfig
from PIL import Image
from torch import nn

from vision_tl.core.cli import run_command
from vision_tl.core.errors import ConfigError
from vision_tl.core.logs import torchscript_deprecation_ignored
from vision_tl.data.augment import eval_transform, normalize_batch, resize_op
from vision_tl.data.decode import decode
from vision_tl.data.preprocess import Preprocess
from vision_tl.inference.checkpoint import load_checkpoint
from vision_tl.inference.eval import run_eval, select_split
from vision_tl.inference.explain import run_explain, target_layer
from vision_tl.inference.export import run_export
from vision_tl.inference.predict import run_predict
from vision_tl.inference.predictor import Predictor, ViewTransform, collect_inputs
from vision_tl.models import build_backbone
from vision_tl.training.train import run_training

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), splits=("train", "val", "test"))


def _train(root: Path, out: Path, extra: list[str]) -> Path:
    base = [o for o in QUICK_TRAIN if o != TINY_NET] if "model=ensemble" in extra else QUICK_TRAIN
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VISION_TL_CACHE", str(out / "cache"))
        run_training(compose_entry("train", [*base, f"data.root={root}", *extra], out))
    return out / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def single_ckpt(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(data_root, tmp_path_factory.mktemp("single"), [])


@pytest.fixture(scope="module")
def ensemble_ckpt(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 64 px: under no_grad, torch 2.15's CPU depthwise convolutions take ~2 s a batch at <= 48 px.
    # One resize for both members: an ensemble that shares one input tensor (members that
    # need different preprocessing: test_hetero_ensemble.py).
    members = [
        "model=ensemble",
        "model.members=[resnet18,mobilenet_v2]",
        "finetune=linear_probe",
        "data.image_size=64",
        "data.resize_size=73",
    ]
    return _train(data_root, tmp_path_factory.mktemp("ensemble"), members)


def _check_probabilities(frame: pd.DataFrame) -> np.ndarray:
    """Probability columns sum to 1; label, confidence and top-k agree with them."""
    probs = frame[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(frame.confidence, probs.max(axis=1), atol=1e-6)
    assert (frame.top1_label == [CLASSES[i] for i in probs.argmax(axis=1)]).all()
    assert (frame.top1_prob >= frame.top2_prob).all() and (frame.top2_prob >= frame.top3_prob).all()
    return probs


def _check_labels(frame: pd.DataFrame, rejected: pd.Series) -> None:
    """Rows under the confidence threshold are unknown; the rest keep their top-1 class
    unless the checkpoint's open-set detector flags them, which it does by lowest score."""
    assert (frame.label[rejected] == "unknown").all()
    flagged = ~rejected & (frame.label == "unknown")
    kept = ~rejected & ~flagged
    assert (frame.label[kept] == frame.top1_label[kept]).all()
    if flagged.any():
        assert frame.open_set_score[flagged].max() < frame.open_set_score[kept].min()


def _decodes(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()
        return image.size


# --------------------------------------------------------------------------- the contract lines


@pytest.fixture(scope="module")
def cli(
    single_ckpt: Path, data_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The README's command lines, run as a user would (subprocesses, at once to save time).

    Returns each command's output folder; a failed command fails here with its stderr.
    """
    base = tmp_path_factory.mktemp("cli")
    images = base / "unlabelled"
    shutil.copytree(data_root / "test", images)
    (images / "cat" / "broken.jpg").write_text("not an image")
    (images / "notes.txt").write_text("not an image file name: ignored")
    ckpt = f"ckpt_path={single_ckpt}"
    commands = {
        "predict": [
            "vision_tl.predict",
            ckpt,
            f"input={images}",
            f"hydra.run.dir={base / 'predict'}",
            "submission=true",
            "reject_threshold=0.5",
            "tta.hflip=true",
            "batch_size=5",
        ],
        "eval": [
            "vision_tl.eval",
            ckpt,
            f"data.root={data_root}",
            f"hydra.run.dir={base / 'eval'}",
        ],
        "export": ["vision_tl.export", ckpt, "format=onnx", f"hydra.run.dir={base / 'export'}"],
    }
    env = {"OMP_NUM_THREADS": "1"}  # three processes share the cores
    with ThreadPoolExecutor(len(commands)) as pool:
        runs = {name: pool.submit(run_cli, args, base, env) for name, args in commands.items()}
    for name, run in runs.items():
        result = run.result()
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
    return {name: base / name for name in commands}


@pytest.mark.integration
def test_predict_cli_folder_with_unreadable_file(cli: dict[str, Path]) -> None:
    out = cli["predict"]
    frame = pd.read_csv(out / "predictions.csv")
    assert len(frame) == 24, "one row per readable image"
    assert list(frame.columns[:9]) == [
        "path",
        "label",
        "confidence",
        "top1_label",
        "top1_prob",
        "top2_label",
        "top2_prob",
        "top3_label",
        "top3_prob",
    ]
    # the checkpoint carries an open-set detector (the default): its score comes last
    assert list(frame.columns[9:]) == [*(f"prob_{c}" for c in CLASSES), "open_set_score"]
    _check_probabilities(frame)
    assert frame.path.tolist() == sorted(frame.path) and frame.path[0] == "cat/cat_0.png"
    _check_labels(frame, frame.confidence < 0.5)
    assert set(frame.label) <= {*CLASSES, "unknown"}

    unreadable = pd.read_csv(out / "unreadable.csv")
    assert unreadable.path.tolist() == ["cat/broken.jpg"]
    assert unreadable.reason[0].startswith("UnidentifiedImageError")
    submission = pd.read_csv(out / "submission.csv")
    assert list(submission.columns) == ["id", "label"]
    assert submission.id.tolist() == [Path(p).stem for p in frame.path]
    assert submission.label.tolist() == frame.label.tolist()


@pytest.mark.integration
def test_eval_cli_writes_metrics_tables_and_plots(cli: dict[str, Path]) -> None:
    out = cli["eval"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_images"] == 24
    assert metrics["class_names"] == CLASSES
    assert metrics["acc_top5"] is None, "top-5 is meaningless with 3 classes"
    assert 0.0 <= metrics["ece"] <= 1.0 and metrics["loss"] > 0

    frame = pd.read_csv(out / "predictions.csv")
    assert len(frame) == 24 and set(frame.true_label) == set(CLASSES)
    probs = _check_probabilities(frame)
    correct = frame.true_label == frame.top1_label
    assert metrics["acc"] == pytest.approx(correct.mean())
    true_probs = probs[np.arange(24), [CLASSES.index(t) for t in frame.true_label]]
    assert metrics["loss"] == pytest.approx(-np.log(true_probs).mean(), rel=1e-4)

    per_class = pd.read_csv(out / "per_class.csv")
    assert per_class["class"].tolist() == CLASSES and per_class.support.tolist() == [8, 8, 8]
    recall = correct.groupby(frame.true_label).mean()
    np.testing.assert_allclose(per_class.recall, recall[CLASSES], atol=1e-5)
    assert metrics["per_class"]["dog"]["support"] == 8
    counts = pd.read_csv(out / "confusion_matrix.csv", index_col=0)
    assert counts.to_numpy().sum() == 24 and np.trace(counts.to_numpy()) == correct.sum()
    assert counts.sum(axis=1).tolist() == [8, 8, 8]
    for png in ("confusion_matrix.png", "highest_loss.png"):
        width, height = _decodes(out / png)
        assert width > 100 and height > 100


@pytest.mark.integration
def test_export_cli_onnx_matches_pytorch(
    cli: dict[str, Path], single_ckpt: Path, data_root: Path
) -> None:
    import onnxruntime as ort

    out = cli["export"]
    card = json.loads((out / "model.json").read_text())
    assert card["format"] == "onnx" and card["file"] == "model.onnx" and card["opset"] >= 17
    assert card["class_names"] == CLASSES and card["input_size"] == 32
    assert card["max_abs_diff"] < 1e-4
    pre = Preprocess.from_dict(card)  # the JSON alone rebuilds the preprocessing
    files = sorted((data_root / "test").rglob("*.png"))[:5]
    x = normalize_batch(torch.stack([eval_transform(pre)(decode(f)) for f in files]), pre)
    model = load_checkpoint(single_ckpt).model
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (x[:1], x):  # the batch axis is dynamic
        with torch.no_grad():
            expected = model(batch).numpy()
        (logits,) = session.run(None, {card["input"]["name"]: batch.numpy()})
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- in-process


@pytest.mark.integration
def test_reject_threshold_splits_rows_on_both_sides(
    single_ckpt: Path, data_root: Path, tmp_path: Path
) -> None:
    base = [f"ckpt_path={single_ckpt}", f"input={data_root / 'test'}", "num_workers=0"]
    run_predict(compose_entry("predict", base, tmp_path / "plain"))
    confidence = pd.read_csv(tmp_path / "plain" / "predictions.csv").confidence.sort_values()
    assert confidence.iloc[0] < confidence.iloc[-1], "the model is not equally sure of every image"
    middle = len(confidence) // 2
    threshold = float((confidence.iloc[middle - 1] + confidence.iloc[middle]) / 2)
    if confidence.iloc[middle - 1] == confidence.iloc[middle]:
        threshold = float((confidence.iloc[0] + confidence.iloc[-1]) / 2)
    run_predict(
        compose_entry("predict", [*base, f"reject_threshold={threshold}"], tmp_path / "reject")
    )
    frame = pd.read_csv(tmp_path / "reject" / "predictions.csv")
    rejected = frame.confidence < threshold
    assert 0 < rejected.sum() < len(frame), "rows on both sides of the threshold"
    _check_labels(frame, rejected)


@pytest.fixture(scope="module")
def timm_ckpt(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    timm = ["model.backbone.name=timm/tf_efficientnet_lite0", "data.image_size=64"]
    return _train(data_root, tmp_path_factory.mktemp("timm"), timm)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["ensemble_ckpt", "timm_ckpt"])
def test_onnx_parity_for_an_ensemble_and_a_timm_model(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    import onnxruntime as ort

    ckpt = request.getfixturevalue(which)
    card = run_export(compose_entry("export", [f"ckpt_path={ckpt}", "format=onnx"], tmp_path))
    assert card["max_abs_diff"] < 1e-4
    model = load_checkpoint(ckpt).model
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    torch.manual_seed(0)
    size = card["input_size"]
    for batch in (1, 3):
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            expected = model(x).numpy()
        (logits,) = session.run(None, {card["input"]["name"]: x.numpy()})
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


@pytest.mark.integration
def test_torchscript_export_matches_pytorch(single_ckpt: Path, tmp_path: Path) -> None:
    card = run_export(
        compose_entry("export", [f"ckpt_path={single_ckpt}", "format=torchscript"], tmp_path)
    )
    assert card["file"] == "model.pt" and card["max_abs_diff"] < 1e-5
    assert json.loads((tmp_path / "model.json").read_text())["class_names"] == CLASSES
    with torchscript_deprecation_ignored():
        module = torch.jit.load(str(tmp_path / "model.pt"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(module(x), load_checkpoint(single_ckpt).model(x))


@pytest.mark.integration
def test_predict_ensemble_with_tta_from_csv(
    ensemble_ckpt: Path, data_root: Path, tmp_path: Path
) -> None:
    listing = tmp_path / "list.csv"
    rows = [
        "id,path",
        "a,fox/fox_0.png",
        "b,fox/missing.png",
        f"c,{data_root / 'test/dog/dog_1.png'}",
    ]
    shutil.copytree(data_root / "test" / "fox", tmp_path / "fox")
    listing.write_text("\n".join(rows) + "\n")
    overrides = [
        f"ckpt_path={ensemble_ckpt}",
        f"input={listing}",
        "tta.hflip=true",
        "tta.crops=5",
        "num_workers=0",
        "submission=true",
        "top_k=2",
    ]
    run_predict(compose_entry("predict", overrides, tmp_path / "out"))
    frame = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert frame.path.tolist() == ["fox/fox_0.png", str(data_root / "test/dog/dog_1.png")]
    assert "top3_label" not in frame.columns
    probs = frame[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert pd.read_csv(tmp_path / "out" / "submission.csv").id.tolist() == ["a", "c"]
    assert pd.read_csv(tmp_path / "out" / "unreadable.csv").path.tolist() == ["fox/missing.png"]


@pytest.mark.integration
def test_explain_single_and_ensemble(
    single_ckpt: Path, ensemble_ckpt: Path, data_root: Path, tmp_path: Path
) -> None:
    images = data_root / "test" / "cat"
    out = tmp_path / "single"
    frame = run_explain(
        compose_entry("explain", [f"ckpt_path={single_ckpt}", f"input={images}"], out)
    )
    assert len(frame) == 8 and frame.member.isna().all()
    assert (frame.target == frame.predicted).all(), "default: explain the predicted class"
    for file in frame.file:
        assert _decodes(out / file) == (32, 32)

    out = tmp_path / "ensemble"
    overrides = [f"ckpt_path={ensemble_ckpt}", f"input={images / 'cat_0.png'}", "target=dog"]
    frame = run_explain(compose_entry("explain", overrides, out))
    assert frame.member.tolist() == ["member0_resnet18", "member1_mobilenet_v2"]
    assert (frame.target == "dog").all() and frame.path.nunique() == 1
    for file in frame.file:
        assert _decodes(out / file) == (64, 64)


@pytest.mark.integration
def test_class_list_mismatch_names_both_lists(single_ckpt: Path, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=2)
    cfg = compose_entry("eval", [f"ckpt_path={single_ckpt}", f"data.root={root}"], tmp_path / "o")
    with pytest.raises(ConfigError) as info:
        run_eval(cfg)
    assert str(info.value) == (
        f"class list mismatch: the checkpoint has {CLASSES} but data.root {root} has ['cat', 'dog']"
    )


def test_bad_checkpoints_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ckpt_path is required"):
        load_checkpoint(None)
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")
    (tmp_path / "text.ckpt").write_text("garbage")
    with pytest.raises(ConfigError, match="not a PyTorch zip archive"):
        load_checkpoint(tmp_path / "text.ckpt")
    torch.save({"state_dict": {}, "hook": ConfigError}, tmp_path / "pickled.ckpt")
    with pytest.raises(ConfigError, match="weights-only load refuses"):
        load_checkpoint(tmp_path / "pickled.ckpt")
    with pytest.raises(SystemExit, match=r"^error: ckpt_path is required"):
        run_command(lambda cfg: load_checkpoint(cfg.ckpt_path), DictConfig({"ckpt_path": None}))


# --------------------------------------------------------------------------- units


class _Asymmetric(nn.Module):
    """Scores that change under a horizontal flip (a left-to-right ramp)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-1, 1, x.shape[-1])
        return torch.stack([(x.mean(1) * ramp).mean((1, 2)), x.mean((1, 2, 3))], dim=1)


def test_tta_averages_flips_and_crops(tmp_path: Path) -> None:
    pre = Preprocess(input_size=16, resize_size=20, mean=(0.5,) * 3, std=(0.5,) * 3)
    pixels = np.zeros((24, 30, 3), np.uint8)
    pixels[:, :10] = 255  # bright on the left
    Image.fromarray(pixels).save(tmp_path / "left.png")
    model = _Asymmetric()
    plain = Predictor(model, pre, num_workers=0).predict([tmp_path / "left.png"])
    flips = Predictor(model, pre, num_workers=0, hflip=True).predict([tmp_path / "left.png"])
    five = Predictor(model, pre, num_workers=0, crops=5)
    assert five.transform(decode(tmp_path / "left.png")).shape == (5, 3, 16, 16)

    x = normalize_batch(eval_transform(pre)(decode(tmp_path / "left.png"))[None], pre)
    expected = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
    torch.testing.assert_close(flips.probs, expected)
    assert not torch.allclose(plain.probs, flips.probs), "the flip changes the ramp score"
    crops = five.predict([tmp_path / "left.png"])
    torch.testing.assert_close(crops.probs.sum(1), torch.ones(1))


def test_five_tta_crops_are_the_corners_and_centre_of_the_resized_image() -> None:
    pre = Preprocess(input_size=8, resize_size=12, interpolation="nearest")
    image = torch.arange(3 * 12 * 18, dtype=torch.int64).view(3, 12, 18).remainder(251)
    image = image.to(torch.uint8)
    views = ViewTransform(pre, crops=5)(image)
    resized = resize_op(pre)(image)
    s, h, w = 8, 12, 18
    top, left = (h - s) // 2, (w - s) // 2
    expected = [
        resized[:, :s, :s],
        resized[:, :s, -s:],
        resized[:, -s:, :s],
        resized[:, -s:, -s:],
        resized[:, top : top + s, left : left + s],
    ]
    assert views.shape == (5, 3, s, s)
    for view, region in zip(views, expected, strict=True):
        torch.testing.assert_close(view, region)
    distinct = {tuple(v.flatten().tolist()) for v in views}
    assert len(distinct) == 5, "five different regions, not five copies of one crop"


# Cheap to build, and the three stage layouts: ResNet layers, torchvision `features` +
# classifier (the last stage is flat), timm's grouped stages.
@pytest.mark.integration  # builds every full-size network
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "timm/tf_efficientnet_lite0"])
def test_cam_target_layer_is_a_spatial_stage(name: str) -> None:
    backbone = build_backbone(name, weights=None).eval()
    layer = target_layer(backbone, 64)
    outputs: list[torch.Tensor] = []
    layer.register_forward_hook(lambda m, i, o: outputs.append(o))
    with torch.no_grad():
        backbone(torch.zeros(1, 3, 64, 64))
    assert any(layer is m for m in backbone.modules())
    assert outputs and outputs[-1].ndim == 4
    if name == "resnet18":
        assert layer is backbone.body.layer4


def test_inputs_folder_csv_and_mistakes(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "images", classes=("a",), per_class=2, splits=())
    (root / ".thumbnails").mkdir()
    Image.new("RGB", (4, 4)).save(root / ".thumbnails" / "a_0.png")
    (root / "__MACOSX").mkdir()  # skipped as in training, not predicted as photos
    Image.new("RGB", (4, 4)).save(root / "__MACOSX" / "a_0.png")
    (root / "readme.txt").write_text("not an image")
    inputs = collect_inputs(root)
    assert inputs.names == ["a/a_0.png", "a/a_1.png"] and inputs.ids == ["a_0", "a_1"]

    (tmp_path / "list.csv").write_text("path\nimages/a/a_1.png\n")
    assert collect_inputs(tmp_path / "list.csv").files == [root / "a" / "a_1.png"]
    (tmp_path / "bad.csv").write_text("file\nx.png\n")
    with pytest.raises(ConfigError, match="no 'path' column"):
        collect_inputs(tmp_path / "bad.csv")
    with pytest.raises(ConfigError, match="does not exist"):
        collect_inputs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no image files"):
        collect_inputs(tmp_path / "empty")


def test_eval_split_choice() -> None:
    samples = {"train": [("t.png", 0)], "val": [("v.png", 1)]}
    assert select_split(samples, "auto") == ("val", [("v.png", 1)])
    assert select_split({**samples, "test": [("x.png", 0)]}, "auto")[0] == "test"
    assert select_split(samples, "all") == ("all", [("t.png", 0), ("v.png", 1)])
    with pytest.raises(ConfigError, match="no labelled test split"):
        select_split(samples, "test")
    with pytest.raises(ConfigError, match="split=best: one of"):
        select_split(samples, "best")


@pytest.mark.integration
def test_predict_follows_a_submission_template(
    single_ckpt: Path, data_root: Path, tmp_path: Path
) -> None:
    stems = sorted(p.stem for p in (data_root / "test").rglob("*.png"))
    order = [*reversed(stems), "not_predicted"]
    template = tmp_path / "sample_submission.csv"
    template.write_text("file_id,animal\n" + "".join(f"{s},?\n" for s in order))
    overrides = [
        f"ckpt_path={single_ckpt}",
        f"input={data_root / 'test'}",
        "num_workers=0",
        f"submission.template={template}",
    ]
    frame = run_predict(compose_entry("predict", overrides, tmp_path / "out"))
    written = pd.read_csv(tmp_path / "out" / "submission.csv", dtype=str)
    assert list(written.columns) == ["file_id", "animal"]
    assert written.file_id.tolist() == order
    labels = dict(zip([Path(p).stem for p in frame.path], frame.label, strict=True))
    assert written.animal.tolist() == [labels[s] for s in reversed(stems)] + ["?"]


@pytest.mark.integration
def test_inference_loads_the_network_the_training_task_loads(ensemble_ckpt: Path) -> None:
    """`load_checkpoint` reads the file without the task (test_layout checks what it
    spares predict's imports): the same network, classes and preprocessing."""
    from vision_tl.training.task import load_task

    loaded, task = load_checkpoint(ensemble_ckpt), load_task(ensemble_ckpt)
    assert loaded.class_names == task.class_names and loaded.preprocess == task.preprocess
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), task.model.eval()(x))
