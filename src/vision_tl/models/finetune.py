"""Which parts of a classifier train: linear probe, partial, gradual or full fine-tuning."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vision_tl.errors import ConfigError
from vision_tl.models.classifier import Classifier

MODES = ("full", "linear_probe", "partial", "gradual")


@dataclass(frozen=True)
class Finetune:
    """`partial` trains the last `trainable_stages` stages of each backbone; `gradual`
    starts as a linear probe and unfreezes the whole backbone at `unfreeze_epoch`.
    Backbone parameters train at `backbone_lr_mult` times the head's learning rate."""

    mode: str = "full"
    trainable_stages: int = 1
    unfreeze_epoch: int = 1
    backbone_lr_mult: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown finetune mode '{self.mode}'; available: {', '.join(MODES)}")
        if self.trainable_stages < 0 or self.unfreeze_epoch < 0 or self.backbone_lr_mult < 0:
            raise ConfigError("finetune values must be >= 0")


def freeze(module: nn.Module) -> None:
    """Stop gradients and keep the module in eval mode (BatchNorm stats, Dropout)."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.frozen = True
    module.eval()


def unfreeze(module: nn.Module) -> None:
    for m in module.modules():
        m.frozen = False
    for p in module.parameters():
        p.requires_grad_(True)


def apply_finetune(model: Classifier, finetune: Finetune, initial: bool = True) -> None:
    """Set trainable parts for the start of training (or, with `initial=False`, after
    the gradual unfreeze)."""
    for backbone in model.backbones():
        unfreeze(backbone)
        if finetune.mode == "full" or (finetune.mode == "gradual" and not initial):
            continue
        if finetune.mode in ("linear_probe", "gradual"):
            freeze(backbone)
            continue
        stages = [s for s in backbone.stages if any(True for _ in s.parameters())]
        split = max(0, len(stages) - finetune.trainable_stages)
        for stage in stages[:split]:
            freeze(stage)
        # Parameters outside every listed stage train only if they sit in a trainable one.
        trainable = {id(p) for s in stages[split:] for p in s.parameters()}
        for p in backbone.parameters():
            p.requires_grad_(id(p) in trainable)
    model.train(model.training)
