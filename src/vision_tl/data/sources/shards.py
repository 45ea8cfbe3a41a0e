"""LitData shards written by `python -m vision_tl.shard` (`data.shards=DIR|s3://...`)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch

from vision_tl.core.errors import ConfigError
from vision_tl.data.dataset import collate_skipping_none
from vision_tl.data.decode import ReadLimits, error_line
from vision_tl.data.preprocess import AnyPreprocess
from vision_tl.data.scan import BadFile
from vision_tl.data.shards import Place, is_remote, join, litdata, read_meta
from vision_tl.data.source import Catalog, Source, digest, register_source


class ShardSamples(Sequence[tuple[str, int]]):
    """The (key, label) pairs of one split in catalog order, made on demand from a label
    array: no Python object per sample is kept, whatever the split's size. Keys are
    `<split>/<i>` (`i`: the place in the catalog; the index CSV says where it is stored)."""

    def __init__(self, split: str, labels: np.ndarray) -> None:
        self.split = split
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    @overload
    def __getitem__(self, index: int) -> tuple[str, int]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[str, int]]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return f"{self.split}/{index}", int(self.labels[index])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        for index, label in enumerate(self.labels.tolist()):
            yield f"{self.split}/{index}", label


@dataclass(frozen=True)
class StreamItem:
    """A streamed sample (LitData's dict) as a transformed uint8 image and its label; a
    sample that will not decode is reported to `on_error` and dropped (None)."""

    split: str
    preprocess: AnyPreprocess
    transform: Callable[[torch.Tensor], Any]
    limits: ReadLimits
    on_error: Callable[[str, str], None]

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, int] | None:
        try:
            if not len(sample["image"]):
                raise ValueError("stored empty: unreadable when the shards were written")
            image = self.preprocess.read(io.BytesIO(bytes(sample["image"])), self.limits)
            return self.transform(image), int(sample["label"])
        except Exception as err:
            key = f"{self.split}/{sample.get('index')}"
            self.on_error(key, f"failed during training ({error_line(err)})")
            return None


@register_source("shards")
class ShardSource(Source):
    """A shard set: no scan (it ran when the shards were written), classes and counts from
    `meta.json`, each sample read from its split's LitData dataset by index (a remote
    set's chunks are downloaded once, on first touch, into `cache_root/shards/`)."""

    def __init__(self, location: str, cache_root: Path, limits: ReadLimits | None = None) -> None:
        self.location = str(location).rstrip("/")
        self.cache_root = cache_root
        self.limits = limits or ReadLimits()
        self.meta = read_meta(self.location)
        self._datasets: dict[str, Any] = {}
        self._names: dict[str, list[str]] = {}
        self._positions: dict[str, np.ndarray] = {}

    @classmethod
    def from_config(cls, data: Mapping[str, Any], cache_root: Path) -> ShardSource:
        if not data.get("shards"):
            raise ConfigError("data.source=shards needs data.shards=DIR or s3://BUCKET/PREFIX")
        location = str(data["shards"])
        if not is_remote(location):
            location = str(Path(location).expanduser().absolute())
        return cls(location, cache_root, ReadLimits.from_config(data))

    def __getstate__(self) -> dict[str, Any]:  # loader workers open their own datasets
        return {**self.__dict__, "_datasets": {}, "_names": {}}

    def _index(self, split: str, suffix: str = "npz") -> bytes:
        """The split's index: `npz` (labels and positions, what a run reads) or `csv`
        (with the source paths, read only to name samples in outputs)."""
        data = Place(self.location).read(f"index/{split}.{suffix}")
        if data is None:
            raise ConfigError(f"data.shards={self.location}: index/{split}.{suffix} is missing")
        return data

    def _arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        with np.load(io.BytesIO(self._index(split))) as arrays:
            return arrays["label"], arrays["position"]

    def catalog(self) -> Catalog:
        samples: dict[str, Sequence[tuple[str, int]]] = {}
        for split in self.meta["counts"]:
            labels, self._positions[split] = self._arrays(split)
            samples[split] = ShardSamples(split, labels)
        bad_csv = Place(self.location).read("bad_files.csv")
        bad = []
        if bad_csv:
            import pandas as pd

            frame = pd.read_csv(io.BytesIO(bad_csv), keep_default_na=False)
            bad = [
                BadFile(str(p), str(r)) for p, r in zip(frame["path"], frame["reason"], strict=True)
            ]
        return Catalog(list(self.meta["classes"]), samples, bad=bad)  # type: ignore[arg-type]

    def _chunk_cache(self, name: str) -> str | None:
        """Where a remote set's chunks are downloaded (None: a local set is read in place)."""
        if not is_remote(self.location):
            return None
        return str(self.cache_root / "shards" / digest(self.location) / name)

    def dataset(self, split: str) -> Any:
        """The split's LitData dataset, opened once per process."""
        if split not in self._datasets:
            cache = self._chunk_cache(split)
            dataset = litdata().StreamingDataset(join(self.location, split), cache_dir=cache)
            self._datasets[split] = dataset
        return self._datasets[split]

    def open(self, key: str, preprocess: AnyPreprocess) -> torch.Tensor:
        split, _, index = key.rpartition("/")
        if split not in self._positions:
            self._positions[split] = self._arrays(split)[1]
        sample = self.dataset(split)[int(self._positions[split][int(index)])]
        if not len(sample["image"]):
            raise ValueError("stored empty: it could not be read when the shards were written")
        return preprocess.read(io.BytesIO(bytes(sample["image"])), self.limits)

    def stream(
        self,
        split: str,
        preprocess: AnyPreprocess,
        transform: Callable[[torch.Tensor], Any],
        batch_size: int,
        workers: int,
        on_error: Callable[[str, str], None],
    ) -> Any:
        """LitData's loader over the split: chunks and their samples shuffled each epoch
        (seeded by the run), each rank and worker a disjoint equal share, its position part
        of the checkpoint (Lightning saves a stateful loader's state)."""
        ld = litdata()
        cache = self._chunk_cache(f"{split}-stream")
        item = StreamItem(split, preprocess, transform, self.limits, on_error)
        dataset = ld.StreamingDataset(
            join(self.location, split),
            cache_dir=cache,
            shuffle=True,
            drop_last=True,
            seed=int(torch.initial_seed() % 2**31),
            transform=item,
        )
        return ld.StreamingDataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate_skipping_none,
            persistent_workers=workers > 0,
        )

    def signature(self, keys: Sequence[str]) -> str:
        return digest([self.meta["fingerprint"], self.meta["decode"], digest(list(keys))])

    def describe(self) -> str:
        return f"data.shards {self.location}"

    def name_of(self, key: str) -> str:
        """The source file the sample was made from (its split's index)."""
        split, _, index = key.rpartition("/")
        if split not in self._names:
            import pandas as pd

            frame = pd.read_csv(io.BytesIO(self._index(split, "csv")), usecols=["path"])
            self._names[split] = frame["path"].astype(str).tolist()
        return self._names[split][int(index)]
