"""Backbone registry: pretrained CNNs that return pooled features.

Adding a torchvision backbone is one decorated function below; any timm model is
available as `timm/<name>` (optionally `timm/<name>.<pretrained_tag>`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from vision_tl.config import cache_dir
from vision_tl.errors import ConfigError, WeightsError
from vision_tl.models.preprocess import Preprocess
from vision_tl.registry import Registry

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm/"


class Backbone(nn.Module):
    """A feature extractor plus what is needed to use it correctly.

    `body` maps images to pooled features of size `num_features`; `preprocess` is the
    input pipeline of its weights; `stages` orders the body's modules from input to
    output, for freezing all but the last N; `dropped_keys` names the original
    classifier's state-dict prefixes, which a weights file may carry but the body lacks.
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        num_features: int,
        preprocess: Preprocess,
        stages: Sequence[nn.Module],
        dropped_keys: Sequence[str] = (),
    ) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.num_features = num_features
        self.preprocess = preprocess
        # A tuple is not registered as submodules, so parameters are not listed twice.
        self.stages: tuple[nn.Module, ...] = tuple(stages)
        self.dropped_keys = tuple(dropped_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


BackboneBuilder = Callable[..., Backbone]
BACKBONES: Registry[BackboneBuilder] = Registry("backbone")
register_backbone = BACKBONES.register


def available_backbones() -> list[str]:
    """Registered names; any timm model is also accepted as `timm/<name>`."""
    return BACKBONES.names()


def build_backbone(
    name: str, weights: str | None = "DEFAULT", weights_path: str | None = None
) -> Backbone:
    """Build a backbone by registry name, with pretrained weights by tag or from a file.

    `weights=None` means random initialisation; `weights_path` (a state dict,
    safetensors or Lightning checkpoint) replaces any download.
    """
    from_file = weights_path is not None
    tag = None if from_file else weights
    if name.startswith(TIMM_PREFIX):
        backbone = timm_backbone(name[len(TIMM_PREFIX) :], weights=tag)
    else:
        backbone = BACKBONES.get(name)(weights=tag)
    if from_file:
        from vision_tl.models.weights import load_backbone_file

        load_backbone_file(backbone, weights_path)
    return backbone


# --------------------------------------------------------------------------- torchvision


def _tv_weights(arch: str, weights: str | None):
    """Resolve a torchvision weights name ("DEFAULT", "IMAGENET1K_V2", ...) for `arch`."""
    enum = torchvision.models.get_model_weights(arch)
    if weights is None:
        return enum, None
    try:
        return enum, enum[weights]
    except KeyError:
        known = ", ".join(["DEFAULT", *enum.__members__])
        raise ConfigError(f"unknown weights '{weights}' for {arch}; available: {known}") from None


def _tv_preprocess(weights) -> Preprocess:
    t = weights.transforms()
    return Preprocess(
        input_size=int(t.crop_size[0]),
        resize_size=int(t.resize_size[0]),
        interpolation=t.interpolation.value,
        mean=tuple(t.mean),
        std=tuple(t.std),
    )


def torchvision_cache_path(url: str) -> str:
    """Where torch.hub looks for (and saves) a downloaded checkpoint."""
    filename = os.path.basename(urlparse(url).path)
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def _tv_state_dict(arch: str, weights) -> dict[str, torch.Tensor]:
    """Download (or read from the torch.hub cache) the weights; never fall back silently."""
    path = torchvision_cache_path(weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise WeightsError(
            f"could not get {arch} weights {weights.name} from {weights.url} ({reason}); "
            f"place the file at {path} or set model.backbone.weights_path=FILE"
        ) from err


def _strip_classifier(model: nn.Module, attr: str) -> tuple[int, list[str]]:
    """Replace the final Linear of `model.<attr>` (and a Dropout right before it) by Identity.

    Returns the feature size and the state-dict prefixes that were removed.
    """
    head = getattr(model, attr)
    if isinstance(head, nn.Linear):
        setattr(model, attr, nn.Identity())
        return head.in_features, [attr]
    assert isinstance(head, nn.Sequential), f"unexpected classifier {type(head)}"
    last = max(i for i, m in enumerate(head) if isinstance(m, nn.Linear))
    num_features = head[last].in_features
    dropped = [f"{attr}.{last}"]
    head[last] = nn.Identity()
    if last > 0 and isinstance(head[last - 1], nn.Dropout):
        head[last - 1] = nn.Identity()
    return num_features, dropped


def torchvision_backbone(
    arch: str, weights: str | None, classifier: str = "classifier"
) -> Backbone:
    """Generic torchvision builder: load weights, cut the classifier, record stages."""
    enum, resolved = _tv_weights(arch, weights)
    model = torchvision.models.get_model(arch, weights=None)
    if resolved is not None:
        model.load_state_dict(_tv_state_dict(arch, resolved))
    num_features, dropped = _strip_classifier(model, classifier)
    if hasattr(model, "features"):
        stages = [*model.features.children(), model.classifier]
    else:  # ResNet family
        stem = nn.Sequential(model.conv1, model.bn1)
        stages = [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    return Backbone(
        name=arch,
        body=model,
        num_features=num_features,
        preprocess=_tv_preprocess(resolved or enum.DEFAULT),
        stages=stages,
        dropped_keys=dropped,
    )


@register_backbone("resnet18")
def resnet18(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone("resnet18", weights, classifier="fc")


@register_backbone("resnet34")
def resnet34(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone("resnet34", weights, classifier="fc")


@register_backbone("resnet50")
def resnet50(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone("resnet50", weights, classifier="fc")


@register_backbone("resnet101")
def resnet101(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone("resnet101", weights, classifier="fc")


@register_backbone("mobilenet_v2")
def mobilenet_v2(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone("mobilenet_v2", weights)


@register_backbone("mobilenet_v3_large")
def mobilenet_v3_large(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone("mobilenet_v3_large", weights)


@register_backbone("efficientnet_b0")
def efficientnet_b0(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone("efficientnet_b0", weights)


@register_backbone("convnext_tiny")
def convnext_tiny(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone("convnext_tiny", weights)


@register_backbone("vgg16")
def vgg16(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone("vgg16", weights)


# --------------------------------------------------------------------------- timm


def timm_cache_path(model_name: str) -> str:
    """A file placed here is used instead of timm's download (e.g. on an offline machine)."""
    return str(cache_dir() / "weights" / "timm" / f"{model_name}.safetensors")


def timm_backbone(name: str, weights: str | None = "DEFAULT") -> Backbone:
    """Any timm model as a backbone; `weights` is a pretrained tag, "DEFAULT" or None."""
    import timm
    from timm.data import resolve_data_config
    from timm.models import group_modules

    if not timm.is_model(name):
        raise ConfigError(
            f"unknown timm model '{name}'; see timm.list_models() for the available names"
        )
    if weights not in (None, "DEFAULT") and "." not in name:
        name = f"{name}.{weights}"
    kwargs: dict = {"num_classes": 0, "pretrained": weights is not None}
    if weights is not None:
        local = timm_cache_path(name)
        if os.path.isfile(local):
            kwargs["pretrained_cfg_overlay"] = {"file": local}
        try:
            model = timm.create_model(name, **kwargs)
        except Exception as err:
            cfg = timm.models.get_pretrained_cfg(name) or {}
            hub = cfg.hf_hub_id if getattr(cfg, "hf_hub_id", None) else None
            url = f"https://huggingface.co/{hub}" if hub else getattr(cfg, "url", None) or "?"
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
            raise WeightsError(
                f"could not get timm weights for {name} from {url} ({reason}); place a "
                f"safetensors file at {local} or set model.backbone.weights_path=FILE"
            ) from err
    else:
        model = timm.create_model(name, **kwargs)

    data_cfg = resolve_data_config({}, model=model)
    size = int(data_cfg["input_size"][-1])
    preprocess = Preprocess(
        input_size=size,
        resize_size=math.floor(size / data_cfg["crop_pct"]),
        interpolation=data_cfg["interpolation"],
        mean=tuple(data_cfg["mean"]),
        std=tuple(data_cfg["std"]),
    )
    modules = dict(model.named_modules())
    groups = group_modules(model, model.group_matcher(coarse=True))
    stages = [nn.ModuleList([modules[n] for n in names]) for _, names in sorted(groups.items())]
    classifier = model.pretrained_cfg.get("classifier") or "classifier"
    classifiers = [classifier] if isinstance(classifier, str) else list(classifier)
    return Backbone(
        name=TIMM_PREFIX + name,
        body=model,
        num_features=int(getattr(model, "head_hidden_size", None) or model.num_features),
        preprocess=preprocess,
        stages=stages,
        dropped_keys=classifiers,
    )
