"""Models: plain `nn.Module`s and their registries (backbones, heads, fusions), testable
without a Trainer.

The names below are loaded on first use, so importing a light submodule (the config rules)
does not pull in timm and torchvision's model zoo.
"""

from __future__ import annotations

from vision_tl.core.lazy import lazy_exports

_EXPORTS = {
    "BACKBONES": "backbones",
    "Backbone": "backbones",
    "Stage": "backbones",
    "available_backbones": "backbones",
    "build_backbone": "backbones",
    "register_backbone": "backbones",
    "Classifier": "classifier",
    "EnsembleClassifier": "classifier",
    "ImageClassifier": "classifier",
    "build_model": "classifier",
    "FUSIONS": "fusions",
    "build_fusion": "fusions",
    "register_fusion": "fusions",
    "HEADS": "heads",
    "build_head": "heads",
    "register_head": "heads",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
