"""Inference from a checkpoint: safe loading, input lists, a batched predictor with TTA.

`python -m vision_tl.predict`, `eval` and `explain` share these pieces, so a model is
loaded, checked and fed the same way everywhere.
"""

from __future__ import annotations

import logging
import os
import re
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from vision_tl.data.images import IMAGE_EXTENSIONS, is_image_file, load_rgb
from vision_tl.data.transforms import eval_transform
from vision_tl.errors import ConfigError
from vision_tl.models.classifier import Classifier
from vision_tl.models.preprocess import Preprocess

log = logging.getLogger(__name__)

CROPS = (1, 5)


@dataclass
class LoadedModel:
    """A network ready for inference, with the class names and preprocessing it was trained on."""

    model: Classifier
    class_names: list[str]
    preprocess: Preprocess
    path: Path


def load_checkpoint(ckpt_path: str | Path | None) -> LoadedModel:
    """Load a `vision_tl.train` checkpoint on the CPU, weights only (no pickled code runs).

    A missing, corrupt or foreign file is a one-line `ConfigError`, not a traceback.
    """
    from vision_tl.task import ClassificationTask

    if not ckpt_path:
        raise ConfigError("ckpt_path is required, e.g. ckpt_path=RUN_DIR/checkpoints/best.ckpt")
    path = Path(ckpt_path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"ckpt_path {path} does not exist or is not a file")
    try:
        task = ClassificationTask.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"cannot load checkpoint {path}: {_load_failure(path, err)}; "
            "expected a .ckpt written by vision_tl.train"
        ) from err
    model = task.model.eval()
    return LoadedModel(model, list(task.class_names), task.preprocess, path)


def _load_failure(path: Path, err: Exception) -> str:
    """The reason a checkpoint did not load, in a few words instead of torch's paragraph."""
    if not zipfile.is_zipfile(path):
        return "not a PyTorch zip archive (corrupt, truncated or another format)"
    text = str(err)
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL (\S+)", text)
        return (
            f"it pickles {found.group(1) if found else 'code'}, which a weights-only load refuses"
        )
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def check_class_names(ckpt: Sequence[str], data: Sequence[str], where: str) -> None:
    """Fail when the data's classes differ from the checkpoint's: indices would be wrong."""
    if list(ckpt) != list(data):
        raise ConfigError(
            f"class list mismatch: the checkpoint has {list(ckpt)} but {where} has {list(data)}"
        )


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the GPU when there is one; anything else must be a torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name} is not a torch device (auto, cpu, cuda, cuda:1)") from err


def default_workers(num_workers: int | None) -> int:
    """Decoding processes: `None` means up to 4, never more than the cores this process has."""
    if num_workers is not None:
        return int(num_workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(4, cores or 1)


# --------------------------------------------------------------------------- inputs


@dataclass
class InputImages:
    """Images to predict: files to read, the path each is reported under, and submission ids."""

    files: list[Path]
    names: list[str]
    ids: list[str]


def collect_inputs(source: str | Path | None) -> InputImages:
    """A folder (image files, recursively, sorted), one image, or a CSV with a `path` column.

    Folder images are named relative to the folder; CSV paths are kept as written and
    resolved against the CSV's folder, and an `id` column, if any, gives submission ids.
    """
    if not source:
        raise ConfigError("input is required: a folder, an image file, or a CSV with a path column")
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and is_image_file(p)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            extensions = ", ".join(IMAGE_EXTENSIONS)
            raise ConfigError(f"input {path} holds no image files ({extensions})")
        names = [p.relative_to(path).as_posix() for p in files]
        return InputImages(files, names, [p.stem for p in files])
    if path.suffix.lower() == ".csv" and path.is_file():
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "path" not in frame.columns:
            raise ConfigError(f"input {path} has no 'path' column (columns: {list(frame.columns)})")
        names = frame["path"].tolist()
        files = [path.parent / name for name in names]
        ids = frame["id"].tolist() if "id" in frame.columns else [Path(n).stem for n in names]
        return InputImages(files, names, ids)
    if path.is_file():
        return InputImages([path], [str(source)], [path.stem])
    raise ConfigError(f"input {path} does not exist")


# --------------------------------------------------------------------------- dataset


class ViewTransform:
    """RGB image -> [views, C, H, W]: the eval centre crop, or five crops of the resized image."""

    def __init__(self, preprocess: Preprocess, crops: int = 1) -> None:
        if crops not in CROPS:
            raise ConfigError(f"tta.crops must be one of {CROPS}, got {crops}")
        self.crops = crops
        if crops == 1:
            self.transform = eval_transform(preprocess)
        else:
            interpolation = InterpolationMode(preprocess.interpolation.lower())
            self.resize = v2.Compose(
                [
                    v2.ToImage(),
                    v2.Resize(preprocess.resize_size, interpolation=interpolation, antialias=True),
                ]
            )
            self.five_crop = v2.FiveCrop(preprocess.input_size)
            self.transform = v2.Compose(
                [
                    v2.ToDtype(torch.float32, scale=True),
                    v2.Normalize(preprocess.mean, preprocess.std),
                ]
            )

    def __call__(self, image: Any) -> torch.Tensor:
        if self.crops == 1:
            return self.transform(image).unsqueeze(0)
        crops = self.five_crop(self.resize(image))
        return self.transform(tv_tensors.Image(torch.stack(crops))).as_subclass(torch.Tensor)


class ImageFiles(Dataset):
    """Decode files to TTA views; a file that cannot be read yields its error instead."""

    def __init__(
        self,
        files: Sequence[str | Path],
        transform: ViewTransform,
        background: tuple[int, int, int] = (255, 255, 255),
    ) -> None:
        self.files = list(files)
        self.transform = transform
        self.background = background

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str | None]:
        try:
            views = self.transform(load_rgb(self.files[index], self.background))
        except Exception as err:  # any decode failure is reported per file, never fatal
            return None, index, f"{type(err).__name__}: {err}".splitlines()[0]
        return views, index, None


def collate_views(
    items: list[tuple[torch.Tensor | None, int, str | None]],
) -> tuple[torch.Tensor | None, torch.Tensor, list[tuple[int, str]]]:
    """Stack the readable images; pass the unreadable ones on as (index, reason)."""
    good = [(views, index) for views, index, error in items if error is None]
    bad = [(index, error) for _, index, error in items if error is not None]
    # default_collate stacks straight into shared memory inside a worker (no extra copy).
    views = default_collate([v for v, _ in good]) if good else None
    return views, torch.tensor([i for _, i in good], dtype=torch.long), bad


# --------------------------------------------------------------------------- predictor


@dataclass
class Predictions:
    """Probabilities of the readable images (rows follow `indices` into the input list)."""

    probs: torch.Tensor
    indices: list[int]
    unreadable: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return len(self.indices) / self.seconds if self.seconds > 0 else 0.0


class Predictor:
    """Batched class probabilities from a classifier, averaged over test-time augmentations.

    TTA views are the centre crop (or five crops, `crops=5`) and, with `hflip`, their
    mirror images; the softmax of each view is averaged, which is also right for the
    `mean` ensemble fusion (its output is a log-probability).
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: Preprocess,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        num_workers: int | None = 0,
        hflip: bool = False,
        crops: int = 1,
        background: Sequence[int] = (255, 255, 255),
        progress: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.to(self.device).eval()
        self.transform = ViewTransform(preprocess, crops)
        self.batch_size = batch_size
        self.num_workers = default_workers(num_workers)
        self.hflip = hflip
        self.background = tuple(int(v) for v in background)
        self.progress = progress

    def loader(self, files: Sequence[str | Path]) -> DataLoader:
        dataset = ImageFiles(files, self.transform, self.background)
        batches = -(-len(files) // self.batch_size)
        # Workers only pay off when one decodes a batch while the model runs another.
        workers = min(self.num_workers, batches) if batches > 1 else 0
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=workers,
            collate_fn=collate_views,
            pin_memory=self.device.type == "cuda",
        )

    @torch.inference_mode()
    def probabilities(self, views: torch.Tensor) -> torch.Tensor:
        """[B, V, C, H, W] views -> [B, classes] probabilities averaged over views (and flips)."""
        batch, num_views = views.shape[:2]
        x = views.to(self.device, non_blocking=True).flatten(0, 1)
        if self.hflip:
            x = torch.cat([x, x.flip(-1)])
        probs = self.model(x).float().softmax(dim=1)
        return probs.view(-1, batch, num_views, probs.shape[1]).mean(dim=(0, 2))

    def predict(self, files: Sequence[str | Path]) -> Predictions:
        from rich.progress import Progress

        loader = self.loader(files)
        chunks: list[torch.Tensor] = []
        indices: list[int] = []
        unreadable: list[tuple[int, str]] = []
        start = time.perf_counter()
        with Progress(disable=not self.progress, transient=True) as bar:
            task = bar.add_task("predicting", total=len(files))
            for views, index, bad in loader:
                for i, reason in bad:
                    log.warning("cannot read %s: %s", files[i], reason)
                unreadable += bad
                if views is not None:
                    chunks.append(self.probabilities(views).cpu())
                    indices += index.tolist()
                bar.advance(task, len(index) + len(bad))
        seconds = time.perf_counter() - start
        num_classes = chunks[0].shape[1] if chunks else 0
        probs = torch.cat(chunks) if chunks else torch.empty(0, num_classes)
        return Predictions(probs, indices, unreadable, seconds)


def predictor_from_config(loaded: LoadedModel, cfg: DictConfig, **overrides: Any) -> Predictor:
    """The predictor described by an entry config (`device`, `batch_size`, `tta`, ...)."""
    tta = cfg.get("tta") or {}
    options: dict[str, Any] = {
        "device": cfg.get("device", "auto"),
        "batch_size": int(cfg.batch_size),
        "num_workers": cfg.get("num_workers"),
        "hflip": bool(tta.get("hflip", False)),
        "crops": int(tta.get("crops", 1)),
        "progress": bool(cfg.get("progress", False)),
    }
    return Predictor(loaded.model, loaded.preprocess, **{**options, **overrides})


# --------------------------------------------------------------------------- outputs


def predictions_frame(
    names: Sequence[str],
    probs: torch.Tensor,
    class_names: Sequence[str],
    top_k: int = 3,
    reject_threshold: float | None = None,
    unknown_label: str = "unknown",
) -> pd.DataFrame:
    """One row per image: path, label, confidence, top-k labels and probs, `prob_<class>`."""
    classes = list(class_names)
    k = max(1, min(int(top_k), len(classes)))
    top_probs, top_idx = probs.topk(k, dim=1)
    confidence = top_probs[:, 0]
    labels = [classes[i] for i in top_idx[:, 0].tolist()]
    if reject_threshold is not None:
        rejected = (confidence < float(reject_threshold)).tolist()
        labels = [unknown_label if r else label for label, r in zip(labels, rejected, strict=True)]
    columns: dict[str, Any] = {
        "path": list(names),
        "label": labels,
        "confidence": confidence.numpy(),
    }
    for j in range(k):
        columns[f"top{j + 1}_label"] = [classes[i] for i in top_idx[:, j].tolist()]
        columns[f"top{j + 1}_prob"] = top_probs[:, j].numpy()
    for c, name in enumerate(classes):
        columns[f"prob_{name}"] = probs[:, c].numpy()
    return pd.DataFrame(columns)


def write_unreadable(path: Path, names: Sequence[str], unreadable: list[tuple[int, str]]) -> None:
    """`unreadable.csv` (path, reason), written only when some files could not be read."""
    if unreadable:
        rows = [(names[i], reason) for i, reason in unreadable]
        pd.DataFrame(rows, columns=["path", "reason"]).to_csv(path, index=False)
        log.warning("%d unreadable file(s) listed in %s", len(rows), path)


def run_predict(cfg: DictConfig) -> pd.DataFrame:
    """Write `predictions.csv` (and `submission.csv`, `unreadable.csv`) into the run dir."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_checkpoint(cfg.get("ckpt_path"))
    inputs = collect_inputs(cfg.get("input"))
    log.info("Predicting %d image(s) from %s with %s", len(inputs.files), cfg.input, loaded.path)
    result = predictor_from_config(loaded, cfg).predict(inputs.files)
    frame = predictions_frame(
        [inputs.names[i] for i in result.indices],
        result.probs,
        loaded.class_names,
        top_k=cfg.get("top_k", 3),
        reject_threshold=cfg.get("reject_threshold"),
        unknown_label=cfg.get("unknown_label", "unknown"),
    )
    frame.to_csv(out / "predictions.csv", index=False, float_format="%.6g")
    if cfg.get("submission"):
        ids = [inputs.ids[i] for i in result.indices]
        if len(set(ids)) < len(ids):
            log.warning("submission.csv has duplicate ids (same file stem in several folders)")
        submission = pd.DataFrame({"id": ids, "label": frame["label"]})
        submission.to_csv(out / "submission.csv", index=False)
    write_unreadable(out / "unreadable.csv", inputs.names, result.unreadable)
    log.info(
        "%d prediction(s) in %s (%.1f images/s)",
        len(frame),
        out / "predictions.csv",
        result.images_per_second,
    )
    return frame
