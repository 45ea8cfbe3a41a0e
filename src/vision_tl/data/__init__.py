"""Data: image folders, splits, transforms from the backbone, built-in datasets."""

from vision_tl.data.builtin import DATASETS, BuiltinDataset, builtin_dataset
from vision_tl.data.datamodule import ImageFolderDataModule
from vision_tl.data.dataset import ImageListDataset
from vision_tl.data.folder import SplitSamples, scan_root, stratified_split
from vision_tl.data.images import load_rgb, to_rgb
from vision_tl.data.transforms import AUGMENTATIONS, eval_transform, train_transform

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "BuiltinDataset",
    "ImageFolderDataModule",
    "ImageListDataset",
    "SplitSamples",
    "builtin_dataset",
    "eval_transform",
    "load_rgb",
    "scan_root",
    "stratified_split",
    "to_rgb",
    "train_transform",
]
