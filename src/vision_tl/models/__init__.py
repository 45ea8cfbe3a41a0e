"""Models: backbone and head registries, classifiers, ensembles and fine-tuning modes."""

from vision_tl.models.backbones import (
    BACKBONES,
    Backbone,
    available_backbones,
    build_backbone,
    register_backbone,
)
from vision_tl.models.classifier import (
    FUSIONS,
    Classifier,
    EnsembleClassifier,
    ImageClassifier,
    build_model,
)
from vision_tl.models.finetune import Finetune, apply_finetune, freeze, unfreeze
from vision_tl.models.heads import HEADS, build_head, register_head
from vision_tl.models.preprocess import Preprocess

__all__ = [
    "BACKBONES",
    "FUSIONS",
    "HEADS",
    "Backbone",
    "Classifier",
    "EnsembleClassifier",
    "Finetune",
    "ImageClassifier",
    "Preprocess",
    "apply_finetune",
    "available_backbones",
    "build_backbone",
    "build_head",
    "build_model",
    "freeze",
    "register_backbone",
    "register_head",
    "unfreeze",
]
