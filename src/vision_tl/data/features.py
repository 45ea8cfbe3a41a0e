"""Feature cache: run a frozen backbone over the images once, then train only the head.

A linear probe spends nearly all its time decoding images and running a backbone that
never changes. Here the pooled features (concatenated over ensemble members) are
computed once, in eval mode, and written to disk as float32 rows; training and
validation then read rows, so later epochs and every job of a sweep cost only the head.

An entry is keyed by the backbones' names and a digest of their weights, the
preprocessing and decoding settings, the transform (eval, or augmentation + number of
views) and the file list with sizes and mtimes: any change makes a new entry. Entries are
written to a temporary folder and renamed, under a claim file (`core.io.claim`: no
`flock` needed), so parallel sweep jobs compute each entry once and share it. The ranks of
a multi-process job build an entry together: each extracts its share of the images into a
part of its own, and rank 0 assembles the parts (rows identical to a one-process build).
Rows are read with `pread`, never memory-mapped or loaded whole, so memory does not grow
with the number of images.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from vision_tl.core.engines import (
    Runner,
    compile_forward,
    cores_for,
    resolve_engine,
    weights_digest,
)
from vision_tl.core.errors import ConfigError
from vision_tl.core.io import claim
from vision_tl.core.launch import from_rank_zero, gathered, group_rank
from vision_tl.core.runtime import (
    feature_batch_size,
    folded_copy,
    inference_copy,
    resolve_precision,
)
from vision_tl.core.signals import stop_if_signalled
from vision_tl.data.augment import (
    Inputs,
    as_batches,
    eval_transform,
    map_inputs,
    normalize_batch,
)
from vision_tl.data.dataset import ImageListDataset
from vision_tl.data.decode import error_line
from vision_tl.data.preprocess import AnyPreprocess
from vision_tl.data.source import digest

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 2: each view seeded per image (view_seed); 3: keyed by source signature


@dataclass(frozen=True)
class FeatureSettings:
    """`data.feature_cache` (`mode`: auto caches when it can, on makes a bypass an error,
    off never caches), `data.feature_views` (augmented views per training image; 0 with a
    random preset bypasses the cache), `data.feature_precision` (the backbone's while
    extracting), `data.feature_batch_size` (None: 8 on a CPU, else max(32, the
    training batch)) and `data.feature_engine` (who runs the backbone: `core.engines`)."""

    mode: str = "auto"
    views: int = 4
    precision: str = "auto"
    batch_size: int | None = None
    engine: str = "auto"


@dataclass(frozen=True)
class FeatureSpec:
    """What decides a fit's cached features, fixed before the Trainer exists: the
    settings, the seed the augmented views are drawn from and where entries live."""

    settings: FeatureSettings
    seed: int
    cache_root: Path

    def blocker(self, augment_random: bool, augment: str) -> str | None:
        """Why this data cannot be served from cached features, or None when it can."""
        if augment_random and self.settings.views < 1:
            return f"data.augment={augment} with data.feature_views=0 augments every epoch"
        return None


@dataclass
class FeatureStore:
    """One cache entry: `views` x `len(files)` float32 rows of `dim` values in one file."""

    directory: Path
    files: list[str]
    views: int
    dim: int
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0  # what computing the entry cost

    @property
    def row_bytes(self) -> int:
        return self.dim * 4

    @property
    def data_file(self) -> Path:
        return self.directory / "features.f32"

    @classmethod
    def open(cls, directory: Path) -> FeatureStore:
        meta = json.loads((directory / "meta.json").read_text())
        return cls(
            directory,
            meta["files"],
            meta["views"],
            meta["dim"],
            meta["failed"],
            float(meta.get("seconds", 0.0)),
        )

    def index(self) -> dict[str, int]:
        """Row of each file whose features exist (failed files have none)."""
        return {path: i for i, path in enumerate(self.files) if path not in self.failed}

    def read_rows(self, rows: Sequence[int], view: int = 0) -> np.ndarray:
        """Rows of one view as a (len(rows), dim) float32 array, for whole-set analyses
        (the dataset audit) that hold every row in memory anyway."""
        count = len(self.files) * self.dim
        data = np.fromfile(self.data_file, np.float32, count, offset=view * count * 4)
        return data.reshape(len(self.files), self.dim)[np.asarray(rows, dtype=np.int64)]


class FeatureDataset(Dataset):
    """(features, label) items read from a `FeatureStore`, one `pread` per row.

    Item `v * len(self) + i` is sample `i` in view `v` (see `ViewSampler`); a plain
    index is view 0. The file descriptor opens lazily, once per process.
    """

    def __init__(
        self,
        store: FeatureStore,
        rows: Sequence[int],
        labels: Sequence[int],
        split_at: int | None = None,
    ) -> None:
        self.split_at = split_at  # rows carry a teacher's logits after this column
        self.path = str(store.data_file)
        self.row_bytes = store.row_bytes
        self.stride = len(store.files)
        self.views = store.views
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def __getitem__(self, item: int) -> tuple[Any, int]:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        view, index = divmod(int(item), len(self.rows))
        offset = (view * self.stride + int(self.rows[index])) * self.row_bytes
        data = os.pread(self._fd, self.row_bytes, offset)
        return self._item(torch.frombuffer(bytearray(data), dtype=torch.float32), index)

    def __getitems__(self, items: Sequence[int]) -> list[tuple[Any, int]]:
        """A batch of items read together (the DataLoader asks for a whole batch): one
        gather from the mapped file in row order, instead of one `pread` per row."""
        views, index = np.divmod(np.asarray(items, dtype=np.int64), len(self.rows))
        stored = views * self.stride + self.rows[index]
        order = np.argsort(stored, kind="stable")
        table = np.memmap(self.path, np.float32, "r").reshape(-1, self.row_bytes // 4)
        block = np.empty((len(stored), table.shape[1]), np.float32)
        block[order] = table[stored[order]]
        rows = torch.from_numpy(block)
        return [self._item(rows[k], int(i)) for k, i in enumerate(index)]

    def _item(self, row: torch.Tensor, index: int) -> tuple[Any, int]:
        if self.split_at is not None:  # (backbone features, teacher logits) of this view
            pair = {"features": row[: self.split_at], "teacher": row[self.split_at :]}
            return pair, int(self.labels[index])
        return row, int(self.labels[index])


def split_teacher(x: Any) -> tuple[Any, torch.Tensor | None]:
    """A batch's inputs and the teacher logits cached with them (None: not cached)."""
    if isinstance(x, dict):
        return x["features"], x["teacher"]
    return x, None


class WithTeacher(nn.Module):
    """Backbone features and a teacher's logits of the same view, side by side in one row:
    the teacher runs once per cached view, in the same pass, so the two always match."""

    def __init__(self, model: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.model, self.teacher = model, teacher

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model.features(x).float(), self.teacher(x).float()], dim=1)

    def inference_copy(self, fold: bool = True) -> WithTeacher:
        return WithTeacher(folded_copy(self.model, fold), folded_copy(self.teacher, fold))


def view_seed(seed: int, view: int, index: int) -> int:
    """The seed that draws view `view` of the `index`-th listed image in a run seeded
    `seed`: a view depends on nothing else (not the batch size, the worker count or the
    other views). 32 bits, as many as torch's CPU generator takes."""
    return int(np.random.SeedSequence([seed, view, index]).generate_state(1)[0])


class _Views(Dataset):
    """(every view of an image from one decode, index, failure reason) for extraction; a
    file that will not decode is recorded, not fatal."""

    def __init__(
        self,
        images: ImageListDataset,
        views: int,
        seed: int,
        seed_at: Sequence[int],
        first: int = 0,
    ) -> None:
        self.images = images
        self.views = views
        self.seed = seed
        self.seed_at = seed_at  # each image's index in its entry's whole list
        self.first = first  # views before it are lent by another entry

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[list[Inputs] | None, int, str]:
        try:
            image, transform = self.images.read(index), self.images.transform
            drawn = []
            for view in range(self.first, self.views):
                # Reseeds this process's generator: workers own theirs, and the main
                # process extracts inside `fork_rng`.
                torch.manual_seed(view_seed(self.seed, view, self.seed_at[index]))
                drawn.append(transform(image) if transform else image)
            return drawn, index, ""
        except Exception as err:
            return None, index, f"failed during feature extraction ({error_line(err)})"


def _collate(batch: list) -> tuple[list[Inputs], list[int], list[tuple[int, str]]]:
    """Per view, one stacked batch (or one per member: an ensemble with per-member
    preprocessing) of the images that decoded."""
    ok = [(x, i) for x, i, _ in batch if x is not None]
    failed = [(i, reason) for x, i, reason in batch if x is None]
    views = [default_collate(list(drawn)) for drawn in zip(*(x for x, _ in ok), strict=True)]
    return views, [i for _, i in ok], failed


@dataclass(frozen=True)
class Rows:
    """Where each image of an extraction lands: row `write_at[i]` of `stride` rows per
    view, its views drawn as the `seed_at[i]`-th image of its whole list (so a subset
    computed first gives exactly the rows the whole list would)."""

    write_at: Sequence[int]
    seed_at: Sequence[int]
    stride: int

    @classmethod
    def all(cls, n: int) -> Rows:
        return cls(range(n), range(n), n)


def _extract(
    model: Runner,
    images: ImageListDataset,
    preprocess: AnyPreprocess,
    views: int,
    out: Path,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    precision: str = "fp32",
    seed: int = 0,
    rows: Rows | None = None,
    filename: str = "features.f32",
    first_view: int = 0,
) -> tuple[int, dict[str, str]]:
    """Write the features `model` (a compiled `features` pass) gives every image (per
    view) to `out/<filename>`, each row at its place in the whole entry; returns (the
    feature width, 0 when no image decoded; the images that failed, with the reason).

    Each image is decoded once for all its views; view `v` of image `i` is drawn from
    `view_seed(seed, v, i)` (`i`: its place in its entry's whole list, `rows`). `images`
    yields uint8 crops (a tuple of per-member crops for an ensemble whose members need
    different preprocessing); they are normalised here, a batch at a time. The backbone
    runs on its engine in its precision; rows are stored as float32. From `first_view`
    on only (the views before it come from another entry); rows already in the file stay.
    """
    rows = rows or Rows.all(len(images))
    n = rows.stride
    failed: dict[str, str] = {}
    dim = 0
    loader = DataLoader(
        _Views(images, views, seed, rows.seed_at, first_view),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    with (
        open(out / filename, "r+b" if (out / filename).exists() else "wb") as handle,
        torch.random.fork_rng(devices=[]),
        cores_for(model),
    ):
        fd = handle.fileno()
        for batches, indices, errors in loader:
            stop_if_signalled()  # SIGTERM/SIGINT in a fit: the unfinished entry is removed
            for i, reason in errors:
                failed.setdefault(images.samples[i][0], reason)
            for view, x in enumerate(batches, start=first_view):
                with torch.inference_mode():
                    x = map_inputs(lambda t: t.to(device, non_blocking=True), x)
                    feats = model(*as_batches(normalize_batch(x, preprocess))).float().cpu()
                dim = feats.shape[1]
                for row, i in zip(feats.numpy(), indices, strict=True):
                    os.pwrite(fd, row.tobytes(), (view * n + rows.write_at[i]) * dim * 4)
    return dim, failed


def load_or_build(
    root: Path,
    spec: dict[str, Any],
    model: nn.Module,
    images: ImageListDataset,
    preprocess: AnyPreprocess,
    views: int,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    precision: str = "fp32",
    seed: int = 0,
    seed_at: Sequence[int] | None = None,
    reuse: FeatureStore | None = None,
    engine: str = "torch",
) -> tuple[FeatureStore, bool]:
    """The entry for `spec` and `seed`, computed now (the backbone on `engine` in
    `precision`, random views drawn from `seed`) if absent; returns (store, was it a hit).

    `seed_at`: each image's index in the whole list its views are drawn from (a subset's
    entry). `reuse`: an entry of some of the same images, drawn the same way, whose rows
    are copied instead of computed again (the subset a views decision extracted); when it
    holds fewer views, only the missing views of its images are computed."""
    spec = {**spec, "view_seed": seed}
    key = digest(spec)
    final = root / key
    root.mkdir(parents=True, exist_ok=True)
    if from_rank_zero((final / "meta.json").is_file):
        return FeatureStore.open(final), True
    rank, _ = group_rank()
    with contextlib.ExitStack() as held:
        if rank == 0:  # for the whole job: its other ranks follow rank 0
            held.enter_context(claim(root / f"{key}.claim"))

        def start_entry() -> str | None:  # None: another job finished it while we waited
            if (final / "meta.json").is_file():
                return None
            return tempfile.mkdtemp(prefix=f".{key}-", dir=root)

        tmp = from_rank_zero(start_entry)
        if tmp is None:
            return FeatureStore.open(final), True
        try:
            job = _Extraction(
                model, images, preprocess, views, device, batch_size, num_workers, precision,
                seed, seed_at, reuse, engine,
            )  # fmt: skip
            _build_entry(Path(tmp), final, spec, job)
        finally:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
    return FeatureStore.open(final), False


@dataclass(frozen=True)
class _Extraction:
    """What an entry is computed from (`load_or_build`'s arguments)."""

    model: nn.Module
    images: ImageListDataset
    preprocess: AnyPreprocess
    views: int
    device: torch.device
    batch_size: int
    num_workers: int
    precision: str
    seed: int = 0
    seed_at: Sequence[int] | None = None
    reuse: FeatureStore | None = None
    engine: str = "torch"


def _build_entry(tmp: Path, final: Path, spec: dict[str, Any], job: _Extraction) -> None:
    """Compute the entry into `tmp` and rename it to `final`: this rank extracts every
    `world`-th image still to do into its own part (and of the images `reuse` lends, the
    views it lacks); rank 0 then assembles the parts, adds the rows `reuse` lends, writes
    `meta.json` last and renames."""
    start = time.perf_counter()
    images, views, reuse = job.images, job.views, job.reuse
    rank, world = group_rank()
    keys = [key for key, _ in images.samples]
    reused = reuse.index() if reuse is not None else {}
    todo = [i for i, key in enumerate(keys) if key not in reused]
    lent = reuse.views if reuse is not None else views
    topup = [i for i, key in enumerate(keys) if key in reused] if lent < views else []
    seeds = job.seed_at if job.seed_at is not None else range(len(keys))
    mine, mine_topup = todo[rank::world], topup[rank::world]
    part = "features.f32" if world == 1 else f"part-{rank}.f32"
    if rank == 0:
        log.info(
            "Feature cache: computing features of %d images x %d view(s) into %s%s%s",
            len(images),
            views,
            final,
            f" ({len(reused)} of them lent {lent} view(s) by another entry)" if reused else "",
            f", {world} ranks sharing the work" if world > 1 else "",
        )

    def extract() -> tuple[int, dict[str, str]]:
        if not mine and not mine_topup:
            return 0, {}
        # An inference copy (in fp32, BatchNorms folded into their convolutions), run by
        # the engine (eager: channels_last, ~1.6x faster on CPU and tensor cores).
        fast = compile_forward(
            inference_copy(job.model, job.precision),
            job.engine,
            job.precision,
            job.device,
            "features",
        )
        dim, failed = 0, {}
        for share, first in ((mine, 0), (mine_topup, lent)):
            if not share:
                continue
            subset = (
                images
                if len(share) == len(keys)
                else ImageListDataset(
                    [images.samples[i] for i in share], images.reader, images.transform
                )
            )
            rows = Rows(share, [seeds[i] for i in share], len(keys))
            width, errors = _extract(
                fast,
                subset,
                job.preprocess,
                views,
                tmp,
                job.device,
                job.batch_size,
                job.num_workers,
                job.precision,
                job.seed,
                rows,
                part,
                first,
            )
            dim, failed = max(dim, width), {**errors, **failed}
        return dim, failed

    parts = gathered(extract)
    dim = max([reuse.dim if reuse is not None else 0, *(d for d, _ in parts)])
    if dim == 0:
        raise ConfigError("no image could be decoded for the feature cache")
    failed = {k: v for _, f in parts for k, v in f.items()}

    def finish() -> None:
        if world > 1:
            # A lent image's part holds only its missing views: `_copy_rows` fills the rest.
            shares = [sorted(todo[r::world] + topup[r::world]) for r in range(world)]
            _assemble(tmp, shares, views, len(keys), dim)
        # Every row has its place, a failed image's too (never read): a failure among the
        # last rows must not leave the file short of them.
        with open(tmp / "features.f32", "ab") as data:
            data.truncate(views * len(keys) * dim * 4)
        if reused:
            _copy_rows(reuse, reused, keys, views, tmp / "features.f32")
            wanted = set(keys)
            kept = {k: v for k, v in reuse.failed.items() if k in wanted}
            failed.update({k: v for k, v in kept.items() if k not in failed})
        meta = {
            "key": spec,
            "files": keys,
            "views": views,
            "dim": dim,
            "failed": failed,
            "seconds": round(time.perf_counter() - start, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(tmp, final)
        except OSError:  # a claim broken as stale: the other job finished first
            if not (final / "meta.json").is_file():
                raise
        log.info("Feature cache: done in %.1f s", meta["seconds"])

    from_rank_zero(finish)


def _assemble(tmp: Path, shares: list[list[int]], views: int, n: int, dim: int) -> None:
    """Copy each rank's rows (its `shares[r]`, at their places in `part-<r>.f32`) into
    `features.f32`, a block of rows at a time, removing each part once copied."""
    out = np.memmap(tmp / "features.f32", np.float32, "w+", shape=(views, n, dim))
    for rank, share in enumerate(shares):
        path = tmp / f"part-{rank}.f32"
        if not share:
            continue
        os.truncate(path, views * n * dim * 4)  # a part ends at its last row: extend it
        part = np.memmap(path, np.float32, "r", shape=(views, n, dim))
        index = np.asarray(share, dtype=np.int64)
        for begin in range(0, len(index), 65536):
            block = index[begin : begin + 65536]
            out[:, block] = part[:, block]
        del part
        path.unlink()
    out.flush()
    del out


def _copy_rows(
    source: FeatureStore, index: dict[str, int], keys: Sequence[str], views: int, out: Path
) -> None:
    """Copy `source`'s rows of the `keys` it holds into their places in `out`, an entry's
    file at its full size (its views: the first views of `out`'s, drawn the same way)."""
    if source.views > views:
        raise ValueError(f"reused entry has {source.views} views, this one {views}")
    row_bytes, n = source.row_bytes, len(keys)
    with open(source.data_file, "rb") as src, open(out, "r+b") as dst:
        for i, key in enumerate(keys):
            if key not in index:
                continue
            for view in range(source.views):
                src.seek((view * len(source.files) + index[key]) * row_bytes)
                dst.seek((view * n + i) * row_bytes)
                dst.write(src.read(row_bytes))


@dataclass
class CachedFeatures:
    """The entries a fit uses: eval-transform features of every file, and augmented
    views of the training files when augmentation is on."""

    eval_store: FeatureStore
    train_store: FeatureStore | None
    samples: dict[str, list[tuple[str, int]]]
    hits: dict[str, bool] = field(default_factory=dict)
    precision: str = "fp32"  # what the backbone ran in (`bf16`, `fp32`)
    teacher_columns: int = 0  # rows end with a distillation teacher's logits

    def dataset(self, split: str, train: bool) -> tuple[FeatureDataset, int]:
        """Features of `split` (files that failed extraction left out), and the view count."""
        store = self.train_store if train and self.train_store is not None else self.eval_store
        index = store.index()
        kept = [(index[p], label) for p, label in self.samples[split] if p in index]
        rows, labels = [r for r, _ in kept], [label for _, label in kept]
        split_at = store.dim - self.teacher_columns if self.teacher_columns else None
        return FeatureDataset(store, rows, labels, split_at), store.views

    def tensors(self, split: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row of `split` in memory, as (views x samples x dim features, labels).

        For the probe search, which trains many heads over the same rows: it holds one
        split's rows, not the whole store.
        """
        dataset, views = self.dataset(split, train)
        data = np.memmap(dataset.path, dtype=np.float32, mode="r")
        data = data.reshape(views, dataset.stride, -1)[:, dataset.rows]
        return torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(dataset.labels)

    @property
    def images_per_s(self) -> float | None:
        """Extraction throughput of these entries when they were computed (images x views)."""
        stores = [s for s in (self.eval_store, self.train_store) if s is not None]
        seconds = sum(s.seconds for s in stores)
        return sum(len(s.files) * s.views for s in stores) / seconds if seconds > 0 else None

    @property
    def seconds_built(self) -> float:
        """Seconds this fit spent computing features (0 when every entry was reused)."""
        stores = {"eval": self.eval_store, "train": self.train_store}
        return sum(s.seconds for k, s in stores.items() if s is not None and not self.hits.get(k))


def build_features(
    spec: FeatureSpec,
    dm: Any,
    model: nn.Module,
    device: torch.device,
    teacher: nn.Module | None = None,
    views: str | Sequence[str] = "all",
    reuse: FeatureStore | None = None,
    subset_views: int | None = None,
) -> CachedFeatures:
    """Load or compute the cached features of `dm`'s catalog (an `ImageDataModule`: its
    source, reader, preprocessing, augmentation and loading settings) from `model.features`.

    Whether features may be cached at all is decided elsewhere, once (the `FeatureCache`
    callback). With a random augmentation, `views` says which training images get their
    augmented views: `all`, `none`, or the keys of a subset (a views decision's), drawn
    exactly as the whole split's would be, the subset's first `subset_views` of them (all
    when None); `reuse` (such a subset's store, of as many views or fewer) lends its rows
    to the entry being built, which computes only what it lacks. With a distillation
    `teacher` (a module taking the same normalised views), each row also holds the
    teacher's logits of that view (`CachedFeatures.teacher_columns`). Files that fail
    extraction are reported to `dm.bad_file_log`.
    """
    pre, settings = dm.preprocess, spec.settings
    engine = resolve_engine(settings.engine, device)
    precision = resolve_precision(settings.precision, device)
    precision = precision if precision in engine.precisions else "fp32"
    base: dict[str, Any] = {
        "version": CACHE_VERSION,
        "backbones": [{"name": b.name, "weights": weights_digest(b)} for b in model.backbones()],
        "preprocess": pre.to_dict(),
        "decode": {"resize_cache": bool(dm.resize_cache)},
        "source": dm.source.name,
        "precision": precision,
        "engine": engine.name,
    }
    extractor = model
    if teacher is not None:
        base["teacher"] = weights_digest(teacher)
        extractor = WithTeacher(model, teacher)
    root = spec.cache_root / "features"
    batch_size = feature_batch_size(settings.batch_size, device, dm.loading.batch_size)
    samples = dm.catalog.samples
    reader = dm.reader()

    def build(
        keys: list[str], transform: Any, count: int, extra: dict, seed: int = 0, **kw: Any
    ) -> Any:
        images = ImageListDataset([(k, 0) for k in keys], reader, transform)
        entry = {**base, **extra, "samples": dm.source.signature(keys)}
        workers = dm.loading.workers
        return load_or_build(
            root,
            entry,
            extractor,
            images,
            pre,
            count,
            device,
            batch_size,
            workers,
            precision,
            seed,
            engine=engine.name,
            **kw,
        )

    every_key = dm.catalog.all_keys()
    eval_store, eval_hit = build(every_key, eval_transform(pre), 1, {"transform": "eval"})
    hits = {"eval": eval_hit}
    train_store = None
    augment = dm.augment
    if augment.random and views != "none":
        transform = augment.train_transform(pre)
        extra = {
            "transform": {
                "augment": augment.preset,
                "crop_scale": list(augment.crop_scale),
                "views": settings.views,
            }
        }
        train_keys = sorted(k for k, _ in dm.catalog.view_samples())
        # The views follow the run's seed: `seed=S` draws others (their own entries).
        if views == "all":
            train_store, hits["train"] = build(
                train_keys, transform, settings.views, extra, spec.seed, reuse=reuse
            )
        else:
            place = {key: i for i, key in enumerate(train_keys)}
            subset = sorted(views, key=place.__getitem__)
            count = settings.views if subset_views is None else subset_views
            extra = {
                "transform": {**extra["transform"], "views": count},
                "subset_of": dm.source.signature(train_keys),
            }
            seed_at = [place[k] for k in subset]
            train_store, hits["train"] = build(
                subset, transform, count, extra, spec.seed, seed_at=seed_at, reuse=reuse
            )
    for store in (eval_store, train_store):
        for key, why in (store.failed if store else {}).items():
            dm.bad_file_log(key, why)
    described = (
        "no augmented views"
        if train_store is None
        else f"{train_store.views} augmented views ({augment.preset}) of "
        f"{len(train_store.files)} training images"
    )
    log.info(
        "Feature cache: %s %d images, %d features each (backbone in %s on %s), %s; the backbone "
        "does not run during training (%s)",
        "reusing" if all(hits.values()) else "built",
        len(every_key),
        eval_store.dim,
        precision,
        engine.name,
        described,
        eval_store.directory.parent,
    )
    columns = int(teacher.num_classes) if teacher is not None else 0
    return CachedFeatures(eval_store, train_store, samples, hits, precision, columns)
