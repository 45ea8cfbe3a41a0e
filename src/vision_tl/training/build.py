"""The composition root: one place that turns a composed config into the objects of a run.

source -> catalog -> model (the task) -> the preprocessing, resolved once against the
model's weights -> the DataModule built with it. `train`, `eval`, `audit`, `select`, the
benches, the notebooks and the tests all build through here, so no caller resolves
preprocessing or wires a DataModule by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vision_tl.core.errors import ConfigError
from vision_tl.data.datamodule import DataSettings, ImageDataModule, load_catalog
from vision_tl.data.features import FeatureSpec
from vision_tl.data.preprocess import OVERRIDES, AnyPreprocess
from vision_tl.data.source import Catalog, Source
from vision_tl.data.sources import build_source
from vision_tl.training.task import ClassificationTask


@dataclass(frozen=True)
class Data:
    """A run's data before any model: where it comes from, its settings and its catalog."""

    source: Source
    settings: DataSettings
    catalog: Catalog

    def datamodule(self, preprocess: AnyPreprocess) -> ImageDataModule:
        """The DataModule serving this catalog with `preprocess` (resolved already)."""
        s = self.settings
        return ImageDataModule(
            self.source,
            self.catalog,
            preprocess,
            loading=s.loading,
            augment=s.augment,
            checks=s.checks,
            resize_cache=s.resize_cache,
            cache_root=s.cache_root,
        )

    @property
    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(self.settings.features, self.settings.seed, self.settings.cache_root)


@dataclass(frozen=True)
class Run:
    """Everything `train` (and `audit`) needs, built once from the config."""

    data: Data
    task: ClassificationTask
    datamodule: ImageDataModule


def plain(node: Any) -> Any:
    """A config node as plain Python values (torch and our classes never see OmegaConf)."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def build_data(data: Mapping[str, Any] | DictConfig, source: Source | None = None) -> Data:
    """The `data` config node's source (or the given one), settings and checked catalog."""
    node = plain(data)
    settings = DataSettings.from_config(node)
    source = source or build_source(node, settings.cache_root)
    return Data(source, settings, load_catalog(source, settings))


def shard_data(data: Mapping[str, Any] | DictConfig, settings: Any) -> dict[str, Any]:
    """`python -m vision_tl.shard`'s work: scan and split `data` as a training run does,
    then write its shards (`settings`: a `data.shards.ShardSettings`); returns `meta.json`'s
    content."""
    from vision_tl.data.shards import write_shards

    built = build_data(data)
    fingerprint = built.source.signature(built.catalog.all_keys())
    return write_shards(built.source, built.catalog, settings, fingerprint)


def preprocess_overrides(data: Mapping[str, Any], source: Source) -> dict[str, Any]:
    """The user's `data.*` preprocessing keys, over what the source implies (a generated
    set's native size): what `Preprocess.resolve` applies to the weights' own settings."""
    given = {k: data.get(k) for k in OVERRIDES}
    for key, value in source.preprocess_defaults().items():
        if given.get(key) is None:
            given[key] = value
    return given


def class_weights(spec: Any, counts: list[int]) -> list[float] | None:
    """`None`, `auto` (inverse frequency, mean 1) or an explicit list, one weight per class."""
    if spec is None:
        return None
    if spec == "auto":
        if min(counts) == 0:
            raise ConfigError("loss.class_weights=auto needs every class in the training split")
        inverse = [1.0 / c for c in counts]
        scale = len(counts) / sum(inverse)
        return [w * scale for w in inverse]
    weights = [float(w) for w in spec]
    if len(weights) != len(counts):
        raise ConfigError(f"loss.class_weights has {len(weights)} values for {len(counts)} classes")
    return weights


def optimizer_factory(node: DictConfig | None, lr_scale: float = 1.0) -> Any:
    """The `optimizer` config as a factory of `params`, its LR times `lr_scale` (a stage
    of a policy's plan: LP-FT fine-tunes at `finetune.lr_scale` x `optimizer.lr`)."""
    if node is None:
        return None
    factory = instantiate(node)
    if lr_scale == 1.0:
        return factory
    if node.get("lr") is None:
        raise ConfigError(f"a stage at lr_scale={lr_scale} needs optimizer.lr set")
    return partial(factory, lr=float(node.lr) * lr_scale)


def build_task(cfg: DictConfig, data: Data, lr_scale: float = 1.0) -> ClassificationTask:
    """The task for `cfg.model` on `data`'s classes; it resolves the preprocessing once."""
    loss = cfg.get("loss") or {}
    return ClassificationTask(
        model=plain(cfg.model),
        class_names=data.catalog.class_names,
        finetune=plain(cfg.get("finetune")),
        label_smoothing=float(loss.get("label_smoothing", 0.0)),
        class_weights=class_weights(loss.get("class_weights"), data.catalog.class_counts()),
        preprocess_overrides=preprocess_overrides(plain(cfg.data), data.source),
        optimizer=optimizer_factory(cfg.get("optimizer"), lr_scale),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        mixup=plain(cfg.mixup) if cfg.get("mixup") else None,
    )


def build_run(cfg: DictConfig, source: Source | None = None, lr_scale: float = 1.0) -> Run:
    """Data, task and DataModule for `cfg` (`source`: use this one instead of `cfg.data`'s;
    `lr_scale`: the stage's, see `optimizer_factory`)."""
    data = build_data(cfg.data, source)
    task = build_task(cfg, data, lr_scale)
    return Run(data, task, data.datamodule(task.preprocess))
