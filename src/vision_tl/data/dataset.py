"""A dataset over (key, label) pairs, opened by a source's reader, that survives broken files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from vision_tl.data.decode import error_line


class ImageListDataset(Dataset):
    """Samples listed by key with integer labels, as uint8 tensors after `transform`.

    `reader` opens a key (`Source.reader`: the source's decode, with the run's
    preprocessing). With `on_error`, a sample that fails to open is reported through it
    and the item is `None` (dropped by `collate_skipping_none`) instead of stopping the run.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        reader: Callable[[str], torch.Tensor],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        on_error: Callable[[str, str], None] | None = None,
    ) -> None:
        # A sequence stays as it is: a shard split's pairs are made on demand, and a list
        # of a million tuples would be copied into every loader worker.
        self.samples = samples if isinstance(samples, Sequence) else list(samples)
        self.reader = reader
        self.transform = transform
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> torch.Tensor:
        """The decoded image `index`, before `transform`; raises if the file cannot be read."""
        return self.reader(self.samples[index][0])

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
