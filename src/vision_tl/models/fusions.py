"""Fusion registry: how an ensemble turns its members' pooled features into one prediction.

Adding a fusion is one decorated `nn.Module` class below. It is built with the members'
feature sizes, the class count and the `model.head` spec, and maps the list of member
features (one tensor per member) to logits; `model.fusion=<name>` selects it. A fusion may
also say what each member alone scores (`member_logits`, reported as
`val_acc_members`); `per_member` tells whether it can.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
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
        # Start as the mean of the members' logits (class c from each member's class c);
        # training then learns how much of each member, and of which classes, to take.
        with torch.no_grad():
            self.fuse.weight.copy_(torch.eye(num_classes).repeat(1, len(dims)) / len(dims))
            self.fuse.bias.zero_()

    per_member = True

    def logit_layers(self) -> list[nn.Linear]:
        """The members' heads: zeroed, the fused scores start equal for every class and the
        mean-initialised fuse still passes each head its gradient."""
        return list(self.heads)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        logits = [head(f) for f, head in zip(features, self.heads, strict=True)]
        return self.fuse(torch.cat(logits, dim=1))

    def member_logits(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each member's share of the fused logits: its head through its block of the fusing
        weights, plus the bias (the fused logits are their sum minus the extra biases)."""
        logits = [head(f) for f, head in zip(features, self.heads, strict=True)]
        blocks = self.fuse.weight.split([t.shape[1] for t in logits], dim=1)
        return [F.linear(t, w, self.fuse.bias) for t, w in zip(logits, blocks, strict=True)]


@register_fusion("features")
class FeatureFusion(nn.Module):
    """Concatenated pooled features feed one head (by default an MLP with LayerNorm)."""

    def __init__(self, dims: Sequence[int], num_classes: int, head: Mapping[str, Any] | None):
        super().__init__()
        spec = dict(head or {"name": "mlp", "layer_norm": True, "dropout": 0.3})
        self.fuse = build_head(spec.pop("name"), sum(dims), num_classes, **spec)
        # A linear head splits into per-member shares; an MLP mixes members inside.
        self.per_member = _only_linear(self.fuse) is not None

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.fuse(torch.cat(list(features), dim=1))

    def member_logits(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """With a linear head, each member's features through its block of the weights,
        plus the bias; nothing for an MLP head."""
        linear = _only_linear(self.fuse)
        if linear is None:
            return []
        blocks = linear.weight.split([f.shape[1] for f in features], dim=1)
        return [F.linear(f, w, linear.bias) for f, w in zip(features, blocks, strict=True)]


def _only_linear(head: nn.Module) -> nn.Linear | None:
    """The head's one `nn.Linear` when nothing else in it changes values at eval."""
    passive = (nn.Sequential, nn.Dropout, nn.Identity, nn.Linear)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if len(linears) == 1 and all(isinstance(m, passive) for m in head.modules()):
        return linears[0]
    return None


@register_fusion("mean")
class MeanFusion(nn.Module):
    """Each member's linear head; the output is the log of the mean probability, so
    cross-entropy on it is the ensemble's negative log-likelihood."""

    def __init__(self, dims: Sequence[int], num_classes: int, head: Mapping[str, Any] | None):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(d, num_classes) for d in dims)

    per_member = True

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        probs = torch.stack([t.softmax(dim=1) for t in self.member_logits(features)]).mean(dim=0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()

    def member_logits(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each member's own head: a classifier in its own right."""
        return [head(f) for f, head in zip(features, self.heads, strict=True)]

    def logit_layers(self) -> list[nn.Linear]:
        """Every member's head gives class scores (the default would be the last one only)."""
        return list(self.heads)


def build_fusion(
    name: str, dims: Sequence[int], num_classes: int, head: Mapping[str, Any] | None = None
) -> nn.Module:
    return FUSIONS.get(name)(list(dims), num_classes, head)
