"""LightningDataModule for image folders: split, preprocess from the backbone, augment."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from torch.utils.data import DataLoader

from vision_tl.config import cache_dir
from vision_tl.data.builtin import DATASETS
from vision_tl.data.dataset import ImageListDataset
from vision_tl.data.folder import SplitSamples, scan_root
from vision_tl.data.transforms import check_augment, eval_transform, train_transform
from vision_tl.errors import ConfigError
from vision_tl.models.preprocess import Preprocess

log = logging.getLogger(__name__)


class ImageFolderDataModule(L.LightningDataModule):
    """Images in class subfolders under `root` (or a built-in dataset when `root` is None).

    Preprocessing comes from the model (`set_preprocess`); `image_size`, `resize_size`,
    `interpolation`, `mean` and `std` override it when set.
    """

    def __init__(
        self,
        root: str | None = None,
        builtin: str = "shapes",
        cache: str | None = None,
        val_fraction: float = 0.2,
        seed: int = 42,
        batch_size: int = 32,
        num_workers: int | None = None,
        image_size: int | None = None,
        resize_size: int | None = None,
        interpolation: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: str = "flip_crop",
        crop_scale: Sequence[float] = (0.08, 1.0),
        background: Sequence[int] = (255, 255, 255),
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        self.root = root
        self.builtin = builtin
        self.cache = cache
        self.val_fraction = val_fraction
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
        self.overrides = {
            "image_size": image_size,
            "resize_size": resize_size,
            "interpolation": interpolation,
            "mean": None if mean is None else tuple(mean),
            "std": None if std is None else tuple(std),
        }
        if root is None and image_size is None:
            self.overrides["image_size"] = DATASETS.get(builtin).image_size
        self.augment = check_augment(augment)
        self.crop_scale = tuple(crop_scale)
        self.background = tuple(int(v) for v in background)
        self.preprocess: Preprocess | None = None
        self.split: SplitSamples | None = None

    @property
    def data_root(self) -> Path:
        """The folder actually read: `root`, or the built-in dataset's cache folder."""
        if self.root is not None:
            return Path(self.root).expanduser()
        return DATASETS.get(self.builtin).materialize(self.cache or cache_dir())

    def prepare_data(self) -> None:
        self.data_root  # noqa: B018 - generates the built-in dataset once, on one process

    def setup(self, stage: str | None = None) -> None:
        if self.split is None:
            self.split = scan_root(self.data_root, self.val_fraction, self.seed)
            counts = self.split.class_counts("train")
            log.info(
                "Data: %d classes, %s images (train/val/test) from %s",
                len(self.class_names),
                "/".join(str(len(self.split.samples.get(s, []))) for s in ("train", "val", "test")),
                self.data_root,
            )
            log.debug(
                "Train images per class: %s", dict(zip(self.class_names, counts, strict=True))
            )

    @property
    def class_names(self) -> list[str]:
        if self.split is None:
            self.setup()
        return self.split.class_names

    @property
    def has_test(self) -> bool:
        return bool(self.split and self.split.samples.get("test"))

    def class_counts(self) -> list[int]:
        return self.split.class_counts("train")

    def split_frame(self) -> pd.DataFrame:
        """Every image with its label and split: what this run trains and validates on."""
        return self.split.to_frame()

    def set_preprocess(self, preprocess: Preprocess) -> Preprocess:
        """Take the model's preprocessing, apply this module's overrides, and return it."""
        self.preprocess = preprocess.with_overrides(**self.overrides)
        return self.preprocess

    def _loader(self, split: str, train: bool) -> DataLoader:
        if self.preprocess is None:
            raise RuntimeError("call set_preprocess(model.preprocess) before creating loaders")
        transform = (
            train_transform(self.preprocess, self.augment, self.crop_scale)
            if train
            else eval_transform(self.preprocess)
        )
        dataset = ImageListDataset(self.split.samples[split], transform, self.background)
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=4)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
