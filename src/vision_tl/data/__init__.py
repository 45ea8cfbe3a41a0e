"""Data: image folders and manifests, file checks, splits, transforms from the backbone,
built-in datasets."""

from vision_tl.data.builtin import DATASETS, BuiltinDataset, builtin_dataset
from vision_tl.data.datamodule import ImageFolderDataModule
from vision_tl.data.dataset import ImageListDataset, collate_skipping_none
from vision_tl.data.folder import SplitSamples, read_manifest, scan_root, stratified_split
from vision_tl.data.images import load_image, load_rgb, to_rgb
from vision_tl.data.scan import BadFile, ImageScanner, check_image
from vision_tl.data.transforms import (
    AUGMENTATIONS,
    eval_transform,
    normalize_batch,
    train_transform,
)

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "BadFile",
    "BuiltinDataset",
    "ImageFolderDataModule",
    "ImageListDataset",
    "ImageScanner",
    "SplitSamples",
    "builtin_dataset",
    "check_image",
    "collate_skipping_none",
    "eval_transform",
    "load_image",
    "load_rgb",
    "normalize_batch",
    "read_manifest",
    "scan_root",
    "stratified_split",
    "to_rgb",
    "train_transform",
]
