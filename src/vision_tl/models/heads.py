"""Head registry: feature vector -> class logits. Add a head with one decorated function."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from vision_tl.core.registry import Registry

HeadBuilder = Callable[..., nn.Module]
HEADS: Registry[HeadBuilder] = Registry("head")
register_head = HEADS.register


@register_head("linear")
def linear(in_features: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    """A single Linear layer (optionally after Dropout): the linear-probe head."""
    layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(*layers, nn.Linear(in_features, num_classes))


@register_head("mlp")
def mlp(
    in_features: int,
    num_classes: int,
    hidden: Sequence[int] = (512,),
    dropout: float = 0.5,
    layer_norm: bool = False,
) -> nn.Module:
    """Linear -> [LayerNorm] -> ReLU -> Dropout per hidden size, then Linear to the classes.

    `layer_norm` also normalises the input, which matters when it concatenates
    features of different scales (ensemble feature fusion).
    """
    layers: list[nn.Module] = [nn.LayerNorm(in_features)] if layer_norm else []
    width = in_features
    for size in hidden:
        layers.append(nn.Linear(width, int(size)))
        if layer_norm:
            layers.append(nn.LayerNorm(int(size)))
        layers += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = int(size)
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def build_head(name: str, in_features: int, num_classes: int, **kwargs) -> nn.Module:
    return HEADS.get(name)(in_features, num_classes, **kwargs)
