"""LightningDataModule for image folders: check, split, decode and augment with the run's
`Preprocess`, and serve cached backbone features instead of images when told to."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from vision_tl.core.config import cache_dir
from vision_tl.core.errors import ConfigError
from vision_tl.core.runtime import available_cpus, feature_batch_size, resolve_precision
from vision_tl.data.augment import (
    AugmentPreset,
    Inputs,
    eval_transform,
    get_augment,
    map_inputs,
    normalize_batch,
    train_transform,
)
from vision_tl.data.builtin import DATASETS
from vision_tl.data.dataset import ImageListDataset, collate_skipping_none
from vision_tl.data.features import (
    CACHE_VERSION,
    CachedFeatures,
    FeatureStore,
    WithTeacher,
    file_signature,
    load_or_build,
    weights_digest,
)
from vision_tl.data.features import MODES as FEATURE_CACHE_MODES
from vision_tl.data.folder import SplitSamples, scan_root
from vision_tl.data.preprocess import AnyPreprocess, EnsemblePreprocess
from vision_tl.data.resized import resized_copies
from vision_tl.data.samplers import SAMPLERS, ViewSampler, train_sampler
from vision_tl.data.scan import DEFAULT_MAX_PIXELS, BadFileLog, ImageScanner, write_bad_files
from vision_tl.data.stats import class_count_table, imbalance, log_class_counts

log = logging.getLogger(__name__)

ON_BAD_IMAGE = ("skip", "fail")


def _choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"data.{name}={value}: one of {', '.join(choices)}")
    return value


class ImageFolderDataModule(L.LightningDataModule):
    """Images in class subfolders under `root`, listed by a CSV `manifest`, or a built-in
    dataset when both are None.

    Every file is checked before training (see `vision_tl.data.scan`); unusable ones are
    skipped (`on_bad_image=skip`) or stop the run (`fail`). `image_size`, `resize_size`,
    `interpolation`, `mean`, `std`, `background` and `draft` are the user's preprocessing
    overrides (`preprocess_overrides`): whoever builds the model resolves them once against
    the backbone's own preprocessing and hands the result to `set_preprocess`. Loaders
    yield uint8 images; `on_after_batch_transfer` normalises them on the device. After
    `use_features`, loaders yield cached backbone features instead (see
    `vision_tl.training.callbacks.FeatureCache`, which decides when).
    """

    def __init__(
        self,
        root: str | None = None,
        builtin: str = "shapes",
        cache: str | None = None,
        val_fraction: float = 0.2,
        seed: int = 42,
        batch_size: int = 32,
        num_workers: int | None = None,
        image_size: int | None = None,
        resize_size: int | None = None,
        interpolation: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: str = "flip_crop",
        crop_scale: Sequence[float] = (0.08, 1.0),
        background: Sequence[int] = (255, 255, 255),
        manifest: str | None = None,
        on_bad_image: str = "skip",
        max_image_pixels: int | None = None,
        sampler: str = "shuffle",
        draft: bool = True,
        resize_cache: bool = False,
        feature_cache: str = "auto",
        feature_views: int = 4,
        max_failed_fraction: float = 0.1,
        feature_precision: str = "auto",
        feature_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size}: a positive integer")
        if feature_views < 0:
            raise ConfigError(f"data.feature_views={feature_views}: an integer >= 0")
        self.root = root
        self.builtin = builtin
        self.cache = cache
        self.val_fraction = val_fraction
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = min(8, available_cpus()) if num_workers is None else num_workers
        if root is None and manifest is None and image_size is None:
            image_size = DATASETS.get(builtin).image_size
        self.preprocess_overrides: dict[str, Any] = {
            "image_size": image_size,
            "resize_size": resize_size,
            "interpolation": interpolation,
            "mean": None if mean is None else tuple(mean),
            "std": None if std is None else tuple(std),
            "background": tuple(int(v) for v in background),
            "draft": bool(draft),
        }
        self.augment = augment
        self.augment_preset: AugmentPreset = get_augment(augment)
        self.crop_scale = tuple(float(v) for v in crop_scale)
        self.manifest = manifest
        self.on_bad_image = _choice("on_bad_image", on_bad_image, ON_BAD_IMAGE)
        self.max_image_pixels = int(max_image_pixels or DEFAULT_MAX_PIXELS)
        self.sampler = _choice("sampler", sampler, SAMPLERS)
        self.resize_cache = resize_cache
        self.feature_cache = _choice("feature_cache", feature_cache, FEATURE_CACHE_MODES)
        self.feature_views = int(feature_views)
        self.max_failed_fraction = float(max_failed_fraction)
        self._failures_size = -1
        resolve_precision(feature_precision, torch.device("cpu"))  # a bad name fails now
        self.feature_precision = feature_precision
        if feature_batch_size is not None and int(feature_batch_size) < 1:
            raise ConfigError(f"data.feature_batch_size={feature_batch_size}: a positive integer")
        self.feature_batch_size = feature_batch_size
        self.preprocess: AnyPreprocess | None = None
        self.split: SplitSamples | None = None
        self.bad_file_log = BadFileLog()
        self.features: CachedFeatures | None = None
        self._sources: dict[str, str] | None = None
        self._counts_logged = False

    @property
    def cache_root(self) -> Path:
        return Path(self.cache).expanduser() if self.cache else cache_dir()

    @property
    def data_root(self) -> Path | None:
        """The folder actually read: `root`, or the built-in dataset's cache folder (None
        for a manifest without a root: its paths are relative to the CSV)."""
        if self.root is not None:
            return Path(self.root).expanduser()
        if self.manifest is not None:
            return None
        return DATASETS.get(self.builtin).materialize(self.cache_root)

    def prepare_data(self) -> None:
        self.data_root  # noqa: B018 - generates the built-in dataset once, on one process

    def setup(self, stage: str | None = None) -> None:
        if self.split is None:
            self.split = self._scan()
        if stage == "fit" and self.trainer is not None and not self._counts_logged:
            self._counts_logged = True
            if self.trainer.is_global_zero:
                log_class_counts(self.trainer.loggers, self.split)

    def _scan(self) -> SplitSamples:
        root = self.data_root
        anchor = Path(self.manifest).expanduser() if self.manifest else root
        scanner = ImageScanner(
            ImageScanner.cache_file_for(self.cache_root, anchor), self.max_image_pixels
        )
        split = scan_root(
            root, self.val_fraction, self.seed, manifest=self.manifest, scanner=scanner
        )
        where = self.manifest or root
        if split.bad and self.on_bad_image == "fail":
            shown = "; ".join(f"{b.path} ({b.reason})" for b in split.bad[:3])
            raise ConfigError(
                f"{len(split.bad)} unusable files under {where}: {shown}"
                f"{' ...' if len(split.bad) > 3 else ''}; fix or remove them, or set "
                "data.on_bad_image=skip"
            )
        sizes = "/".join(str(len(split.samples.get(s, []))) for s in ("train", "val", "test"))
        log.info(
            "Data: %d classes, %s images (train/val/test) from %s",
            len(split.class_names),
            sizes,
            where,
        )
        log.info("Image check: %s", split.scan.summary() if split.scan else "skipped")
        if split.bad:
            kinds = Counter(b.reason.split(" (")[0].split(":")[0] for b in split.bad)
            log.warning(
                "%d unusable files skipped (listed with reasons in the run's bad_files.csv): %s",
                len(split.bad),
                ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()),
            )
        if split.ignored:
            log.info("Ignored %d hidden, system or non-image files", len(split.ignored))
        log.info("Images per class:\n%s", class_count_table(split))
        ratio = imbalance(split.class_counts("train"))
        if ratio >= 3 and self.sampler == "shuffle":
            log.info(
                "Classes are imbalanced (%.1f:1 in train): consider data.sampler=weighted "
                "or loss.class_weights=auto",
                ratio,
            )
        return split

    @property
    def class_names(self) -> list[str]:
        if self.split is None:
            self.setup()
        return self.split.class_names

    @property
    def has_test(self) -> bool:
        return bool(self.split and self.split.samples.get("test"))

    def class_counts(self) -> list[int]:
        return self.split.class_counts("train")

    def split_frame(self) -> pd.DataFrame:
        """Every image with its label and split: what this run trains and validates on."""
        return self.split.to_frame()

    def write_bad_files(self, path: str | Path, write: bool = True) -> None:
        """Write the unusable files found so far to `path` (a CSV of path, reason); files
        that fail later, during training or feature extraction, are appended to it."""
        self.bad_file_log = BadFileLog(path, preflight_rows=len(self.split.bad))
        if write:
            write_bad_files(path, self.split.bad)

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
        total = sum(len(files) for files in self.split.samples.values())
        if not failed or len(failed) <= self.max_failed_fraction * total:
            return
        first = failed[0]
        raise ConfigError(
            f"data.max_failed_fraction={self.max_failed_fraction}: {len(failed)} of {total} "
            "images that passed the image check failed when read for training, which points "
            f"at the setup (image size, augmentation, disk), not the files; first: {first.path}: "
            f"{first.reason}"
        )

    def teardown(self, stage: str | None = None) -> None:
        if self.trainer is None or self.trainer.is_global_zero:
            self.bad_file_log.deduplicate()

    def set_preprocess(self, preprocess: AnyPreprocess) -> AnyPreprocess:
        """Use `preprocess` (already resolved: see `Preprocess.resolve`) for every image; an
        `EnsemblePreprocess` makes every image a tuple of per-member crops."""
        self.preprocess = preprocess
        self._sources = None
        return preprocess

    def sources(self) -> dict[str, str]:
        """Path -> file actually read (resized copies when `resize_cache` is on)."""
        if self._sources is None:
            self._sources = {}
            if self.resize_cache:
                files = [p for samples in self.split.samples.values() for p, _ in samples]
                pre = self.preprocess
                pre = pre.decode_as if isinstance(pre, EnsemblePreprocess) else pre
                self._sources = resized_copies(files, pre, self.cache_root)
        return self._sources

    def feature_cache_blocker(self) -> str | None:
        """Why this data cannot be served from cached features, or None when it can."""
        if self.augment_preset.random and self.feature_views < 1:
            return f"data.augment={self.augment} with data.feature_views=0 augments every epoch"
        return None

    def build_features(
        self, model: nn.Module, device: torch.device, teacher: nn.Module | None = None
    ) -> CachedFeatures:
        """Load or compute the cached features this fit needs from `model.features`.

        Needs the split and the preprocessing set. Whether features may be cached at all
        is decided elsewhere, once (`vision_tl.training.callbacks.FeatureCache`). With a
        distillation `teacher` (a module taking the same normalised views), each row also
        holds the teacher's logits of that view (`CachedFeatures.teacher_columns`).
        """
        pre = self.preprocess
        precision = resolve_precision(self.feature_precision, device)
        base = {
            "version": CACHE_VERSION,
            "backbones": [
                {"name": b.name, "weights": weights_digest(b)} for b in model.backbones()
            ],
            "preprocess": pre.to_dict(),
            "decode": {"resize_cache": bool(self.resize_cache)},
        }
        if precision != "fp32":  # fp32 entries keep the keys they always had
            base["precision"] = precision
        extractor = model
        if teacher is not None:
            base["teacher"] = weights_digest(teacher)
            extractor = WithTeacher(model, teacher)
        root = self.cache_root / "features"
        batch_size = feature_batch_size(self.feature_batch_size, device, self.batch_size)
        samples = self.split.samples

        def build(
            files: list[str], transform: Any, views: int, spec: dict, seed: int = 0
        ) -> tuple[FeatureStore, bool]:
            images = ImageListDataset([(p, 0) for p in files], pre, transform, self.sources())
            spec = {**base, **spec, "files": file_signature(files)}
            workers = self.num_workers
            return load_or_build(
                root, spec, extractor, images, views, device, batch_size, workers, precision, seed
            )

        every_file = sorted({p for split in samples.values() for p, _ in split})
        eval_store, eval_hit = build(every_file, eval_transform(pre), 1, {"transform": "eval"})
        hits = {"eval": eval_hit}
        train_store = None
        if self.augment_preset.random:
            transform = train_transform(pre, self.augment, self.crop_scale)
            spec = {"transform": {"augment": self.augment, "crop_scale": list(self.crop_scale)}}
            spec["transform"]["views"] = self.feature_views
            train_files = sorted(p for p, _ in samples["train"])
            # The views follow the run's seed: `seed=S` draws others (their own entries).
            train_store, hits["train"] = build(
                train_files, transform, self.feature_views, spec, self.seed
            )
        for store in (eval_store, train_store):
            for path, why in (store.failed if store else {}).items():
                self.bad_file_log(path, why)
        views = (
            f"{self.feature_views} augmented views ({self.augment}) per training image"
            if train_store
            else "the eval transform (data.augment=none)"
        )
        log.info(
            "Feature cache: %s %d images, %d features each (backbone in %s), %s; the backbone "
            "does not run during training (%s)",
            "reusing" if all(hits.values()) else "built",
            len(every_file),
            eval_store.dim,
            precision,
            views,
            eval_store.directory.parent,
        )
        columns = int(teacher.num_classes) if teacher is not None else 0
        return CachedFeatures(eval_store, train_store, samples, hits, precision, columns)

    def use_features(self, features: CachedFeatures | None) -> None:
        """Serve `features` instead of images from now on (None: images again)."""
        self.features = features

    def image_dataset(self, split: str, train: bool, report: bool = True) -> ImageListDataset:
        """The images of `split` as uint8 crops, with the train or eval transform."""
        if self.preprocess is None:
            raise RuntimeError("call set_preprocess(preprocess) before creating loaders")
        transform = (
            train_transform(self.preprocess, self.augment, self.crop_scale)
            if train
            else eval_transform(self.preprocess)
        )
        return ImageListDataset(
            self.split.samples[split],
            self.preprocess,
            transform,
            sources=self.sources(),
            on_error=self.bad_file_log if report else None,
        )

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset: Dataset
        if self.features is not None:
            dataset, views = self.features.dataset(split, train)
            labels = dataset.labels.tolist()
            workers = 0  # reading rows is cheaper than starting worker processes
            collate = None
        else:
            dataset, views = self.image_dataset(split, train), 1
            labels = [label for _, label in dataset.samples]
            workers = self.num_workers
            collate = collate_skipping_none
        sampler: Sampler[int] | None = None
        if train:
            sampler = train_sampler(self.sampler, labels, len(self.class_names))
            if views > 1:
                sampler = ViewSampler(sampler, len(labels), views)
        kwargs: dict[str, Any] = {}
        if workers > 0:
            kwargs.update(persistent_workers=True, prefetch_factor=4)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate,
            **kwargs,
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
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
