"""Backbone registry: pretrained networks that return pooled features.

Adding a torchvision backbone is one decorated function below that names its classifier
(cut off) and its stages (for partial fine-tuning); any timm model is available as
`timm/<name>` (optionally `timm/<name>.<pretrained_tag>`), its stages from timm's own
parameter groups.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from vision_tl.core.config import cache_dir
from vision_tl.core.errors import ConfigError, WeightsError
from vision_tl.core.registry import Registry
from vision_tl.data.preprocess import Preprocess, timm_preprocess
from vision_tl.models.weights import load_weights_file

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm/"
# A stage is named by parameter-name prefixes of the body ("layer1", "encoder.ln", ...).
StageSpec = str | Sequence[str]


class Stage(nn.Module):
    """A slice of a backbone (input to output order) that partial fine-tuning freezes whole.

    It references the body's modules and loose parameters (a ViT's class token) without
    owning them: stages are kept out of the module tree, so the state dict lists each
    tensor once.
    """

    def __init__(self, name: str, modules: Sequence[nn.Module], params: Sequence[nn.Parameter]):
        super().__init__()
        self.name = name
        self.parts = nn.ModuleList(modules)
        for i, param in enumerate(params):
            self.register_parameter(f"param{i}", param)


def _owns(prefix: str, name: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def build_stages(body: nn.Module, specs: Sequence[tuple[str, Sequence[str]]]) -> list[Stage]:
    """Stages from (name, parameter-name prefixes) pairs, which must partition `body`'s
    parameters: each parameter in exactly one stage, so freezing is exact."""
    named = dict(body.named_parameters())
    owner: dict[str, str] = {}
    for stage_name, prefixes in specs:
        for param_name in named:
            if any(_owns(p, param_name) for p in prefixes):
                if param_name in owner:
                    other = owner[param_name]
                    raise ValueError(f"{param_name} is in stages {other} and {stage_name}")
                owner[param_name] = stage_name
    missing = sorted(set(named) - set(owner))
    if missing:
        raise ValueError(f"parameters in no stage: {', '.join(missing[:5])}")
    inside = {
        name: {f"{name}.{n}" for n, _ in module.named_parameters()}
        for name, module in body.named_modules()
        if name
    }
    stages = []
    for stage_name, _ in specs:
        params = {n for n, s in owner.items() if s == stage_name}
        # The largest modules whose every parameter is in this stage (their BatchNorm and
        # Dropout children come along when the stage is frozen).
        modules: list[nn.Module] = []
        taken: list[str] = []
        for module_name, module in body.named_modules():
            if not module_name or any(_owns(t, module_name) for t in taken):
                continue
            if inside[module_name] and inside[module_name] <= params:
                modules.append(module)
                taken.append(module_name)
        stages.append(Stage(stage_name, modules, [named[n] for n in sorted(params)]))
    return stages


class Backbone(nn.Module):
    """A feature extractor plus what is needed to use it correctly.

    `body` maps images to pooled features of size `num_features`; `preprocess` is the
    input pipeline of its weights; `stages` partition the body's parameters from input
    to output, for freezing all but the last N; `dropped_keys` names the original
    classifier's state-dict prefixes, which a weights file may carry but the body lacks;
    `fixed_input_size` is the one input size a network accepts (a ViT's position
    embeddings), None when any size from 32 px up works.
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        num_features: int,
        preprocess: Preprocess,
        stages: Sequence[Stage],
        dropped_keys: Sequence[str] = (),
        fixed_input_size: int | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.num_features = num_features
        self.preprocess = preprocess
        # A tuple is not registered as submodules, so parameters are not listed twice.
        self.stages: tuple[Stage, ...] = tuple(stages)
        self.dropped_keys = tuple(dropped_keys)
        self.fixed_input_size = fixed_input_size

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
        load_weights_file(backbone.body, weights_path, backbone.name, backbone.dropped_keys)
    return backbone


# --------------------------------------------------------------------------- torchvision


def _tv_weights(arch: str, weights: str | None) -> tuple[type[WeightsEnum], WeightsEnum | None]:
    """Resolve a torchvision weights name ("DEFAULT", "IMAGENET1K_V2", ...) for `arch`."""
    enum = torchvision.models.get_model_weights(arch)
    if weights is None:
        return enum, None
    try:
        return enum, enum[weights]
    except KeyError:
        known = ", ".join(["DEFAULT", *enum.__members__])
        raise ConfigError(f"unknown weights '{weights}' for {arch}; available: {known}") from None


def _tv_preprocess(weights: WeightsEnum) -> Preprocess:
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
    if not isinstance(head, nn.Sequential):
        raise TypeError(f"unexpected classifier {type(head).__name__} at {attr}")
    last = max(i for i, m in enumerate(head) if isinstance(m, nn.Linear))
    num_features = head[last].in_features
    name = next(name for name, module in head.named_children() if module is head[last])
    dropped = [f"{attr}.{name}"]
    head[last] = nn.Identity()
    if last > 0 and isinstance(head[last - 1], nn.Dropout):
        head[last - 1] = nn.Identity()
    return num_features, dropped


def torchvision_backbone(
    arch: str,
    weights: str | None,
    classifier: str,
    stages: Callable[[nn.Module], Sequence[StageSpec]],
    fixed_input_size: int | None = None,
) -> Backbone:
    """Generic torchvision builder: load weights, cut the `classifier`, build `stages`.

    `stages(model)` lists each stage's parameter-name prefixes, input to output; a
    stage that is a single prefix may be given as a string.
    """
    enum, resolved = _tv_weights(arch, weights)
    model = torchvision.models.get_model(arch, weights=None)
    if resolved is not None:
        model.load_state_dict(_tv_state_dict(arch, resolved))
    num_features, dropped = _strip_classifier(model, classifier)
    specs = [(s, (s,)) if isinstance(s, str) else ("+".join(s), tuple(s)) for s in stages(model)]
    return Backbone(
        name=arch,
        body=model,
        num_features=num_features,
        preprocess=_tv_preprocess(resolved or enum.DEFAULT),
        stages=build_stages(model, [s for s in specs if _has_params(model, s[1])]),
        dropped_keys=dropped,
        fixed_input_size=fixed_input_size,
    )


def _has_params(model: nn.Module, prefixes: Sequence[str]) -> bool:
    return any(any(_owns(p, n) for p in prefixes) for n, _ in model.named_parameters())


def _children(attr: str) -> Callable[[nn.Module], list[str]]:
    """One stage per child of `model.<attr>` (torchvision's `features` Sequentials)."""
    return lambda model: [f"{attr}.{name}" for name, _ in getattr(model, attr).named_children()]


def _resnet_stages(model: nn.Module) -> list[StageSpec]:
    return [("conv1", "bn1"), "layer1", "layer2", "layer3", "layer4"]


def _features_and_classifier(model: nn.Module) -> list[StageSpec]:
    """`features` children, then what remains of the classifier (MobileNetV3's hidden
    Linear, ConvNeXt's LayerNorm, VGG's two hidden Linears)."""
    return [*_children("features")(model), "classifier"]


def _regnet_stages(model: nn.Module) -> list[StageSpec]:
    return ["stem", *_children("trunk_output")(model)]


def _vit_stages(model: nn.Module) -> list[StageSpec]:
    layers = [f"encoder.layers.{name}" for name, _ in model.encoder.layers.named_children()]
    return [("conv_proj", "class_token", "encoder.pos_embedding"), *layers, "encoder.ln"]


@register_backbone("resnet18")
def resnet18(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone("resnet18", weights, classifier="fc", stages=_resnet_stages)


@register_backbone("resnet34")
def resnet34(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone("resnet34", weights, classifier="fc", stages=_resnet_stages)


@register_backbone("resnet50")
def resnet50(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone("resnet50", weights, classifier="fc", stages=_resnet_stages)


@register_backbone("resnet101")
def resnet101(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone("resnet101", weights, classifier="fc", stages=_resnet_stages)


@register_backbone("mobilenet_v2")
def mobilenet_v2(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone(
        "mobilenet_v2", weights, classifier="classifier", stages=_features_and_classifier
    )


@register_backbone("mobilenet_v3_large")
def mobilenet_v3_large(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone(
        "mobilenet_v3_large", weights, classifier="classifier", stages=_features_and_classifier
    )


@register_backbone("efficientnet_b0")
def efficientnet_b0(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone(
        "efficientnet_b0", weights, classifier="classifier", stages=_features_and_classifier
    )


@register_backbone("efficientnet_v2_s")
def efficientnet_v2_s(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone(
        "efficientnet_v2_s", weights, classifier="classifier", stages=_features_and_classifier
    )


@register_backbone("convnext_tiny")
def convnext_tiny(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone(
        "convnext_tiny", weights, classifier="classifier", stages=_features_and_classifier
    )


@register_backbone("regnet_y_400mf")
def regnet_y_400mf(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone("regnet_y_400mf", weights, classifier="fc", stages=_regnet_stages)


@register_backbone("vit_b_16")
def vit_b_16(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone(
        "vit_b_16", weights, classifier="heads", stages=_vit_stages, fixed_input_size=224
    )


@register_backbone("vgg16")
def vgg16(weights: str | None = "DEFAULT") -> Backbone:
    return torchvision_backbone(
        "vgg16", weights, classifier="classifier", stages=_features_and_classifier
    )


# --------------------------------------------------------------------------- timm


def timm_cache_path(model_name: str) -> str:
    """A file placed here is used instead of timm's download (e.g. on an offline machine)."""
    return str(cache_dir() / "weights" / "timm" / f"{model_name}.safetensors")


def _timm_create(name: str, weights: str | None) -> nn.Module:
    import timm

    kwargs: dict = {"num_classes": 0, "pretrained": weights is not None}
    if weights is None:
        return timm.create_model(name, **kwargs)
    local = timm_cache_path(name)
    if os.path.isfile(local):
        kwargs["pretrained_cfg_overlay"] = {"file": local}
    try:
        return timm.create_model(name, **kwargs)
    except Exception as err:
        cfg = timm.models.get_pretrained_cfg(name) or {}
        hub = cfg.hf_hub_id if getattr(cfg, "hf_hub_id", None) else None
        url = f"https://huggingface.co/{hub}" if hub else getattr(cfg, "url", None) or "?"
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise WeightsError(
            f"could not get timm weights for {name} from {url} ({reason}); place a "
            f"safetensors file at {local} or set model.backbone.weights_path=FILE"
        ) from err


def timm_backbone(name: str, weights: str | None = "DEFAULT") -> Backbone:
    """Any timm model as a backbone; `weights` is a pretrained tag, "DEFAULT" or None.

    Stages are timm's coarse parameter groups (stem, each stage, the final norm).
    """
    import timm
    from timm.data import resolve_data_config
    from timm.models import group_parameters

    if not timm.is_model(name):
        raise ConfigError(
            f"unknown timm model '{name}'; see timm.list_models() for the available names"
        )
    if weights not in (None, "DEFAULT") and "." not in name:
        name = f"{name}.{weights}"
    model = _timm_create(name, weights)
    groups = group_parameters(model, model.group_matcher(coarse=True))
    specs = [(f"group{g}", tuple(names)) for g, names in sorted(groups.items())]
    cfg = model.pretrained_cfg
    classifier = cfg.get("classifier") or "classifier"
    return Backbone(
        name=TIMM_PREFIX + name,
        body=model,
        num_features=int(getattr(model, "head_hidden_size", None) or model.num_features),
        preprocess=timm_preprocess(resolve_data_config({}, model=model)),
        stages=build_stages(model, specs),
        dropped_keys=[classifier] if isinstance(classifier, str) else list(classifier),
        fixed_input_size=int(cfg["input_size"][-1]) if cfg.get("fixed_input_size") else None,
    )
