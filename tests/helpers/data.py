"""DataModules for tests, built the way every command builds them (`training.build`)."""

from __future__ import annotations

from typing import Any

from vision_tl.data import ImageDataModule, Preprocess
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
