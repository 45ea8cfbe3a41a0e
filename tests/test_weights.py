"""Pretrained weights: torchvision download code (from a pre-filled cache), timm, local files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import SHARED_WEIGHTS
from safetensors.torch import load_file, save_file

from vision_tl.core.errors import ConfigError, WeightsError
from vision_tl.models import build_backbone
from vision_tl.models.backbones import timm_cache_path, torchvision_cache_path
from vision_tl.models.weights import load_weights_file

RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"


def _random_resnet18_state() -> dict[str, torch.Tensor]:
    import torchvision

    torch.manual_seed(123)
    return torchvision.models.resnet18(weights=None).state_dict()


def test_torchvision_weights_load_from_the_hub_cache() -> None:
    state = _random_resnet18_state()
    path = Path(torchvision_cache_path(RESNET18_URL))
    assert path.is_relative_to(os.environ["TORCH_HOME"])
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    backbone = build_backbone("resnet18", weights="DEFAULT")
    torch.testing.assert_close(backbone.body.conv1.weight, state["conv1.weight"])
    torch.testing.assert_close(
        backbone.body.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"]
    )


def test_failed_download_is_one_clear_line_and_never_random() -> None:
    with pytest.raises(WeightsError) as info:
        build_backbone("resnet18", weights="DEFAULT")
    message = str(info.value)
    assert "\n" not in message
    assert RESNET18_URL in message
    assert torchvision_cache_path(RESNET18_URL) in message
    assert "weights_path" in message


def test_timm_failed_download_names_url_and_cache_path() -> None:
    with pytest.raises(WeightsError) as info:
        build_backbone("timm/tf_efficientnet_lite0", weights="DEFAULT")
    message = str(info.value)
    assert "\n" not in message
    assert "huggingface.co/timm/tf_efficientnet_lite0" in message
    assert timm_cache_path("tf_efficientnet_lite0") in message


@pytest.mark.integration
def test_local_state_dict_and_safetensors(tmp_path: Path) -> None:
    state = _random_resnet18_state()
    torch.save(state, tmp_path / "w.pth")
    save_file(state, tmp_path / "w.safetensors")
    for name in ("w.pth", "w.safetensors"):
        backbone = build_backbone("resnet18", weights_path=str(tmp_path / name))
        torch.testing.assert_close(
            backbone.body.layer1[0].conv1.weight, state["layer1.0.conv1.weight"]
        )


def test_lightning_checkpoint_loads_into_a_bare_backbone(tmp_path: Path) -> None:
    trained = build_backbone("resnet18", weights=None)
    wrapped = {f"model.backbone.body.{k}": v for k, v in trained.body.state_dict().items()}
    wrapped["model.head.0.weight"] = torch.zeros(3, 512)
    torch.save({"state_dict": wrapped, "epoch": 3}, tmp_path / "run.ckpt")
    backbone = build_backbone("resnet18", weights_path=str(tmp_path / "run.ckpt"))
    torch.testing.assert_close(backbone.body.conv1.weight, trained.body.conv1.weight)


@pytest.mark.integration
def test_mismatched_weights_file_is_a_clear_error(tmp_path: Path) -> None:
    import torchvision

    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(WeightsError, match=r"does not fit backbone resnet18: .*unexpected layer"):
        build_backbone("resnet18", weights_path=str(tmp_path / "r34.pth"))
    with pytest.raises(ConfigError, match="does not exist"):
        build_backbone("resnet18", weights_path=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        build_backbone("resnet18", weights_path=str(tmp_path / "junk.pth"))


def test_shape_mismatch_is_named(tmp_path: Path) -> None:
    state = _random_resnet18_state()
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)
    torch.save(state, tmp_path / "gray.pth")
    backbone = build_backbone("resnet18", weights=None)
    with pytest.raises(WeightsError, match=r"shape mismatch conv1.weight \(64, 1, 7, 7\)"):
        load_weights_file(backbone.body, tmp_path / "gray.pth", backbone.name)


needs_shared = pytest.mark.skipif(not SHARED_WEIGHTS.is_file(), reason="../shared weights absent")


@needs_shared
def test_shared_timm_weights_from_file() -> None:
    backbone = build_backbone("timm/tf_efficientnet_lite0", weights_path=str(SHARED_WEIGHTS))
    state = load_file(str(SHARED_WEIGHTS))
    torch.testing.assert_close(backbone.body.conv_stem.weight, state["conv_stem.weight"])
    torch.testing.assert_close(backbone.body.bn2.running_mean, state["bn2.running_mean"])


@needs_shared
def test_timm_pretrained_tag_uses_a_cached_file() -> None:
    cached = Path(timm_cache_path("tf_efficientnet_lite0"))
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.unlink(missing_ok=True)
    os.symlink(SHARED_WEIGHTS, cached)
    try:
        backbone = build_backbone("timm/tf_efficientnet_lite0", weights="DEFAULT")
    finally:
        cached.unlink()
    state = load_file(str(SHARED_WEIGHTS))
    torch.testing.assert_close(
        backbone.body.blocks[6][0].conv_pw.weight, state["blocks.6.0.conv_pw.weight"]
    )
