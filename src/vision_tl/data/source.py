"""Where labelled images come from: the `Source` seam and its registry.

A source knows its catalog (the classes and the samples of each split, each sample named
by a stable key), how to open one sample as a uint8 image, and a signature of what it
holds (for caches). Everything after that (splitting, loaders, the feature cache,
training, eval) speaks of keys, never of files. A class-folder tree, a CSV manifest and
the built-in generated sets are sources; adding another is one class in one file with
`@register_source("name")` plus `conf/data/<name>.yaml` (`source: <name>` and its keys).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from vision_tl.core.errors import ConfigError
from vision_tl.core.registry import Registry
from vision_tl.data.preprocess import AnyPreprocess
from vision_tl.data.scan import BadFile, ScanReport

SPLITS = ("train", "val", "test")


@dataclass
class Catalog:
    """The samples of each split as (key, class index), with the class names in index order.

    `bad` lists what was found but will not be used, with the reason; `ignored` holds
    hidden/system files and files that are not images, never reported; `scan` is the
    pre-flight check's report when the source ran one. `groups` names the group of a key
    (a manifest's `group` column: near-copies that must stay on one side of a split);
    `views_pool` widens the samples whose augmented views a feature cache draws beyond
    the train split (cross-validation: every fold's training images, so one extraction
    serves all folds).
    """

    class_names: list[str]
    samples: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    bad: list[BadFile] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    scan: ScanReport | None = None
    groups: dict[str, str] = field(default_factory=dict)
    views_pool: list[tuple[str, int]] | None = None

    def view_samples(self) -> list[tuple[str, int]]:
        """The samples whose augmented views are drawn: `views_pool`, else the train split."""
        return self.views_pool if self.views_pool is not None else self.samples.get("train", [])

    def class_counts(self, split: str = "train") -> list[int]:
        counts = [0] * len(self.class_names)
        for _, label in self.samples.get(split, []):
            counts[label] += 1
        return counts

    def all_keys(self) -> list[str]:
        """Every key of every split, sorted: what a cache over this catalog covers."""
        return sorted({key for split in self.samples.values() for key, _ in split})

    def to_frame(self) -> Any:
        import pandas as pd

        rows = [
            (key, self.class_names[label], split)
            for split in SPLITS
            for key, label in self.samples.get(split, [])
        ]
        return pd.DataFrame(rows, columns=["path", "label", "split"])

    def with_val(self, val_fraction: float, seed: int) -> Catalog:
        """This catalog, with a stratified val split drawn from train when it has none."""
        if self.samples.get("val"):
            return self
        per_class: dict[str, list[str]] = {}
        for key, label in self.samples.get("train", []):
            per_class.setdefault(self.class_names[label], []).append(key)
        train, val = stratified_split(per_class, val_fraction, seed)
        index = {name: i for i, name in enumerate(self.class_names)}
        samples = dict(self.samples)
        for split, classes in (("train", train), ("val", val)):
            samples[split] = [(k, index[c]) for c in sorted(classes) for k in classes[c]]
        return dataclasses.replace(self, samples=samples)


def stratified_split(
    per_class: dict[str, list[str]], val_fraction: float, seed: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Split each class separately, so val has the same class mix as train.

    Each class keeps at least one training image; classes with 2+ images give val at
    least one. The result depends only on the keys, `val_fraction` and `seed`.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={val_fraction}: a number > 0 and < 1")
    train, val = {}, {}
    for name, keys in per_class.items():
        keys = sorted(keys)
        random.Random(f"{seed}:{name}").shuffle(keys)
        n_val = min(len(keys) - 1, max(1, round(len(keys) * val_fraction)))
        val[name], train[name] = sorted(keys[:n_val]), sorted(keys[n_val:])
    return train, val


class Source(ABC):
    """Labelled images behind one small protocol (see the module docstring).

    `iterable` sources stream their samples (no random access: no sampler, no resize
    cache); map-style sources open any key at any time.
    """

    name: ClassVar[str] = ""
    iterable: ClassVar[bool] = False

    @classmethod
    def from_config(cls, data: Mapping[str, Any], cache_root: Path) -> Source:
        """Build from the `data` config node (`cache_root`: where derived files may live)."""
        raise NotImplementedError(f"source '{cls.name}' cannot be built from a config")

    @abstractmethod
    def catalog(self) -> Catalog:
        """Classes and the samples of each split (a pre-flight check may run here)."""

    @abstractmethod
    def open(self, key: str, preprocess: AnyPreprocess) -> torch.Tensor:
        """Sample `key` as a uint8 (3, H, W) image, decoded as `preprocess` says."""

    @abstractmethod
    def signature(self, keys: Sequence[str]) -> str:
        """A digest that changes whenever the content behind `keys` may have changed."""

    def file(self, key: str) -> str | None:
        """The local file behind `key`, when there is one (resized copies, thumbnails)."""
        return None

    def describe(self) -> str:
        """Where the samples come from, for logs and one-line errors."""
        return self.name

    def name_of(self, key: str) -> str:
        """How sample `key` is named in outputs (CSVs, pages)."""
        return key

    def preprocess_defaults(self) -> dict[str, Any]:
        """Preprocessing the data itself implies (a generated set's native size)."""
        return {}

    def stream(
        self,
        split: str,
        preprocess: AnyPreprocess,
        transform: Callable[[torch.Tensor], Any],
        batch_size: int,
        workers: int,
        on_error: Callable[[str, str], None],
    ) -> Any:
        """A loader that streams `split` in the source's own order, shuffled as it goes,
        whose position a checkpoint keeps (`data.stream=true`); few sources can."""
        raise ConfigError(f"data.stream=true: {self.describe()} cannot stream; use data.shards")

    def reader(self, preprocess: AnyPreprocess) -> Reader:
        """A picklable key -> uint8 image function for loaders and their workers."""
        return Reader(self, preprocess)


@dataclass(frozen=True)
class Reader:
    """`source.open(key, preprocess)` as a one-argument callable that DataLoader workers carry."""

    source: Source
    preprocess: AnyPreprocess
    files: Mapping[str, str] | None = None  # key -> a file to read instead (resized copies)

    def __call__(self, key: str) -> torch.Tensor:
        if self.files and key in self.files:
            return self.preprocess.read(self.files[key])
        return self.source.open(key, self.preprocess)


def digest(value: Any) -> str:
    """A short, stable digest of any JSON-serialisable value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]


SOURCES: Registry[type[Source]] = Registry("data source")
SourceClass = Callable[[type[Source]], type[Source]]


def register_source(name: str) -> SourceClass:
    """Register a `Source` subclass under `name` (`data.source=<name>`)."""

    def decorator(cls: type[Source]) -> type[Source]:
        cls.name = name
        SOURCES.add(name, cls)
        return cls

    return decorator
