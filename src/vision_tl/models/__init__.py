"""Models: plain `nn.Module`s and their registries (backbones, heads, fusions), testable
without a Trainer."""

from vision_tl.models.backbones import (
    BACKBONES,
    Backbone,
    Stage,
    available_backbones,
    build_backbone,
    register_backbone,
)
from vision_tl.models.classifier import (
    Classifier,
    EnsembleClassifier,
    ImageClassifier,
    build_model,
)
from vision_tl.models.fusions import FUSIONS, build_fusion, register_fusion
from vision_tl.models.heads import HEADS, build_head, register_head

__all__ = [
    "BACKBONES",
    "FUSIONS",
    "HEADS",
    "Backbone",
    "Classifier",
    "EnsembleClassifier",
    "ImageClassifier",
    "Stage",
    "available_backbones",
    "build_backbone",
    "build_fusion",
    "build_head",
    "build_model",
    "register_backbone",
    "register_fusion",
    "register_head",
]
