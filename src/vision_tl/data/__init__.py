"""Data: image folders and manifests, file checks, splits, the one decode path, preprocessing,
augmentation presets, the feature store and the datamodule."""

from vision_tl.data.augment import (
    AUGMENTATIONS,
    eval_transform,
    normalize_batch,
    register_augment,
    train_transform,
)
from vision_tl.data.builtin import DATASETS, BuiltinDataset, builtin_dataset
from vision_tl.data.datamodule import ImageFolderDataModule
from vision_tl.data.dataset import ImageListDataset, collate_skipping_none
from vision_tl.data.decode import decode, load_rgb, to_rgb
from vision_tl.data.folder import SplitSamples, read_manifest, scan_root, stratified_split
from vision_tl.data.preprocess import Preprocess
from vision_tl.data.scan import BadFile, ImageScanner, check_image

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "BadFile",
    "BuiltinDataset",
    "ImageFolderDataModule",
    "ImageListDataset",
    "ImageScanner",
    "Preprocess",
    "SplitSamples",
    "builtin_dataset",
    "check_image",
    "collate_skipping_none",
    "decode",
    "eval_transform",
    "load_rgb",
    "normalize_batch",
    "read_manifest",
    "register_augment",
    "scan_root",
    "stratified_split",
    "to_rgb",
    "train_transform",
]
