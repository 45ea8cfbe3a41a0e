"""LitData shards written by `python -m vision_tl.shard` (`data.shards=DIR|s3://...`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
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


def key_width(count: int) -> int:
    """The digits of the last index of a split of `count` samples (`shard_key`'s width)."""
    return len(str(max(count - 1, 0)))


def shard_key(split: str, index: int, width: int) -> str:
    """`<split>/<i>`, `i` zero-padded to the split's `key_width`: keys sort in catalog
    order, as the folder's paths they were written from do, so whatever sorts keys (the
    views' seeds, the search's rows) sees the samples in the same order from shards as
    from the folder."""
    return f"{split}/{index:0{width}d}"


class ShardSamples(Sequence[tuple[str, int]]):
    """The (key, label) pairs of one split in catalog order, made on demand from a label
    array: no Python object per sample is kept, whatever the split's size. Keys are
    `shard_key`s (`i`: the place in the catalog; the index CSV says where it is stored)."""

    def __init__(self, split: str, labels: np.ndarray) -> None:
        self.split = split
        self.labels = labels
        self.width = key_width(len(labels))

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
        return shard_key(self.split, index, self.width), int(self.labels[index])

    def __iter__(self) -> Iterator[tuple[str, int]]:
        for index, label in enumerate(self.labels.tolist()):
            yield shard_key(self.split, index, self.width), label


@dataclass(frozen=True)
class StreamItem:
    """A streamed sample (LitData's dict) as a transformed uint8 image and its label; a
    sample that will not decode is reported to `on_error` and dropped (None)."""

    split: str
    width: int  # the split's `key_width`
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
            key = shard_key(self.split, int(sample.get("index", -1)), self.width)
            self.on_error(key, f"failed during training ({error_line(err)})")
            return None


# The chunk layout `python -m vision_tl.shard` writes, the only one `LocalChunks` reads.
CHUNK_FORMAT = {"data_format": ["bytes", "int", "int"], "compression": None, "encryption": None}


class LocalChunks:
    """Samples of a local split read from its LitData chunk files by index, one `pread`
    each. LitData's own reads by index are slow in random order: it keeps at most 4
    chunks mapped and, remapping another on nearly every read, gets 790 reads/s at 1M
    samples; keeping every chunk mapped instead reaches 20,000/s but grows the
    resident memory with every page the reads fault in (+500 MB for 20,000 reads).

    A chunk file is `uint32 n`, `uint32 offsets[n + 1]`, then the rows; a row is one
    `uint32` size per field, then the fields (image bytes, label, index). A split of any
    other layout is left to LitData (`open` returns None); tests/test_shards.py checks
    every row against LitData's reads.
    """

    def __init__(self, directory: Path, files: list[str], sizes: list[int]) -> None:
        self.directory = directory
        self.files = files
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._fds: dict[int, int] = {}
        self._offsets: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    @classmethod
    def open(cls, directory: Path) -> LocalChunks | None:
        index = json.loads((directory / "index.json").read_text())
        config = index.get("config", {})
        if any(config.get(k) != v for k, v in CHUNK_FORMAT.items()):
            return None
        chunks = index["chunks"]
        return cls(directory, [c["filename"] for c in chunks], [c["chunk_size"] for c in chunks])

    def __getstate__(self) -> dict[str, Any]:  # each process opens its own files
        return {**self.__dict__, "_fds": {}, "_offsets": {}}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _chunk(self, chunk: int) -> tuple[int, np.ndarray]:
        if self._pid != os.getpid():
            self._fds, self._offsets, self._pid = {}, {}, os.getpid()
        if chunk not in self._fds:
            path = self.directory / self.files[chunk]
            count = int(self.starts[chunk + 1] - self.starts[chunk])
            self._offsets[chunk] = np.fromfile(path, "<u4", count + 1, offset=4)
            self._fds[chunk] = os.open(path, os.O_RDONLY)
        return self._fds[chunk], self._offsets[chunk]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        chunk = int(np.searchsorted(self.starts, index, side="right")) - 1
        fd, offsets = self._chunk(chunk)
        row = int(index - self.starts[chunk])
        start, end = int(offsets[row]), int(offsets[row + 1])
        data = os.pread(fd, end - start, start)
        image, label, position = struct.unpack_from("<3I", data)
        fields = memoryview(data)[12:]
        return {
            "image": fields[:image],
            "label": int.from_bytes(fields[image : image + label], "little", signed=True),
            "index": int.from_bytes(fields[image + label :][:position], "little", signed=True),
        }

    def __del__(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)


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
        """What reads the split's samples by index, opened once per process: a local set's
        chunk files directly (`LocalChunks`), else LitData's dataset (a remote set's chunks
        are downloaded on first touch). LitData's reads deserialize each row alone
        (`batch_decode=0`): its default for byte fields decodes a window of 256 rows per
        read, 24x slower in random order."""
        if split not in self._datasets:
            location = join(self.location, split)
            cache = self._chunk_cache(split)
            reader = None if cache else LocalChunks.open(Path(location))
            if reader is None:
                ld = litdata()
                reader = ld.StreamingDataset(location, cache_dir=cache, batch_decode=0)
            self._datasets[split] = reader
        return self._datasets[split]

    def open(self, key: str, preprocess: AnyPreprocess) -> torch.Tensor:
        split, _, index = key.rpartition("/")
        if split not in self._positions:
            self._positions[split] = self._arrays(split)[1]
        image = self.dataset(split)[int(self._positions[split][int(index)])]["image"]
        if not len(image):
            raise ValueError("stored empty: it could not be read when the shards were written")
        return preprocess.read(io.BytesIO(bytes(image)), self.limits)

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
        width = key_width(int(self.meta["counts"][split]))
        item = StreamItem(split, width, preprocess, transform, self.limits, on_error)
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
