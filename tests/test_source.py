"""The `Source` seam: a toy in-memory source, defined here as a user would define theirs,
trains, evaluates and predicts through the same composition root as the folder source."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY, _draw
from hydra import compose, initialize_config_dir
from torch.utils.data import RandomSampler

from vision_tl.core.config import config_dir
from vision_tl.data import SOURCES, Catalog, Source, register_source
from vision_tl.data.preprocess import AnyPreprocess, Preprocess
from vision_tl.data.source import digest
from vision_tl.inference.checkpoint import load_checkpoint
from vision_tl.inference.eval import run_eval
from vision_tl.inference.predictor import Predictor
from vision_tl.training.build import build_data
from vision_tl.training.train import run_training

CLASSES = ("red", "green", "blue")


@register_source("toy")
class ToySource(Source):
    """Coloured squares held in memory: no file anywhere, keys are `split/class/i`."""

    def __init__(self, per_class: int = 6, size: int = 32) -> None:
        self.per_class, self.size = per_class, size
        self.opened: list[str] = []

    @classmethod
    def from_config(cls, data: Mapping[str, Any], cache_root: Path) -> ToySource:
        return cls(int(data.get("toy_per_class") or 6))

    def catalog(self) -> Catalog:
        samples = {
            split: [(f"{split}/{name}/{i}", c) for c, name in enumerate(CLASSES) for i in range(n)]
            for split, n in (("train", self.per_class), ("val", 4))
        }
        return Catalog(list(CLASSES), samples)

    def open(self, key: str, preprocess: AnyPreprocess) -> torch.Tensor:
        self.opened.append(key)
        split, name, i = key.split("/")
        seed = (split == "val") * 10_000 + CLASSES.index(name) * 100 + int(i)
        pixels = np.asarray(_draw(CLASSES.index(name), seed=seed, size=self.size))
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)

    def signature(self, keys: Sequence[str]) -> str:
        return digest([self.per_class, self.size, list(keys)])


def test_a_source_registers_and_builds_from_the_data_config() -> None:
    assert "toy" in SOURCES
    data = build_data({"source": "toy", "toy_per_class": 5})
    assert isinstance(data.source, ToySource) and data.source.per_class == 5
    assert data.catalog.class_counts("train") == [5, 5, 5]
    assert data.catalog.class_counts("val") == [4, 4, 4], "its own val split is kept"
    assert data.source.file("train/red/0") is None, "no file behind an in-memory sample"


def test_a_source_without_val_is_split_by_the_datamodule_settings() -> None:
    class NoVal(ToySource):
        def catalog(self) -> Catalog:
            full = super().catalog()
            return Catalog(full.class_names, {"train": full.samples["train"]})

    data = build_data({"val_fraction": 0.5, "seed": 3}, source=NoVal(per_class=4))
    assert data.catalog.class_counts("train") == [2, 2, 2]
    assert data.catalog.class_counts("val") == [2, 2, 2]
    keys = {s: {k for k, _ in data.catalog.samples[s]} for s in ("train", "val")}
    assert not keys["train"] & keys["val"]


def test_an_iterable_source_is_read_in_its_own_order_without_resized_copies() -> None:
    class Stream(ToySource):
        iterable = True

    data = build_data({"batch_size": 4, "num_workers": 0, "resize_cache": True}, source=Stream())
    dm = data.datamodule(Preprocess(24, 24))
    assert not dm.resize_cache and dm.reader().files == {}, "no random access to copy from"
    loader = dm.train_dataloader()
    assert loader.sampler is not None and not isinstance(loader.sampler, RandomSampler)
    _, labels = next(iter(loader))
    assert labels.tolist() == [0, 0, 0, 0], "the catalog's order, not a shuffle"


@pytest.mark.integration
def test_a_toy_source_trains_evaluates_and_predicts(compose_train, tmp_path: Path) -> None:
    overrides = [*TINY, "data.source=toy", "+data.toy_per_class=6"]
    cfg = compose_train([*overrides, "trainer.max_epochs=3", "optimizer.lr=0.01"], tmp_path / "run")
    metrics = run_training(cfg)
    assert metrics["class_names"] == list(CLASSES) and metrics["best_val_acc"] is not None
    split = pd.read_csv(tmp_path / "run" / "split.csv")
    assert split["path"].tolist()[0] == "train/red/0", "sample identity is the key"
    assert split["split"].value_counts().to_dict() == {"train": 18, "val": 12}

    ckpt = metrics["best_checkpoint"]
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        eval_cfg = compose(
            "eval",
            overrides=[
                f"ckpt_path={ckpt}",
                "data.source=toy",
                "+data.toy_per_class=6",
                "num_workers=0",
                f"paths.output_dir={tmp_path / 'eval'}",
            ],
        )
    result = run_eval(eval_cfg)
    assert result["num_images"] == 12 and result["split"] == "val"
    assert result["acc"] == pytest.approx(metrics["best_val_acc"], abs=1e-6), "eval parity"
    rows = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert set(rows["path"]) == {f"val/{c}/{i}" for c in CLASSES for i in range(4)}

    loaded = load_checkpoint(ckpt)
    source = ToySource()
    keys = ["val/green/1", "val/blue/2"]
    probs = Predictor(loaded.model, loaded.preprocess).predict(
        keys, source.reader(loaded.preprocess)
    )
    assert probs.probs.shape == (2, 3) and source.opened == keys
    by_key = dict(zip(rows["path"], rows["top1_label"], strict=True))
    predicted = [CLASSES[i] for i in probs.probs.argmax(1).tolist()]
    assert predicted == [by_key[k] for k in keys], "predict agrees with eval"
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["data"] == "toy"
