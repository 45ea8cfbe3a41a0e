"""bf16 feature extraction: where it is on by default, one switch back to fp32, same path for
eval and predict."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_image_folder
from helpers.data import eval_features

from vision_tl.core.errors import ConfigError
from vision_tl.core.runtime import native_bf16, resolve_precision
from vision_tl.inference.predictor import Predictor
from vision_tl.models import build_model
from vision_tl.training.build import build_data


@pytest.mark.unit
def test_auto_is_bf16_only_where_it_runs_natively() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native_bf16(cpu) else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="precision=fp16"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ConfigError):
        build_data({"root": "x", "feature_precision": "half"})


@pytest.mark.integration
def test_bf16_features_are_a_separate_entry_close_to_fp32(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=3)
    model = build_model({"backbone": {"name": "resnet18"}}, 3, pretrained=False).eval()
    stores = {}
    for precision in ("fp32", "bf16"):
        cached = eval_features(
            root, model, tmp_path / "cache", feature_precision=precision, feature_engine="torch"
        )
        assert cached.precision == precision and cached.hits == {"eval": False}
        stores[precision] = cached.tensors("train", train=False)[0]
    assert not torch.equal(stores["fp32"], stores["bf16"])  # bf16 really ran
    if not native_bf16(torch.device("cpu")):  # OpenVINO would run f32: the entry says so
        on_openvino = eval_features(
            root, model, tmp_path / "ov", feature_precision="bf16", feature_engine="openvino"
        )
        assert on_openvino.precision == "fp32"
    cosine = torch.nn.functional.cosine_similarity(stores["fp32"][0], stores["bf16"][0])
    assert cosine.min() > 0.99

    # predict/eval take the same path: bf16 backbone, fp32 head, probabilities that agree
    files = sorted(str(p) for p in (root / "val").rglob("*.png"))
    pre = model.preprocess.resolve({"image_size": 32})  # as the cache's data keys give it
    probs = {p: Predictor(model, pre, precision=p).predict(files).probs for p in ("fp32", "bf16")}
    assert probs["bf16"].dtype == torch.float32
    torch.testing.assert_close(probs["bf16"], probs["fp32"], atol=0.05, rtol=0)
