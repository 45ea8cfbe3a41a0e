"""Find the labelled images under a root, and split them into train/val/test."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from vision_tl.data.images import is_image_file
from vision_tl.errors import ConfigError

SPLITS = ("train", "val", "test")


@dataclass
class SplitSamples:
    """Images of each split as (path, class index), with the class names in index order."""

    class_names: list[str]
    samples: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    def class_counts(self, split: str = "train") -> list[int]:
        counts = [0] * len(self.class_names)
        for _, label in self.samples.get(split, []):
            counts[label] += 1
        return counts

    def to_frame(self) -> pd.DataFrame:
        rows = [
            (path, self.class_names[label], split)
            for split in SPLITS
            for path, label in self.samples.get(split, [])
        ]
        return pd.DataFrame(rows, columns=["path", "label", "split"])


def _class_images(folder: Path) -> dict[str, list[str]]:
    """Images per class subfolder (recursively), sorted so every run sees the same order."""
    classes: dict[str, list[str]] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(str(p) for p in sub.rglob("*") if p.is_file() and is_image_file(p))
        if files:
            classes[sub.name] = files
    return classes


def stratified_split(
    per_class: dict[str, list[str]], val_fraction: float, seed: int
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Split each class separately, so val has the same class mix as train.

    Each class keeps at least one training image; classes with 2+ images give val at
    least one. The result depends only on the file names, `val_fraction` and `seed`.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be between 0 and 1, got {val_fraction}")
    train, val = {}, {}
    for name, files in per_class.items():
        files = sorted(files)
        random.Random(f"{seed}:{name}").shuffle(files)
        n_val = min(len(files) - 1, max(1, round(len(files) * val_fraction)))
        val[name], train[name] = sorted(files[:n_val]), sorted(files[n_val:])
    return train, val


def scan_root(root: str | Path, val_fraction: float = 0.2, seed: int = 42) -> SplitSamples:
    """Read `root/{train,val,test}/<class>/...`, or `root/<class>/...` split by `val_fraction`.

    Without a `val/` folder, `train/` is split. A `test/` without class folders is
    unlabelled and is not returned here.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.root {root} does not exist or is not a folder")
    has_train = (root / "train").is_dir()
    per_split: dict[str, dict[str, list[str]]] = defaultdict(dict)
    if has_train:
        per_split["train"] = _class_images(root / "train")
        if (root / "val").is_dir():
            per_split["val"] = _class_images(root / "val")
        if (root / "test").is_dir():
            per_split["test"] = _class_images(root / "test")
    else:
        per_split["train"] = _class_images(root)
    where = root / "train" if has_train else root
    if not per_split["train"]:
        raise ConfigError(f"no images in class subfolders of {where}")
    if not per_split.get("val"):
        per_split["train"], per_split["val"] = stratified_split(
            per_split["train"], val_fraction, seed
        )
    class_names = sorted(per_split["train"])
    index = {name: i for i, name in enumerate(class_names)}
    result = SplitSamples(class_names)
    for split, classes in per_split.items():
        unknown = sorted(set(classes) - set(index))
        if unknown:
            raise ConfigError(
                f"classes {unknown} appear in {split}/ but not in train/ under {root}"
            )
        result.samples[split] = [(f, index[c]) for c in sorted(classes) for f in classes[c]]
    return result
