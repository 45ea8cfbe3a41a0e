"""A dataset over (path, label) pairs, decoded to RGB, that survives files breaking mid-run."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from vision_tl.data.images import error_line, load_image, load_rgb


def available_cpus() -> int:
    """CPU cores this process may use (a container's cpuset, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class ImageListDataset(Dataset):
    """Images listed by path with integer labels; `transform` turns the decoded image (RGB
    PIL, or a uint8 CHW tensor for plain JPEGs, see `load_image`) into a tensor.

    `min_side` lets large JPEGs decode at reduced size (see `load_rgb`); `sources` maps a
    listed path to the file actually read (a resized copy). With `on_error`, a file that
    fails to decode is reported through it and the item is `None` (dropped by
    `collate_skipping_none`) instead of stopping the run.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable | None = None,
        background: tuple[int, int, int] = (255, 255, 255),
        min_side: int | None = None,
        sources: Mapping[str, str] | None = None,
        on_error: Callable[[str, str], None] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.background = background
        self.min_side = min_side
        self.sources = sources or {}
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, path: str) -> Any:
        source = self.sources.get(path, path)
        if self.transform is None:
            return load_rgb(source, self.background, self.min_side)
        return load_image(source, self.background, self.min_side)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        path, label = self.samples[index]
        try:
            image = self._load(path)
            return (self.transform(image) if self.transform else image), label
        except Exception as err:
            if self.on_error is None:
                raise
            self.on_error(path, f"failed during training ({error_line(err)})")
            return None


def collate_skipping_none(batch: list[Any]) -> Any:
    """Collate the items that loaded; a batch whose every file failed is empty."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return default_collate(kept)
