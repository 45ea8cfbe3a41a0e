"""A dataset over (path, label) pairs, decoded to RGB."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from vision_tl.data.images import load_rgb


class ImageListDataset(Dataset):
    """Images listed by path with integer labels; `transform` turns RGB PIL into a tensor."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable | None = None,
        background: tuple[int, int, int] = (255, 255, 255),
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.background = background

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = load_rgb(path, self.background)
        return (self.transform(image) if self.transform else image), label
