"""Data: sources (the `Source` seam: class folders, manifests, built-in sets), file checks,
splits, the one decode path, preprocessing, augmentation presets, the feature store and the
datamodule.

The names below are loaded on first use, so `vision_tl.data.preprocess` (which every model
imports) does not pull in Lightning and pandas with the datamodule.
"""

from __future__ import annotations

from vision_tl.core.lazy import lazy_exports

_EXPORTS = {
    "AUGMENTATIONS": "augment",
    "eval_transform": "augment",
    "normalize_batch": "augment",
    "register_augment": "augment",
    "train_transform": "augment",
    "DATASETS": "builtin",
    "BuiltinDataset": "builtin",
    "builtin_dataset": "builtin",
    "DataSettings": "datamodule",
    "ImageDataModule": "datamodule",
    "ImageListDataset": "dataset",
    "collate_skipping_none": "dataset",
    "load_rgb": "decode",
    "to_rgb": "decode",
    "file_catalog": "folder",
    "read_manifest": "folder",
    "scan_root": "folder",
    "Catalog": "source",
    "SOURCES": "source",
    "Source": "source",
    "register_source": "source",
    "stratified_split": "source",
    "Preprocess": "preprocess",
    "BadFile": "scan",
    "ImageScanner": "scan",
    "check_image": "scan",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
