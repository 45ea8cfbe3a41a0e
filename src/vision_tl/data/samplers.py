"""Training samplers: plain shuffling, class-balanced sampling, one cached view per epoch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import RandomSampler, Sampler, WeightedRandomSampler

SAMPLERS = ("shuffle", "weighted")


def train_sampler(kind: str, labels: Sequence[int], num_classes: int) -> Sampler[int]:
    """`shuffle` draws each image once per epoch; `weighted` draws every class equally often."""
    if kind == "weighted":
        targets = torch.as_tensor(labels)
        counts = torch.bincount(targets, minlength=num_classes)
        weights = 1.0 / counts.clamp_min(1).double()[targets]
        return WeightedRandomSampler(weights, num_samples=len(labels), replacement=True)
    if kind == "shuffle":
        return RandomSampler(range(len(labels)))
    raise ValueError(
        f"sampler {kind!r} is not one of {SAMPLERS} (data/rules.py checks data.sampler)"
    )


class ViewSampler(Sampler[int]):
    """Wrap a sampler over samples: each epoch, each sample gets a random cached view.

    Index `v * num_samples + i` is sample `i` in view `v` (see `FeatureDataset`).
    """

    def __init__(self, base: Sampler[int], num_samples: int, views: int) -> None:
        self.base = base
        self.num_samples = num_samples
        self.views = views

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        indices = list(self.base)
        views = torch.randint(self.views, (len(indices),)).tolist()
        return iter(v * self.num_samples + i for i, v in zip(indices, views, strict=True))
