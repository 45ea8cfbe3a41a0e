"""The `data.*` keys every command accepts, checked before any work (see `core.validate`);
`predict` and `explain` have the two read limits, `data.max_file_bytes` and
`data.max_image_pixels`, as the others do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vision_tl.core.engines import ENGINE_RULE
from vision_tl.core.runtime import PRECISIONS
from vision_tl.core.validate import (
    FLAG,
    FRACTION,
    PROBABILITY,
    WORKERS,
    Allowed,
    Rules,
    integer,
    is_int,
    number,
    one_of,
    or_null,
    path,
    register_rules,
    registered,
    select,
    sequence,
)
from vision_tl.data.preprocess import RESIZE_MODES
from vision_tl.data.samplers import SAMPLERS

# Values of keys that the code reads as plain strings.
ON_BAD_IMAGE = ("skip", "fail")  # data.on_bad_image: data/datamodule.py (FileChecks)
FEATURE_CACHE = ("auto", "on", "off")  # data.feature_cache: training/callbacks.py (FeatureCache)


def _is_byte(value: Any) -> bool:
    return is_int(value) and 0 <= value <= 255


def _interpolation(value: Any) -> bool:
    from torchvision.transforms import InterpolationMode

    return str(value).lower() in {m.value for m in InterpolationMode}


def _crop_scale(value: Any) -> bool:
    low, high = (float(v) for v in value)
    return 0 < low <= high <= 1


def _sources() -> list[str]:
    from vision_tl.data.source import SOURCES
    from vision_tl.data.sources import build_source  # noqa: F401 - registers the built-ins

    return SOURCES.names()


def _augmentations() -> list[str]:
    from vision_tl.data.augment import AUGMENTATIONS  # torchvision v2: seconds to import

    return AUGMENTATIONS.names()


def _crop_after_resize(cfg: DictConfig) -> list[str]:
    image_size, resize_size = select(cfg, "data.image_size"), select(cfg, "data.resize_size")
    if is_int(image_size) and is_int(resize_size) and resize_size < image_size:
        return [
            f"data.resize_size={resize_size}: at least data.image_size ({image_size}), "
            "since the centre crop is taken from the resized image"
        ]
    return []


RULES = register_rules(
    Rules(
        {
            "input": or_null(path("path"), "none"),
            "data.source": registered(_sources, extra=("auto",)),
            "data.root": or_null(path("folder"), "the built-in smoke-test set"),
            "data.manifest": or_null(path("file"), "class folders"),
            "data.shards": or_null(
                Allowed(
                    lambda v: str(v).startswith("s3://") or Path(str(v)).expanduser().is_dir(),
                    "a folder written by python -m vision_tl.shard, or s3://BUCKET/PREFIX",
                ),
                "no shards",
            ),
            "data.unlabeled": or_null(path("path"), "no unlabelled images"),
            "data.batch_size": integer(1),
            "data.num_workers": WORKERS,
            "data.val_fraction": FRACTION,
            "data.sampler": one_of(*SAMPLERS),
            "data.on_bad_image": one_of(*ON_BAD_IMAGE),
            "data.image_size": or_null(integer(8), "the backbone's input size"),
            "data.resize_size": or_null(integer(8), "the backbone's crop ratio"),
            "data.interpolation": or_null(
                Allowed(_interpolation, "nearest, bilinear, bicubic, box, hamming or lanczos"),
                "the backbone's interpolation",
            ),
            "data.mean": or_null(sequence(3, number(), "numbers"), "the backbone's mean"),
            "data.std": or_null(sequence(3, number(gt=0), "numbers > 0"), "the backbone's std"),
            "data.background": sequence(3, Allowed(_is_byte, "0-255"), "integers 0-255"),
            "data.augment": registered(_augmentations),
            "data.crop_scale": Allowed(_crop_scale, "two numbers 0 < low <= high <= 1"),
            "data.feature_cache": one_of(*FEATURE_CACHE),
            "data.feature_views": integer(0),
            "data.feature_precision": one_of(*PRECISIONS),
            "data.feature_engine": ENGINE_RULE,
            "data.feature_batch_size": or_null(
                integer(1), "8 on a CPU, else max(32, data.batch_size)"
            ),
            "data.max_failed_fraction": PROBABILITY,
            "data.max_image_pixels": or_null(integer(1), "Pillow's limit"),
            "data.max_file_bytes": or_null(integer(1), "1 GiB"),
            "data.draft": FLAG,
            "data.resize_mode": or_null(one_of(*RESIZE_MODES), "crop"),
            "data.resize_cache": FLAG,
            "data.stream": FLAG,
        },
        checks=(_crop_after_resize,),
    )
)
