"""Plain nn.Module classifiers (single backbone, ensemble) and the builder from a config dict."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vision_tl.core.errors import ConfigError
from vision_tl.data.augment import Inputs
from vision_tl.data.preprocess import OVERRIDES, AnyPreprocess, combine
from vision_tl.models.backbones import Backbone, build_backbone
from vision_tl.models.fold import fold_batchnorm
from vision_tl.models.fusions import build_fusion
from vision_tl.models.heads import build_head

MEMBER_KEYS = ("name", "weights", "weights_path", *OVERRIDES)


class Classifier(nn.Module):
    """Common behaviour: frozen modules stay in eval mode, so BatchNorm statistics never move."""

    def backbones(self) -> list[Backbone]:
        raise NotImplementedError

    @property
    def preprocess(self) -> AnyPreprocess:
        """The pixels the backbones need: one `Preprocess`, or an `EnsemblePreprocess` when
        ensemble members need different ones."""
        return combine([b.preprocess for b in self.backbones()])

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

    def features(self, x: Inputs) -> torch.Tensor:
        """Pooled backbone features (concatenated over ensemble members): what a frozen
        backbone's feature cache stores. `x` is one batch every backbone sees, or a
        sequence of batches, one per backbone, each preprocessed for it."""
        backbones = self.backbones()
        if isinstance(x, torch.Tensor):
            return torch.cat([b(x) for b in backbones], dim=1)
        if len(x) != len(backbones):
            raise ValueError(f"{len(x)} input batches for {len(backbones)} backbones")
        return torch.cat([b(t) for b, t in zip(backbones, x, strict=True)], dim=1)

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from `features(x)`; `forward(x)` is exactly this composition."""
        raise NotImplementedError

    def inference_copy(self, fold: bool = True) -> Classifier:
        """An eval-mode copy for frozen inference (the feature cache, `eval`, `predict`):
        with `fold`, each backbone's BatchNorms folded into their convolutions
        (`models.fold`), the head as it is. This model is left unchanged."""
        if not fold:
            return copy.deepcopy(self).eval()
        bodies = [backbone.body for backbone in self.backbones()]
        # The bodies (and what the backbones' stages list of them) are not copied here:
        # `fold_batchnorm` copies each body once.
        shared = [
            t for body in bodies for t in (*body.modules(), *body.parameters(), *body.buffers())
        ]
        fast = copy.deepcopy(self, {id(t): t for t in shared}).eval()
        for backbone, body in zip(fast.backbones(), bodies, strict=True):
            backbone.body = fold_batchnorm(body)
        return fast

    def logit_layers(self) -> list[nn.Linear]:
        """The Linear layers whose outputs are the class scores: what the converged probe
        starts at zero (`training.probe.zero_logit_layers`)."""
        raise NotImplementedError

    def member_logits(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Each ensemble member's class scores within the fused model, from `features(x)`,
        where the fusion can split them out (`fusions`; none for a single backbone)."""
        return []

    def member_names(self) -> list[str]:
        """Unique names of the members `member_logits` scores, in its order."""
        return []

    def forward(self, x: Inputs) -> torch.Tensor:
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

    def logit_layers(self) -> list[nn.Linear]:
        return last_linear(self.head)


class EnsembleClassifier(Classifier):
    """Several backbones fused into one prediction by a registered fusion
    (`vision_tl.models.fusions`: `logits`, `features`, `mean`).

    Members may need different preprocessing (input size, resize, interpolation, mean and
    std): then `preprocess` is an `EnsemblePreprocess` and `forward` takes one batch per
    member, each prepared for it."""

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
        self.fusion_name = fusion
        self.members = nn.ModuleList(members)
        self.fusion = build_fusion(fusion, [m.num_features for m in members], num_classes, head)

    def backbones(self) -> list[Backbone]:
        return list(self.members)

    def _split(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return features.split([m.num_features for m in self.members], dim=1)

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.fusion(self._split(features))

    def logit_layers(self) -> list[nn.Linear]:
        """The fusion's own `logit_layers()` where it has several (`mean`), else its last
        Linear."""
        layers = getattr(self.fusion, "logit_layers", None)
        return layers() if layers is not None else last_linear(self.fusion)

    def member_logits(self, features: torch.Tensor) -> list[torch.Tensor]:
        if not getattr(self.fusion, "per_member", False):
            return []
        return self.fusion.member_logits(self._split(features))

    def member_names(self) -> list[str]:
        if not getattr(self.fusion, "per_member", False):
            return []
        names = [m.name for m in self.members]
        return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def last_linear(module: nn.Module) -> list[nn.Linear]:
    """The last `nn.Linear` of `module` in registration order (none: empty): the layer a
    head's class scores come out of when its layers run in order."""
    return [m for m in module.modules() if isinstance(m, nn.Linear)][-1:]


def _member_spec(member: str | Mapping[str, Any], default_weights: str | None) -> dict:
    if isinstance(member, str):
        return {"name": member, "weights": default_weights, "weights_path": None}
    unknown = sorted(set(member) - set(MEMBER_KEYS))
    if unknown or "name" not in member:
        raise ConfigError(
            f"model.members entry {dict(member)}: needs 'name'; may also set "
            f"{', '.join(MEMBER_KEYS[1:])}{f' (unknown: {unknown})' if unknown else ''}"
        )
    return {"weights": default_weights, "weights_path": None, **member}


def _with_overrides(backbone: Backbone, spec: Mapping[str, Any]) -> Backbone:
    """A member's own preprocessing overrides (`image_size`, `mean`, ... in its mapping)."""
    given = {k: spec[k] for k in OVERRIDES if spec.get(k) is not None}
    if given:
        backbone.preprocess = backbone.preprocess.resolve(given)
    return backbone


def build_model(spec: Mapping[str, Any], num_classes: int, pretrained: bool = True) -> Classifier:
    """Build a classifier from the `model` config (plain dict).

    A spec with `members` is an ensemble; otherwise `backbone` + `head`. A member given as
    a mapping may carry its own preprocessing overrides (`image_size`, `resize_size`,
    `interpolation`, `mean`, `std`), applied before the run's `data.*` overrides.
    `pretrained=False` builds every backbone with random weights and no download.
    """

    def backbone(b: Mapping[str, Any]) -> Backbone:
        if not pretrained:
            return build_backbone(b["name"], weights=None)
        return build_backbone(b["name"], b.get("weights", "DEFAULT"), b.get("weights_path"))

    if spec.get("members"):
        weights = spec.get("weights", "DEFAULT")
        specs = [_member_spec(m, weights) for m in spec["members"]]
        members = [_with_overrides(backbone(m), m) for m in specs]
        return EnsembleClassifier(
            members, num_classes, spec.get("fusion", "logits"), spec.get("head")
        )
    bb = backbone(spec["backbone"])
    head = dict(spec.get("head") or {"name": "linear"})
    return ImageClassifier(bb, build_head(head.pop("name"), bb.num_features, num_classes, **head))
