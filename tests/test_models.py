"""Backbone and head registries, classifiers, ensembles: build and train at small size."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vision_tl.core.errors import ConfigError
from vision_tl.core.registry import Registry
from vision_tl.core.runtime import inference_copy
from vision_tl.data.preprocess import EnsemblePreprocess
from vision_tl.inference.predictor import Predictor
from vision_tl.models import (
    FUSIONS,
    HEADS,
    Backbone,
    EnsembleClassifier,
    ImageClassifier,
    available_backbones,
    build_backbone,
    build_head,
    build_model,
)
from vision_tl.models.fold import fold_batchnorm
from vision_tl.training.probe import zero_logit_layers

TIMM_MODELS = ["timm/tf_efficientnet_lite0", "timm/resnet18", "timm/test_convnext", "timm/test_vit"]
REQUIRED = {
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "convnext_tiny",
    "vgg16",
    "efficientnet_v2_s",
    "regnet_y_400mf",
    "vit_b_16",
}


def test_registry_has_the_required_backbones() -> None:
    assert set(available_backbones()) >= REQUIRED


@pytest.mark.integration  # builds every full-size network
@pytest.mark.parametrize("name", available_backbones() + TIMM_MODELS)
def test_backbone_forward_backward(name: str) -> None:
    backbone = build_backbone(name, weights=None)
    assert isinstance(backbone, Backbone)
    size = backbone.fixed_input_size or 32  # the smallest input every other network takes
    x = torch.randn(2, 3, size, size)
    features = backbone(x)
    assert features.shape == (2, backbone.num_features)
    features.square().mean().backward()
    grads = [p.grad for p in backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    # The stages partition the parameters: each in exactly one stage, so freezing is exact.
    staged = [id(p) for s in backbone.stages for p in s.parameters()]
    assert len(backbone.stages) >= 2 and len(staged) == len(set(staged))
    assert set(staged) == {id(p) for p in backbone.parameters()}
    pre = backbone.preprocess
    assert 0 < pre.input_size <= pre.resize_size and len(pre.mean) == len(pre.std) == 3
    # Frozen inference folds every BatchNorm into the convolution before it: same features.
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:  # nothing to fold (ViT, ConvNeXt, VGG)
        return
    with torch.no_grad():
        for norm in norms:  # statistics far from the identity, so a wrong fold shows
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
        expected = backbone.eval()(x)
    fast = fold_batchnorm(backbone.body)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules()), "a BatchNorm left"
    with torch.no_grad():
        assert torch.allclose(fast(x), expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
        assert torch.equal(backbone(x), expected), "folding changed the original"


@pytest.mark.parametrize("name", HEADS.names())
def test_head_forward_backward(name: str) -> None:
    head = build_head(name, 16, 5)
    out = head(torch.randn(4, 16))
    assert out.shape == (4, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_mlp_head_is_the_recipe_layout() -> None:
    head = build_head("mlp", 2048, 50, hidden=[512], dropout=0.5)
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert head[0].out_features == 512 and head[2].p == 0.5 and head[3].out_features == 50
    normed = build_head("mlp", 64, 3, hidden=[32], layer_norm=True)
    assert isinstance(normed[0], nn.LayerNorm) and isinstance(normed[2], nn.LayerNorm)


def test_unknown_names_list_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet9000'; available: .*resnet18"):
        build_backbone("resnet9000", weights=None)
    with pytest.raises(ConfigError, match="unknown head 'nope'"):
        build_head("nope", 8, 2)
    with pytest.raises(ConfigError, match="unknown timm model"):
        build_backbone("timm/not_a_model_xyz", weights=None)
    with pytest.raises(ConfigError, match=r"unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        build_backbone("resnet18", weights="IMAGENET9K")


def test_registry_rejects_duplicates() -> None:
    registry: Registry[int] = Registry("thing")
    registry.add("a", 1)
    with pytest.raises(KeyError, match="already registered"):
        registry.add("a", 2)


def test_single_classifier_from_spec() -> None:
    spec = {"backbone": {"name": "resnet18"}, "head": {"name": "mlp", "hidden": [32]}}
    model = build_model(spec, num_classes=3, pretrained=False)
    assert isinstance(model, ImageClassifier)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    head_ids = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in model.head_parameters()} == head_ids


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_ensemble_fusions(fusion: str) -> None:
    spec = {"members": ["resnet18", "mobilenet_v2"], "fusion": fusion}
    model = build_model(spec, num_classes=4, pretrained=False)
    assert isinstance(model, EnsembleClassifier) and len(model.members) == 2
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 4)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    if fusion == "mean":
        # log of averaged member probabilities: exp sums to one per row
        torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(3))
    if fusion == "logits":
        assert model.fusion.fuse.in_features == 2 * 4
        # A fresh logits fusion is the mean of its members' logits.
        feats = [torch.randn(3, m.num_features) for m in model.members]
        members = [h(f) for h, f in zip(model.fusion.heads, feats, strict=True)]
        torch.testing.assert_close(model.fusion(feats), torch.stack(members).mean(0))
    if fusion == "features":
        assert isinstance(model.fusion.fuse[0], nn.LayerNorm)
        assert model.fusion.fuse[0].normalized_shape == (512 + 1280,)


def test_the_inference_copy_folds_each_member_and_leaves_the_model_as_it_was() -> None:
    """Frozen inference (feature cache, eval, predict) runs `inference_copy()`: the same
    logits as the model in eval mode, no BatchNorm left, and the model itself untouched
    (still training, its own BatchNorms and parameters, not shared with the copy)."""
    model = build_model({"members": ["resnet18", "mobilenet_v2"], "fusion": "logits"}, 3, False)
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    fast = model.inference_copy()
    assert model.training and not fast.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20 + 52
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-5)
    ours = {id(p) for p in model.parameters()}
    assert not ours & {id(p) for p in fast.parameters()}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_frozen_inference_folds_in_fp32_and_runs_bf16_as_trained() -> None:
    """Folded weights lose precision when rounded to bf16, so the feature cache and the
    predictor fold BatchNorms in fp32 only (`inference_copy`)."""
    model = build_model({"backbone": {"name": "resnet18"}}, 3, pretrained=False)

    def norms(module: nn.Module) -> int:
        return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())

    assert norms(inference_copy(model, "fp32")) == 0
    assert norms(inference_copy(model, "bf16")) == norms(model) == 20
    preprocess = model.preprocess.resolve(None)
    assert norms(Predictor(model, preprocess, precision="fp32").model) == 0
    assert norms(Predictor(model, preprocess, precision="bf16").model) == 20
    assert model.training, "the model the predictor was given is left as it was"


def test_ensemble_mean_fusion_averages_member_probabilities() -> None:
    model = build_model({"members": ["resnet18", "resnet18"], "fusion": "mean"}, 3, False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        heads = model.fusion.heads
        probs = [h(m(x)).softmax(1) for m, h in zip(model.members, heads, strict=True)]
        torch.testing.assert_close(model(x).exp(), (probs[0] + probs[1]) / 2)


def test_ensemble_members_keep_their_own_preprocessing() -> None:
    a = build_backbone("resnet18", weights=None)  # resize 256
    b = build_backbone("mobilenet_v2", weights=None)  # resize 232
    model = EnsembleClassifier([a, b], num_classes=2)
    assert model.preprocess == EnsemblePreprocess((a.preprocess, b.preprocess))
    b.preprocess = replace(b.preprocess, input_size=200, std=(0.5, 0.5, 0.5))
    assert model.preprocess.members[1].input_size == 200
    b.preprocess = a.preprocess
    assert model.preprocess == a.preprocess, "members that agree share one tensor"


def test_ensemble_rejects_unknown_fusion() -> None:
    with pytest.raises(ConfigError, match="unknown fusion 'vote'"):
        build_model({"members": ["resnet18", "resnet18"], "fusion": "vote"}, 2, False)


ZERO_START = [
    *({"backbone": {"name": "resnet18"}, "head": {"name": h}} for h in HEADS.names()),
    *({"members": ["resnet18", "resnet18"], "fusion": f} for f in FUSIONS.names()),
]


@pytest.mark.parametrize("spec", ZERO_START, ids=lambda s: s.get("fusion") or s["head"]["name"])
def test_the_probe_s_zero_start_gives_every_class_the_same_score_and_still_learns(
    spec: dict,
) -> None:
    """`logit_layers` are exactly the layers the class scores come out of, for every head
    and fusion: zeroed, no input reaches the scores (every class equally likely), and the
    first step's gradient still reaches each of them (zeroing one layer too many would
    leave the head stuck at zero)."""
    model = build_model(spec, num_classes=3, pretrained=False).eval()
    zero_logit_layers(model)
    dim = sum(b.num_features for b in model.backbones())
    logits = model.classify_features(torch.randn(5, dim))
    torch.testing.assert_close(logits.softmax(1), torch.full((5, 3), 1 / 3))
    F.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1])).backward()
    for layer in model.logit_layers():
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
