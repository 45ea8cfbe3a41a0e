"""A dataset over (path, label) pairs, decoded by `Preprocess.read`, that survives broken files."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from vision_tl.data.decode import error_line
from vision_tl.data.preprocess import AnyPreprocess


class ImageListDataset(Dataset):
    """Images listed by path with integer labels, as uint8 tensors after `transform`.

    Decoding follows `preprocess` (background, draft mode); `sources` maps a listed path
    to the file actually read (a resized copy). With `on_error`, a file that fails to
    decode is reported through it and the item is `None` (dropped by
    `collate_skipping_none`) instead of stopping the run.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        preprocess: AnyPreprocess,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sources: Mapping[str, str] | None = None,
        on_error: Callable[[str, str], None] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.preprocess = preprocess
        self.transform = transform
        self.sources = sources or {}
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> torch.Tensor:
        """The decoded image `index`, before `transform`; raises if the file cannot be read."""
        path = self.samples[index][0]
        return self.preprocess.read(self.sources.get(path, path))

    def load(self, index: int) -> torch.Tensor:
        """The decoded, transformed image `index`; raises if the file cannot be read."""
        image = self.read(index)
        return self.transform(image) if self.transform else image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        try:
            return self.load(index), self.samples[index][1]
        except Exception as err:
            if self.on_error is None:
                raise
            self.on_error(self.samples[index][0], f"failed during training ({error_line(err)})")
            return None


def collate_skipping_none(batch: list[Any]) -> Any:
    """Collate the items that loaded; a batch whose every file failed is empty."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return default_collate(kept)
