"""DataModules for tests, built the way every command builds them (`training.build`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from vision_tl.data import ImageDataModule, Preprocess
from vision_tl.data.features import CachedFeatures, build_features
from vision_tl.data.preprocess import AnyPreprocess
from vision_tl.training.build import build_data, preprocess_overrides


def datamodule(
    base: AnyPreprocess | None = None, preprocess: AnyPreprocess | None = None, **data: Any
) -> ImageDataModule:
    """A DataModule over the `data.*` keys given (as in conf/data: root, batch_size, ...):
    `preprocess` as given, else `base` (a model's own; default `Preprocess()`) resolved
    once with the data's overrides, as `build_run` resolves it against the model's."""
    built = build_data(data)
    if preprocess is None:
        base = base or Preprocess()
        preprocess = base.resolve(preprocess_overrides(data, built.source))
    return built.datamodule(preprocess)


def eval_features(root: Path, model: nn.Module, cache: Path, **data: Any) -> CachedFeatures:
    """The feature cache's eval-transform entry of a folder (32 px, no augmentation, in this
    process), built as a fit builds it; `data` adds or overrides `data.*` keys."""
    keys = {
        "root": str(root),
        "num_workers": 0,
        "image_size": 32,
        "augment": "none",
        "cache": str(cache),
        **data,
    }
    built = build_data(keys)
    dm = built.datamodule(model.preprocess.resolve(preprocess_overrides(keys, built.source)))
    return build_features(built.feature_spec, dm, model, torch.device("cpu"))
