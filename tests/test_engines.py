"""Inference engines (`core.engines`): each installed engine computes what eager PyTorch
computes; the switch is checked before any work; exports to OpenVINO IR and INT8 run back
through `predict`; the feature cache through the fast engine equals eager."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY, make_image_folder
from helpers.data import eval_features
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from vision_tl.core.config import config_dir
from vision_tl.core.engines import (
    ENGINES,
    Forward,
    compile_forward,
    converted_cache,
    cores_for,
    openvino_model,
    resolve_engine,
    used_weights_digest,
)
from vision_tl.core.errors import ConfigError
from vision_tl.core.validate import validate
from vision_tl.inference.export import run_export
from vision_tl.inference.predict import run_predict
from vision_tl.inference.predictor import Predictor
from vision_tl.models import build_model
from vision_tl.training.train import run_training

# Engines pyproject.toml lists: under CI a missing one is a failure, not a skip.
LISTED = {"openvino": "openvino", "onnxruntime": "onnxruntime"}


def require(package: str) -> None:
    """Import `package`; skip without it, except under CI=true, where it must be there."""
    try:
        importlib.import_module(package)
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"{package} is not installed")


class Tiny(nn.Module):
    """Conv, BatchNorm, depthwise conv, pool, linear: the layers the real backbones use."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU6(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(8, 3)
        self.body[1].running_mean.uniform_(-0.5, 0.5)
        self.body[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@pytest.mark.integration
@pytest.mark.parametrize("name", ENGINES.names())
def test_every_engine_computes_what_eager_pytorch_does(name: str) -> None:
    if name in LISTED:
        require(LISTED[name])
    model = Tiny().eval()
    runner = compile_forward(model, name, "fp32", torch.device("cpu"))
    for batch in (3, 1, 5):  # the batch axis stays free after the first compile
        x = torch.randn(batch, 3, 24, 24)
        with torch.no_grad():
            expected = model(x)
        got = runner(x)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert runner.engine == name and runner.precision == "fp32"


@pytest.mark.unit
def test_auto_is_openvino_on_a_cpu_and_eager_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VISION_TL_ENGINE", "onnxruntime")  # a site's choice for auto
    assert resolve_engine("auto", torch.device("cpu")).name == "onnxruntime"
    assert resolve_engine("auto", torch.device("cuda")).name == "torch"
    monkeypatch.delenv("VISION_TL_ENGINE")
    require("openvino")
    assert resolve_engine("auto", torch.device("cpu")).name == "openvino"
    assert resolve_engine("auto", torch.device("cuda")).name == "torch"
    with pytest.raises(ConfigError, match=r"^inference\.engine=openvino runs on the CPU only"):
        resolve_engine("openvino", torch.device("cuda"))
    with pytest.raises(ConfigError, match=r"unknown inference engine 'tensorrt'; available: "):
        resolve_engine("tensorrt", torch.device("cpu"))


class _Bessel(nn.Module):
    """A network OpenVINO's converter has no rule for (a Bessel function), traced or
    exported."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.bessel_j0(x).mean((2, 3))


@pytest.mark.integration  # four conversions tried, ~4.6 s
def test_auto_runs_eager_what_openvino_cannot_convert_and_a_named_engine_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    require("openvino")
    monkeypatch.delenv("VISION_TL_ENGINE")
    x = torch.rand(3, 3, 16, 16)
    runner = compile_forward(_Bessel(), "auto", "fp32", torch.device("cpu"))
    torch.testing.assert_close(runner(x), _Bessel()(x))
    assert runner.engine == "torch"
    assert "inference.engine=auto: openvino cannot run this network" in caplog.text
    named = compile_forward(_Bessel(), "openvino", "fp32", torch.device("cpu"))
    with pytest.raises(Exception, match="bessel"):
        named(x)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("key", "value", "line"),
    [
        ("inference.engine", "openvno", "inference.engine=openvno: one of auto, onnxruntime"),
        ("data.feature_engine", "tvm", "data.feature_engine=tvm: one of auto, onnxruntime"),
        ("batch_size", 0, "batch_size=0: a positive integer, or null"),
    ],
)
def test_a_wrong_engine_is_one_line_before_any_work(key: str, value: object, line: str) -> None:
    cfg = OmegaConf.create({})
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    message = str(caught.value)
    assert message.startswith(line) and "\n" not in message


# --------------------------------------------------------------------------- checkpoints


def compose_entry(name: str, overrides: list[str], output_dir: Path):
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return compose(name, overrides=[*overrides, f"paths.output_dir={output_dir}"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny resnet18 fine-tuned a few steps on generated images (48 px), and its data."""
    base = tmp_path_factory.mktemp("engines")
    root = make_image_folder(base / "data", per_class=6, size=56)
    quick = [
        *TINY,
        "data.image_size=48",
        "trainer.max_epochs=1",
        "test=false",
        "logger=none",
        "callbacks.learning_rate_monitor=null",
        "callbacks.last_checkpoint=null",
        f"data.root={root}",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VISION_TL_CACHE", str(base / "cache"))
        run_training(compose_entry("train", quick, base / "run"))
    return {"ckpt": base / "run" / "checkpoints" / "best.ckpt", "root": root}


def predictions(ckpt_or_model: str, input_dir: Path, out: Path, *extra: str) -> pd.DataFrame:
    cfg = compose_entry(
        "predict", [ckpt_or_model, f"input={input_dir}", "num_workers=0", *extra], out
    )
    return run_predict(cfg)


@pytest.mark.parametrize(
    "fmt",
    [
        pytest.param("openvino", marks=pytest.mark.integration),
        pytest.param("onnx_int8", marks=pytest.mark.slow),
    ],
)
def test_export_round_trip_and_predict_from_the_exported_folder(
    fmt: str, trained: dict[str, Path], tmp_path: Path
) -> None:
    require("openvino")
    if fmt == "onnx_int8":
        require("nncf")
    val = trained["root"] / "val"
    keys = [f"ckpt_path={trained['ckpt']}", f"format={fmt}", f"verify_input={val}"]
    keys.append(f"calibration.input={trained['root'] / 'train'}")
    card = run_export(compose_entry("export", keys, tmp_path / "export"))
    written = json.loads((tmp_path / "export" / "model.json").read_text())
    assert written["runtime"] == card["runtime"] and card["runtime"]["packages"]
    parity = card["parity"]
    assert parity["images"] == 18 and {"acc_exported", "acc_pytorch_fp32"} <= set(parity)
    if fmt == "openvino":
        assert (tmp_path / "export" / "model.xml").is_file()
        assert (tmp_path / "export" / "model.bin").is_file()
        assert card["max_abs_diff"] < 1e-3 and parity["top1_agreement"] == 1.0
    else:
        assert card["runtime"]["precision"] == "int8" and "max_abs_diff" not in card
        assert parity["top1_agreement"] >= 0.8
    eager = predictions(
        f"ckpt_path={trained['ckpt']}", val, tmp_path / "eager", "inference.engine=torch"
    )
    exported = predictions(f"model_path={tmp_path / 'export'}", val, tmp_path / "exported")
    assert list(exported.path) == list(eager.path)
    agree = (exported.top1_label == eager.top1_label).mean()
    assert agree == pytest.approx(parity["top1_agreement"], abs=1 / 18 + 1e-9)
    if fmt == "openvino":
        assert (exported.prob_cat - eager.prob_cat).abs().max() < 0.02  # bf16 where native


@pytest.mark.integration
def test_predict_on_each_engine_agrees_with_eager(trained: dict[str, Path], tmp_path: Path) -> None:
    require("openvino")
    val = trained["root"] / "val"
    ckpt = f"ckpt_path={trained['ckpt']}"
    eager = predictions(ckpt, val, tmp_path / "torch", "inference.engine=torch")
    for name in ("openvino",):  # onnxruntime: the unit test above (its export costs ~8 s)
        frame = predictions(
            ckpt, val, tmp_path / name, f"inference.engine={name}", "precision=fp32"
        )
        assert (frame.prob_cat - eager.prob_cat).abs().max() < 1e-4, name
    with pytest.raises(ConfigError, match=r"model_path=.*no model\.json"):
        predictions(f"model_path={tmp_path}", val, tmp_path / "none")


@pytest.mark.integration
def test_the_feature_cache_through_openvino_equals_eager(tmp_path: Path) -> None:
    require("openvino")
    root = make_image_folder(tmp_path / "data", per_class=4, size=40)
    model = build_model({"backbone": {"name": "resnet18"}}, 3, pretrained=False).eval()
    rows = {}
    for engine in ("torch", "openvino"):
        cached = eval_features(
            root, model, tmp_path / "cache", feature_precision="fp32", feature_engine=engine
        )
        assert not cached.hits["eval"], "each engine has its own entry"
        rows[engine] = cached.tensors("train", train=False)[0]
    assert rows["torch"].shape == (1, 12, 512)
    torch.testing.assert_close(rows["openvino"], rows["torch"], atol=1e-4, rtol=1e-4)


TINY_NET = {"backbone": {"name": "timm/test_efficientnet"}}


class _ReadsAChildsWeight(nn.Module):
    """A forward that reads its child's weight without calling the child."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.proj.weight) * 2


@pytest.mark.unit
def test_the_conversion_key_covers_the_weights_a_pass_reads_and_no_others() -> None:
    """A probe's head changes with every seed and class count; its backbone's converted
    model is keyed by the backbone alone, so a later run reuses the conversion. The
    classifying pass, which reads the head, is keyed by it too."""
    require("openvino")
    torch.manual_seed(0)
    a = build_model(TINY_NET, 3, pretrained=False).eval()
    b = build_model(TINY_NET, 5, pretrained=False).eval()
    b.backbone.load_state_dict(a.backbone.state_dict())
    x = (torch.rand(2, 3, 32, 32),)
    assert converted_cache(Forward(a, "features"), x) == converted_cache(Forward(b, "features"), x)
    c = build_model(TINY_NET, 3, pretrained=False).eval()
    c.backbone.load_state_dict(a.backbone.state_dict())
    assert converted_cache(Forward(a, "forward"), x) != converted_cache(Forward(c, "forward"), x)
    with torch.no_grad():
        c.backbone.body.conv_stem.weight[0, 0, 0, 0] += 1
    assert converted_cache(Forward(a, "features"), x) != converted_cache(Forward(c, "features"), x)

    module, y = _ReadsAChildsWeight(), (torch.rand(2, 4),)
    before = used_weights_digest(module, y)
    with torch.no_grad():
        module.unused.weight += 1
    assert used_weights_digest(module, y) == before
    with torch.no_grad():
        module.proj.weight += 1
    assert used_weights_digest(module, y) != before


@pytest.mark.integration
def test_openvino_converts_through_torch_export_when_tracing_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require("openvino")
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.rand(2, 3, 12, 12)
    forward = Forward(net.eval())

    def gone(*args: object, **kwargs: object) -> None:
        raise RuntimeError("torch.jit.trace was removed")

    monkeypatch.setattr(torch.jit, "trace", gone)
    import openvino as ov

    # f32 named: OpenVINO computes in bf16 by default on a CPU with AVX512-BF16.
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(openvino_model(forward, (x,)), "CPU", f32)
    batch = torch.rand(5, 3, 12, 12)  # another batch size: the batch axis stayed dynamic
    torch.testing.assert_close(torch.from_numpy(compiled(batch.numpy())[0]), net(batch))


class ThreadSpy:
    """A runner of `engine` that records torch's thread count at each call."""

    precision = "fp32"

    def __init__(self, engine: str) -> None:
        self.engine = engine
        self.threads: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.threads.append(torch.get_num_threads())
        return torch.zeros(len(x), 3)


@pytest.mark.unit
@pytest.mark.parametrize(("engine", "inside"), [("openvino", 1), ("onnxruntime", 1), ("torch", 3)])
def test_torch_keeps_one_thread_while_another_engine_computes(engine: str, inside: int) -> None:
    """torch's idle threads spin on the cores another engine needs: around that engine's
    calls torch runs on one thread, and gets its threads back after; eager keeps them."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        spy = ThreadSpy(engine)
        with cores_for(spy):
            assert torch.get_num_threads() == inside
        assert torch.get_num_threads() == 3
        pre = build_model({"backbone": {"name": "resnet18"}}, 3, pretrained=False).preprocess
        predictor = Predictor(None, pre.resolve({"image_size": 32}), runner=spy)
        views = torch.randint(0, 255, (2, 1, 3, 32, 32), dtype=torch.uint8)
        probs = predictor.probabilities(views)
        assert spy.threads == [inside] and probs.shape == (2, 3)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
