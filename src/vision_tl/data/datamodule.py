"""The LightningDataModule: a source's catalog served as uint8 image batches (decoded and
augmented with the run's resolved `Preprocess`, normalised on the device), or as cached
backbone features once the feature cache hands them over.

The settings come grouped (`DataSettings.from_config` reads the flat `data.*` keys once);
what the images are and how they are opened is the `Source`'s business.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vision_tl.core.config import cache_dir
from vision_tl.core.errors import ConfigError
from vision_tl.core.launch import from_rank_zero
from vision_tl.core.runtime import available_cpus
from vision_tl.core.validate import check_values
from vision_tl.data.augment import (
    Inputs,
    eval_transform,
    get_augment,
    map_inputs,
    normalize_batch,
    train_transform,
)
from vision_tl.data.dataset import ImageListDataset, collate_skipping_none
from vision_tl.data.features import CachedFeatures, FeatureSettings
from vision_tl.data.preprocess import AnyPreprocess, EnsemblePreprocess
from vision_tl.data.resized import resized_copies
from vision_tl.data.rules import RULES
from vision_tl.data.samplers import ViewSampler, train_sampler
from vision_tl.data.scan import BadFileLog, write_bad_files
from vision_tl.data.source import Catalog, Reader, Source
from vision_tl.data.stats import class_count_table, imbalance, log_class_counts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loading:
    """How batches are drawn: size, decoding processes (None: one per core, up to 8) and
    the training sampler (`shuffle`, or `weighted` for imbalanced classes)."""

    batch_size: int = 32
    num_workers: int | None = None
    sampler: str = "shuffle"
    stream: bool = False  # training batches streamed in the source's chunk order (shards)

    @property
    def workers(self) -> int:
        return min(8, available_cpus()) if self.num_workers is None else int(self.num_workers)


@dataclass(frozen=True)
class Augmentation:
    """The training augmentation preset (`data/augment.py`) and its random-crop scale."""

    preset: str = "flip_crop"
    crop_scale: tuple[float, float] = (0.08, 1.0)

    @property
    def random(self) -> bool:
        return get_augment(self.preset).random

    def train_transform(self, preprocess: AnyPreprocess) -> Any:
        return train_transform(preprocess, self.preset, self.crop_scale)


@dataclass(frozen=True)
class FileChecks:
    """What an unusable file does: `skip` it (listed in bad_files.csv) or `fail` the run;
    more than `max_failed_fraction` of later failures stops the run."""

    on_bad_image: str = "skip"
    max_failed_fraction: float = 0.1


@dataclass(frozen=True)
class DataSettings:
    """The `data.*` settings, grouped, read from the config in one place."""

    loading: Loading = field(default_factory=Loading)
    augment: Augmentation = field(default_factory=Augmentation)
    checks: FileChecks = field(default_factory=FileChecks)
    features: FeatureSettings = field(default_factory=FeatureSettings)
    val_fraction: float = 0.2
    seed: int = 42
    resize_cache: bool = False
    cache_root: Path = field(default_factory=cache_dir)

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> DataSettings:
        """Read the flat `data.*` keys (checked against `data/rules.py` first, so settings
        built in code obey the same table as the command line)."""
        check_values("data", data, RULES)

        def given(*keys: str) -> dict[str, Any]:
            return {k: data[k] for k in keys if data.get(k) is not None}

        features = given(
            "feature_views", "feature_precision", "feature_batch_size", "feature_engine"
        )
        features = {k.removeprefix("feature_"): v for k, v in features.items()}
        if data.get("feature_cache") is not None:
            features["mode"] = data["feature_cache"]
        augment = {"preset": data["augment"]} if data.get("augment") else {}
        if data.get("crop_scale") is not None:
            augment["crop_scale"] = tuple(float(v) for v in data["crop_scale"])
        return cls(
            loading=Loading(**given("batch_size", "num_workers", "sampler", "stream")),
            augment=Augmentation(**augment),
            checks=FileChecks(**given("on_bad_image", "max_failed_fraction")),
            features=FeatureSettings(**features),
            **given("val_fraction", "seed", "resize_cache"),
            cache_root=Path(data["cache"]).expanduser() if data.get("cache") else cache_dir(),
        )


def load_catalog(source: Source, settings: DataSettings) -> Catalog:
    """The source's catalog, checked (`on_bad_image=fail`), split (a stratified val split
    when the data has none) and described in the log: what every command reads."""
    catalog = from_rank_zero(source.catalog, handoff="catalog")  # one scan per job
    where = source.describe()
    if catalog.bad and settings.checks.on_bad_image == "fail":
        shown = "; ".join(f"{b.path} ({b.reason})" for b in catalog.bad[:3])
        raise ConfigError(
            f"{len(catalog.bad)} unusable files under {where}: {shown}"
            f"{' ...' if len(catalog.bad) > 3 else ''}; fix or remove them, or set "
            "data.on_bad_image=skip"
        )
    catalog = catalog.with_val(settings.val_fraction, settings.seed)
    sizes = "/".join(str(len(catalog.samples.get(s, []))) for s in ("train", "val", "test"))
    log.info(
        "Data: %d classes, %s images (train/val/test) from %s",
        len(catalog.class_names),
        sizes,
        where,
    )
    log.info("Image check: %s", catalog.scan.summary() if catalog.scan else "skipped")
    if catalog.bad:
        kinds = Counter(b.reason.split(" (")[0].split(":")[0] for b in catalog.bad)
        log.warning(
            "%d unusable files skipped (listed with reasons in the run's bad_files.csv): %s",
            len(catalog.bad),
            ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()),
        )
    if catalog.ignored:
        log.info("Ignored %d hidden, system or non-image files", len(catalog.ignored))
    log.info("Images per class:\n%s", class_count_table(catalog))
    ratio = imbalance(catalog.class_counts("train"))
    if ratio >= 3 and settings.loading.sampler == "shuffle":
        log.info(
            "Classes are imbalanced (%.1f:1 in train): consider data.sampler=weighted "
            "or loss.class_weights=auto",
            ratio,
        )
    return catalog


def log_skipped(key: str, reason: str) -> None:
    """A file outside the catalog that cannot be read is skipped with one warning."""
    log.warning("skipped %s: %s", key, reason)


class ImageDataModule(L.LightningDataModule):
    """Batches of a `Catalog`'s splits, opened by its `Source` with the resolved `preprocess`.

    Loaders yield uint8 images (a tuple of per-member crops for an `EnsemblePreprocess`);
    `on_after_batch_transfer` normalises them on the device. After `use_features`, loaders
    yield cached backbone features instead (the `FeatureCache` callback decides when). An
    iterable source is read in its own order: no sampler and no resized copies.
    """

    def __init__(
        self,
        source: Source,
        catalog: Catalog,
        preprocess: AnyPreprocess,
        loading: Loading | None = None,
        augment: Augmentation | None = None,
        checks: FileChecks | None = None,
        resize_cache: bool = False,
        cache_root: Path | None = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.catalog = catalog
        self.preprocess = preprocess
        self.loading = loading or Loading()
        self.augment = augment or Augmentation()
        self.checks = checks or FileChecks()
        self.resize_cache = resize_cache and not source.iterable
        self.cache_root = cache_root or cache_dir()
        self.bad_file_log = BadFileLog()
        self.features: CachedFeatures | None = None
        self._feature_batch_size: int | None = None
        self._reader: Reader | None = None
        self._failures_size = -1
        self._counts_logged = False

    @property
    def class_names(self) -> list[str]:
        return self.catalog.class_names

    @property
    def has_test(self) -> bool:
        return bool(self.catalog.samples.get("test"))

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit" and self.trainer is not None and not self._counts_logged:
            self._counts_logged = True
            if self.trainer.is_global_zero:
                log_class_counts(self.trainer.loggers, self.catalog)

    def reader(self) -> Reader:
        """key -> uint8 image; with `resize_cache`, large files are read from resized copies."""
        if self._reader is None:
            copies: dict[str, str] = {}
            if self.resize_cache:
                files = {k: self.source.file(k) for k in self.catalog.all_keys()}
                pre = self.preprocess
                pre = pre.decode_as if isinstance(pre, EnsemblePreprocess) else pre
                made = resized_copies([f for f in files.values() if f], pre, self.cache_root)
                copies = {k: made[f] for k, f in files.items() if f in made}
            self._reader = Reader(self.source, self.preprocess, copies)
        return self._reader

    def write_bad_files(self, path: str | Path, write: bool = True) -> None:
        """Write the unusable files found so far to `path` (a CSV of path, reason); files
        that fail later, during training or feature extraction, are appended to it."""
        self.bad_file_log = BadFileLog(path, preflight_rows=len(self.catalog.bad))
        if write:
            write_bad_files(path, self.catalog.bad)

    def check_failures(self) -> None:
        """Stop the run when more than `max_failed_fraction` of the files that passed the
        pre-flight check failed since: so many failures point at the setup, not the files."""
        path = self.bad_file_log.path
        if path is not None:
            size = os.path.getsize(path) if os.path.exists(path) else 0
            if size == self._failures_size:
                return
            self._failures_size = size
        failed = self.bad_file_log.later_failures()
        total = sum(len(samples) for samples in self.catalog.samples.values())
        limit = self.checks.max_failed_fraction
        if not failed or len(failed) <= limit * total:
            return
        first = failed[0]
        raise ConfigError(
            f"data.max_failed_fraction={limit}: {len(failed)} of {total} "
            "images that passed the image check failed when read for training, which points "
            f"at the setup (image size, augmentation, disk), not the files; first: {first.path}: "
            f"{first.reason}"
        )

    def teardown(self, stage: str | None = None) -> None:
        if self.trainer is None or self.trainer.is_global_zero:
            self.bad_file_log.deduplicate()

    def use_features(self, features: CachedFeatures | None, batch_size: int | None = None) -> None:
        """Serve `features` instead of images from now on (None: images again), in training
        batches of `batch_size` (None: `loading.batch_size`)."""
        self.features = features
        self._feature_batch_size = batch_size if features is not None else None

    def image_dataset(self, split: str, train: bool, report: bool = True) -> ImageListDataset:
        """The images of `split` as uint8 crops, with the train or eval transform."""
        transform = (
            self.augment.train_transform(self.preprocess)
            if train
            else eval_transform(self.preprocess)
        )
        return ImageListDataset(
            self.catalog.samples[split],
            self.reader(),
            transform,
            on_error=self.bad_file_log if report else None,
        )

    def _loader(self, split: str, train: bool, batch_size: int | None = None) -> DataLoader:
        batch_size = batch_size or self.loading.batch_size
        if train and self.features is None and self.loading.stream:
            if self.loading.sampler != "shuffle":
                raise ConfigError(
                    f"data.stream=true shuffles as it streams: data.sampler="
                    f"{self.loading.sampler} needs random access (data.stream=false)"
                )
            transform = self.augment.train_transform(self.preprocess)
            return self.source.stream(
                split,
                self.preprocess,
                transform,
                batch_size,
                self.loading.workers,
                self.bad_file_log,
            )
        dataset: Dataset
        labels: Sequence[int]
        if self.features is not None:
            dataset, views = self.features.dataset(split, train)
            labels = dataset.labels.tolist()
            workers = 0  # reading rows is cheaper than starting worker processes
            collate = None
        else:
            dataset, views = self.image_dataset(split, train), 1
            # Only class-balanced sampling reads the labels: no list of a million of them
            # for plain shuffling.
            weighted = train and self.loading.sampler != "shuffle"
            labels = [label for _, label in dataset.samples] if weighted else range(len(dataset))
            workers = self.loading.workers
            collate = collate_skipping_none
        sampler: Sampler[int] | None = None
        if train and not self.source.iterable:
            sampler = train_sampler(self.loading.sampler, labels, len(self.class_names))
            if views > 1:
                sampler = ViewSampler(sampler, len(labels), views)
        kwargs: dict[str, Any] = {}
        if workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=4)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=train and len(dataset) > batch_size,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate,
            **kwargs,
        )

    def eval_loader(self, samples: str | list[tuple[str, int]]) -> DataLoader:
        """Eval-transform batches of a split (its cached features while they are served) or
        of other (file, label) pairs, always decoded from the files (open-set examples)."""
        if isinstance(samples, str):
            return self._loader(samples, train=False)
        reader = Reader(self.source, self.preprocess, {key: key for key, _ in samples})
        dataset = ImageListDataset(
            samples, reader, eval_transform(self.preprocess), on_error=log_skipped
        )
        return DataLoader(
            dataset,
            batch_size=self.loading.batch_size,
            num_workers=min(self.loading.workers, 2),
            collate_fn=collate_skipping_none,
        )

    def normalize(self, x: Inputs) -> Inputs:
        """A uint8 image batch from these loaders (one per member for an ensemble with
        per-member preprocessing) as the network's float input."""
        return normalize_batch(x, self.preprocess)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        if self.features is None and len(y) > 0:  # images; features arrive ready
            x = self.normalize(x)
            if self.trainer is not None:  # the dtype the precision plugin gives inputs
                x = map_inputs(self.trainer.precision_plugin.convert_input, x)
        return type(batch)((x, y)) if isinstance(batch, tuple | list) else (x, y)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True, batch_size=self._feature_batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
