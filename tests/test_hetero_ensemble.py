"""An ensemble whose members need different preprocessing (input size, resize, interpolation,
mean and std): each member sees the image through its own, in training (feature cache and
full fine-tune), eval, predict with TTA, explain and ONNX export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_ANY_MODEL, compose_entry, make_image_folder
from helpers.data import datamodule
from helpers.intervals import accuracies_without_interval
from PIL import Image

from vision_tl.core.errors import ConfigError
from vision_tl.data.augment import eval_transform, normalize_batch, train_transform
from vision_tl.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EnsemblePreprocess,
    Preprocess,
    load_preprocess,
)
from vision_tl.inference.checkpoint import load_checkpoint
from vision_tl.inference.eval import run_eval
from vision_tl.inference.explain import run_explain
from vision_tl.inference.export import run_export
from vision_tl.inference.predict import run_predict
from vision_tl.inference.predictor import Predictor
from vision_tl.models import build_model
from vision_tl.training.train import run_training

HALF = [0.5, 0.5, 0.5]
# resnet18 at 32 px (bilinear, ImageNet mean/std); timm's resnet10t at 48 px (bicubic, its own
# crop ratio) with mean = std = 0.5: every field that can differ, differs.
MEMBERS = [
    {"name": "resnet18", "image_size": 32},
    {"name": "timm/resnet10t", "image_size": 48, "mean": HALF, "std": HALF},
]
EXPECTED = [(32, IMAGENET_MEAN, IMAGENET_STD), (48, tuple(HALF), tuple(HALF))]
MEMBERS_OVERRIDE = (
    "model.members=[{name:resnet18,image_size:32},"
    "{name:timm/resnet10t,image_size:48,mean:[0.5,0.5,0.5],std:[0.5,0.5,0.5]}]"
)
QUICK = [
    # not data.image_size: it would resize every member
    *(o for o in TINY_ANY_MODEL if not o.startswith("data.image_size")),
    "model=ensemble",
    MEMBERS_OVERRIDE,
    "model.fusion=mean",
    "test=false",
    "logger=none",
    "callbacks.learning_rate_monitor=null",
    "callbacks.last_checkpoint=null",
]


def hetero_model() -> torch.nn.Module:
    return build_model({"members": MEMBERS, "fusion": "mean"}, 3, pretrained=False).eval()


def _record_member_inputs(model: torch.nn.Module) -> tuple[dict[int, torch.Tensor], list]:
    seen: dict[int, torch.Tensor] = {}

    def hook(index: int):
        return lambda module, inputs: seen.__setitem__(index, inputs[0].detach().clone())

    return seen, [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(model.members)]


def _check_normalised(x: torch.Tensor, colour: tuple[int, int, int], mean, std) -> None:
    expected = (torch.tensor(colour) / 255 - torch.tensor(mean)) / torch.tensor(std)
    for c in range(3):  # a flat image stays flat through any resize: exact values per channel
        torch.testing.assert_close(x[:, c].amin(), expected[c], atol=2e-3, rtol=0)
        torch.testing.assert_close(x[:, c].amax(), expected[c], atol=2e-3, rtol=0)


@pytest.mark.unit
def test_each_member_receives_its_own_size_and_normalisation(tmp_path: Path) -> None:
    model = hetero_model()
    pre = model.preprocess
    assert isinstance(pre, EnsemblePreprocess)
    assert [m.interpolation for m in pre.members] == ["bilinear", "bicubic"]
    colour = (200, 100, 50)
    for split in ("train", "val"):
        (tmp_path / split / "flat").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (70, 50), colour).save(tmp_path / split / "flat" / f"{i}.png")
    seen, hooks = _record_member_inputs(model)

    # predict and eval: five crops x two flips per image, each member at its own size
    Predictor(model, pre, hflip=True, crops=5).predict([tmp_path / "val" / "flat" / "0.png"])
    for i, (size, mean, std) in enumerate(EXPECTED):
        assert seen[i].shape == (10, 3, size, size)
        _check_normalised(seen[i], colour, mean, std)

    # training batches and the feature cache: the datamodule's loader and normalisation
    dm = datamodule(preprocess=pre, root=str(tmp_path), num_workers=0, batch_size=2)
    x, _ = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        model(dm.normalize(x))
    for hook in hooks:
        hook.remove()
    for i, (size, mean, std) in enumerate(EXPECTED):
        assert seen[i].shape == (2, 3, size, size)
        _check_normalised(seen[i], colour, mean, std)


@pytest.mark.unit
def test_a_random_view_covers_the_same_region_for_every_member() -> None:
    """One crop box and flip per image, each member resampling it to its own size."""
    pre = hetero_model().preprocess
    rows, cols = torch.meshgrid(torch.linspace(0, 1, 70), torch.linspace(0, 1, 90), indexing="ij")
    image = (torch.stack([rows, cols, rows * cols]) * 255).to(torch.uint8)  # smooth, asymmetric
    transform = train_transform(pre, "flip_crop", (0.2, 1.0))

    def shrink(crop: torch.Tensor) -> torch.Tensor:
        return F.interpolate(crop[None].float(), size=32, mode="bilinear", antialias=True)[0]

    views = []
    for seed in range(4):
        torch.manual_seed(seed)
        small, large = transform(image)
        assert small.shape == (3, 32, 32) and large.shape == (3, 48, 48)
        views.append(small.float())
        assert (shrink(large) - small.float()).abs().mean() < 2.0, "members saw other regions"
    assert min((views[0] - v).abs().mean() for v in views[1:]) > 5.0, "views differ by image"


@pytest.mark.unit
def test_per_member_preprocessing_round_trips_and_old_single_form_loads() -> None:
    pre = hetero_model().preprocess
    assert load_preprocess(json.loads(json.dumps(pre.to_dict()))) == pre
    single = Preprocess(input_size=64, resize_size=73)
    assert load_preprocess(single.to_dict()) == single
    assert load_preprocess({"members": [single.to_dict()] * 2}) == single
    with pytest.raises(ConfigError, match=r"unknown: \['image_sise'\]"):
        build_model({"members": [{"name": "resnet18", "image_sise": 32}, "resnet18"]}, 2, False)
    resolved = pre.resolve({"image_size": 40})
    assert [m.input_size for m in resolved.members] == [40, 40]
    assert [m.resize_size for m in resolved.members] == [45, 45]
    assert resolved.members[1].mean == (0.5, 0.5, 0.5)


@pytest.mark.integration
@pytest.mark.parametrize("fusion, head", [("logits", None), ("mean", None), ("features", "linear")])
def test_member_scores_are_each_members_share_of_the_fused_prediction(
    fusion: str, head: str | None
) -> None:
    spec = {"members": ["resnet18", "resnet18"], "fusion": fusion, "head": {"name": head}}
    model = build_model(spec, 3, pretrained=False).eval()
    assert model.member_names() == ["resnet18#0", "resnet18#1"]
    with torch.no_grad():
        features = model.features(torch.randn(4, 3, 32, 32))
        members = model.member_logits(features)
        fused = model.classify_features(features)
    assert len(members) == 2
    if fusion == "mean":
        probs = (members[0].softmax(1) + members[1].softmax(1)) / 2
        torch.testing.assert_close(probs.log(), fused)
    else:  # linear shares: they sum to the fused logits plus one extra bias
        bias = model.fusion.fuse.bias if fusion == "logits" else model.fusion.fuse[-1].bias
        torch.testing.assert_close(members[0] + members[1] - bias, fused)
    mlp = build_model({**spec, "fusion": "features", "head": {"name": "mlp"}}, 3, False)
    assert mlp.member_names() == [] and mlp.member_logits(features) == []


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), per_class=6)


@pytest.fixture(scope="module")
def probe_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("probe")
    overrides = [
        *QUICK,
        f"data.root={data_root}",
        "finetune=linear_probe",
        "finetune.epochs=20",
        "data.feature_views=2",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VISION_TL_CACHE", str(out / "cache"))
        run_training(compose_entry("train", overrides, out))
    return out


@pytest.mark.integration
def test_probe_caches_features_per_member_and_reports_each_member(probe_run: Path) -> None:
    metrics = json.loads((probe_run / "metrics.json").read_text())
    assert metrics["probe"] is not None, "the probe trained on cached features"
    assert set(metrics["val_acc_members"]) == {"resnet18", "timm/resnet10t"}
    assert all(0.0 <= v <= 1.0 for v in metrics["val_acc_members"].values())
    assert accuracies_without_interval(metrics) == []
    assert [m["input_size"] for m in metrics["preprocess"]["members"]] == [32, 48]
    entries = [json.loads(p.read_text()) for p in probe_run.glob("cache/features/*/meta.json")]
    assert sorted(e["views"] for e in entries) == [1, 2], "eval rows and augmented views"
    for entry in entries:
        assert entry["dim"] == 512 + 512, "both members' features in each row"
        assert entry["key"]["preprocess"] == metrics["preprocess"]


@pytest.mark.slow  # 16 s: moved out of the suite's 10-minute budget
def test_eval_predict_explain_and_onnx_export(
    probe_run: Path, data_root: Path, tmp_path: Path
) -> None:
    import onnxruntime as ort

    ckpt = probe_run / "checkpoints" / "best.ckpt"
    loaded = load_checkpoint(ckpt)
    assert isinstance(loaded.preprocess, EnsemblePreprocess)
    trained = json.loads((probe_run / "metrics.json").read_text())
    evaluated = run_eval(
        compose_entry(
            "eval", [f"ckpt_path={ckpt}", f"data.root={data_root}", "split=val"], tmp_path / "e"
        )
    )
    assert abs(evaluated["acc"] - trained["val_acc"]) <= 1 / 18 + 1e-9, "eval path = training's"

    images = data_root / "val" / "cat"
    predict = [f"ckpt_path={ckpt}", f"input={images}", "tta.hflip=true", "tta.crops=5"]
    run_predict(compose_entry("predict", predict, tmp_path / "p"))
    frame = pd.read_csv(tmp_path / "p" / "predictions.csv")
    assert len(frame) == 6
    probs = frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)

    explain = [f"ckpt_path={ckpt}", f"input={images / 'cat_0.png'}", "target=dog"]
    out = tmp_path / "x"
    frame = run_explain(compose_entry("explain", explain, out))
    assert frame.member.tolist() == ["member0_resnet18", "member1_timm_resnet10t"]
    sizes = [Image.open(out / f).size for f in frame.file]
    assert sizes == [(32, 32), (48, 48)], "each overlay on its member's own input"

    card = run_export(compose_entry("export", [f"ckpt_path={ckpt}", "format=onnx"], tmp_path))
    assert card["max_abs_diff"] < 1e-4
    assert [(i["name"], i["input_size"], i["mean"]) for i in card["inputs"]] == [
        ("input0", 32, list(IMAGENET_MEAN)),
        ("input1", 48, HALF),
    ]
    # Real images prepared as model.json says, through onnxruntime, against PyTorch.
    views = [eval_transform(p) for p in loaded.preprocess.members]
    files = sorted(images.glob("*.png"))[:3]
    decoded = [loaded.preprocess.read(f) for f in files]
    x = [torch.stack([v(d) for d in decoded]) for v in views]
    x = normalize_batch(x, loaded.preprocess)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input0": x[0].numpy(), "input1": x[1].numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, loaded.model(list(x)).numpy(), atol=1e-4, rtol=0)


@pytest.mark.integration
def test_full_fine_tune_feeds_each_member_its_own_batch(data_root: Path, tmp_path: Path) -> None:
    overrides = [
        *QUICK,
        f"data.root={data_root}",
        "finetune=full",
        "trainer.fast_dev_run=true",  # one train and one val batch
        "+callbacks.spy._target_=helpers.spies.RunSpy",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VISION_TL_CACHE", str(tmp_path / "cache"))
        metrics = run_training(compose_entry("train", overrides, tmp_path / "run"))
    spy = json.loads((tmp_path / "run" / "spy.json").read_text())
    calls = (1 + 1) * 2  # (train + val batch) x members
    assert not spy["feature_inputs"] and spy["backbone_calls"] == calls
    assert set(metrics["val_acc_members"]) == {"resnet18", "timm/resnet10t"}
