"""Plain nn.Module classifiers (single backbone, ensemble) and the builder from a config dict."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vision_tl.core.errors import ConfigError
from vision_tl.data.preprocess import Preprocess
from vision_tl.models.backbones import Backbone, build_backbone
from vision_tl.models.fusions import build_fusion
from vision_tl.models.heads import build_head

log = logging.getLogger(__name__)

# Members see one tensor: these must match. Resize and interpolation only shape the crop.
TENSOR_FIELDS = ("input_size", "mean", "std")


class Classifier(nn.Module):
    """Common behaviour: frozen modules stay in eval mode, so BatchNorm statistics never move."""

    def backbones(self) -> list[Backbone]:
        raise NotImplementedError

    @property
    def preprocess(self) -> Preprocess:
        return self.backbones()[0].preprocess

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if mode:
            for module in self.modules():
                if getattr(module, "frozen", False):
                    module.eval()
        return self

    def head_parameters(self) -> Iterator[nn.Parameter]:
        backbone_ids = {id(p) for b in self.backbones() for p in b.parameters()}
        return (p for p in self.parameters() if id(p) not in backbone_ids)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return (p for b in self.backbones() for p in b.parameters())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (concatenated over ensemble members): what a frozen
        backbone's feature cache stores."""
        return torch.cat([b(x) for b in self.backbones()], dim=1)

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from `features(x)`; `forward(x)` is exactly this composition."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify_features(self.features(x))


class ImageClassifier(Classifier):
    """One backbone and one head."""

    def __init__(self, backbone: Backbone, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def backbones(self) -> list[Backbone]:
        return [self.backbone]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


class EnsembleClassifier(Classifier):
    """Several backbones fused into one prediction by a registered fusion
    (`vision_tl.models.fusions`: `logits`, `features`, `mean`)."""

    def __init__(
        self,
        members: Sequence[Backbone],
        num_classes: int,
        fusion: str = "logits",
        head: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if len(members) < 2:
            raise ConfigError("an ensemble needs at least two members")
        first = members[0]
        for other in members[1:]:
            diff = first.preprocess.differences(other.preprocess)
            hard = [d for d in diff if d.split()[0] in TENSOR_FIELDS]
            if hard:
                raise ConfigError(
                    f"ensemble members {first.name} and {other.name} need different "
                    f"preprocessing ({'; '.join(hard)}); choose weights that agree"
                )
            if diff:
                log.warning(
                    "ensemble members %s and %s differ in %s; using %s's",
                    first.name,
                    other.name,
                    "; ".join(diff),
                    first.name,
                )
        self.fusion_name = fusion
        self.members = nn.ModuleList(members)
        self.fusion = build_fusion(fusion, [m.num_features for m in members], num_classes, head)

    def backbones(self) -> list[Backbone]:
        return list(self.members)

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.fusion(features.split([m.num_features for m in self.members], dim=1))


def _member_spec(member: str | Mapping[str, Any], default_weights: str | None) -> dict:
    if isinstance(member, str):
        return {"name": member, "weights": default_weights, "weights_path": None}
    return {"weights": default_weights, "weights_path": None, **member}


def build_model(spec: Mapping[str, Any], num_classes: int, pretrained: bool = True) -> Classifier:
    """Build a classifier from the `model` config (plain dict).

    A spec with `members` is an ensemble; otherwise `backbone` + `head`.
    `pretrained=False` builds every backbone with random weights and no download.
    """

    def backbone(b: Mapping[str, Any]) -> Backbone:
        if not pretrained:
            return build_backbone(b["name"], weights=None)
        return build_backbone(b["name"], b.get("weights", "DEFAULT"), b.get("weights_path"))

    if spec.get("members"):
        weights = spec.get("weights", "DEFAULT")
        members = [backbone(_member_spec(m, weights)) for m in spec["members"]]
        return EnsembleClassifier(
            members, num_classes, spec.get("fusion", "logits"), spec.get("head")
        )
    bb = backbone(spec["backbone"])
    head = dict(spec.get("head") or {"name": "linear"})
    return ImageClassifier(bb, build_head(head.pop("name"), bb.num_features, num_classes, **head))
