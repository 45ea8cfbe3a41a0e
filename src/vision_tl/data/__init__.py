"""Data: image folders and manifests, file checks, splits, the one decode path, preprocessing,
augmentation presets, the feature store and the datamodule.

The names below are loaded on first use, so `vision_tl.data.preprocess` (which every model
imports) does not pull in Lightning and pandas with the datamodule.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AUGMENTATIONS": "augment",
    "eval_transform": "augment",
    "normalize_batch": "augment",
    "register_augment": "augment",
    "train_transform": "augment",
    "DATASETS": "builtin",
    "BuiltinDataset": "builtin",
    "builtin_dataset": "builtin",
    "ImageFolderDataModule": "datamodule",
    "ImageListDataset": "dataset",
    "collate_skipping_none": "dataset",
    "load_rgb": "decode",
    "to_rgb": "decode",
    "SplitSamples": "folder",
    "read_manifest": "folder",
    "scan_root": "folder",
    "stratified_split": "folder",
    "Preprocess": "preprocess",
    "BadFile": "scan",
    "ImageScanner": "scan",
    "check_image": "scan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vision_tl.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vision_tl.data.{module}"), name)
