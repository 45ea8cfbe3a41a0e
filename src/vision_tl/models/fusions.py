"""Fusion registry: how an ensemble turns its members' pooled features into one prediction.

Adding a fusion is one decorated `nn.Module` class below. It is built with the members'
feature sizes, the class count and the `model.head` spec, and maps the list of member
features (one tensor per member) to logits; `model.fusion=<name>` selects it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vision_tl.core.registry import Registry
from vision_tl.models.heads import build_head

FUSIONS: Registry[Callable[..., nn.Module]] = Registry("fusion")
register_fusion = FUSIONS.register


@register_fusion("logits")
class LogitFusion(nn.Module):
    """Each member's linear head; the concatenated logits feed a Linear layer."""

    def __init__(self, dims: Sequence[int], num_classes: int, head: Mapping[str, Any] | None):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d, num_classes) for d in dims)
        self.fuse = nn.Linear(len(dims) * num_classes, num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        logits = [head(f) for f, head in zip(features, self.heads, strict=True)]
        return self.fuse(torch.cat(logits, dim=1))


@register_fusion("features")
class FeatureFusion(nn.Module):
    """Concatenated pooled features feed one head (by default an MLP with LayerNorm)."""

    def __init__(self, dims: Sequence[int], num_classes: int, head: Mapping[str, Any] | None):
        super().__init__()
        spec = dict(head or {"name": "mlp", "layer_norm": True, "dropout": 0.3})
        self.fuse = build_head(spec.pop("name"), sum(dims), num_classes, **spec)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.fuse(torch.cat(list(features), dim=1))


@register_fusion("mean")
class MeanFusion(nn.Module):
    """Each member's linear head; the output is the log of the mean probability, so
    cross-entropy on it is the ensemble's negative log-likelihood."""

    def __init__(self, dims: Sequence[int], num_classes: int, head: Mapping[str, Any] | None):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d, num_classes) for d in dims)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        logits = [head(f) for f, head in zip(features, self.heads, strict=True)]
        probs = torch.stack([t.softmax(dim=1) for t in logits]).mean(dim=0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def build_fusion(
    name: str, dims: Sequence[int], num_classes: int, head: Mapping[str, Any] | None = None
) -> nn.Module:
    return FUSIONS.get(name)(list(dims), num_classes, head)
