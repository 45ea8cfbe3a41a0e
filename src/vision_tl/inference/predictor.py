"""Batched class probabilities from a classifier, with test-time augmentation, on the same
decode-resize-normalise path as training; and the inputs and outputs of `predict`."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.transforms import v2

from vision_tl.core.engines import (
    Runner,
    compile_forward,
    cores_for,
    engine_for_file,
    resolve_engine,
)
from vision_tl.core.errors import ConfigError
from vision_tl.core.io import printable, write_csv
from vision_tl.core.runtime import (
    available_cpus,
    inference_copy,
    resolve_device,
    resolve_precision,
)
from vision_tl.data.augment import (
    Inputs,
    as_batches,
    eval_transform,
    map_inputs,
    normalize_batch,
    resize_op,
)
from vision_tl.data.decode import IMAGE_EXTENSIONS, ReadLimits, error_line, is_image_file
from vision_tl.data.folder import walk_files
from vision_tl.data.preprocess import AnyPreprocess, EnsemblePreprocess
from vision_tl.inference.checkpoint import ExportedModel, LoadedModel, load_export
from vision_tl.models.classifier import Classifier
from vision_tl.training.binary import OperatingPoint
from vision_tl.training.openset import OpenSet

log = logging.getLogger(__name__)

CROPS = (1, 5)


def default_workers(num_workers: int | None) -> int:
    """Decoding processes: `None` means up to 4, never more than the cores this process has."""
    return min(4, available_cpus()) if num_workers is None else int(num_workers)


# --------------------------------------------------------------------------- inputs


@dataclass
class InputImages:
    """Images to predict: files to read, the path each is reported under, and submission ids."""

    files: list[Path]
    names: list[str]
    ids: list[str]


def collect_inputs(source: str | Path | None) -> InputImages:
    """A folder (image files, recursively, sorted; hidden and system files such as
    `__MACOSX/` skipped, and each real folder walked once, as in training), one image, or
    a CSV with a `path` column.

    Folder images are named relative to the folder; CSV paths are kept as written and
    resolved against the CSV's folder, and an `id` column, if any, gives submission ids.
    Nothing is opened here: a named pipe or device named like an image is listed as
    unreadable when it is read.
    """
    if not source:
        raise ConfigError("input is required: a folder, an image file, or a CSV with a path column")
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(Path(p) for p in walk_files(path, []) if is_image_file(Path(p)))
        if not files:
            extensions = ", ".join(IMAGE_EXTENSIONS)
            raise ConfigError(f"input={path}: holds no image files ({extensions})")
        names = [p.relative_to(path).as_posix() for p in files]
        return InputImages(files, names, [p.stem for p in files])
    if path.suffix.lower() == ".csv" and path.is_file():
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "path" not in frame.columns:
            raise ConfigError(f"input={path}: no 'path' column (columns: {list(frame.columns)})")
        names = frame["path"].tolist()
        files = [path.parent / name for name in names]
        ids = frame["id"].tolist() if "id" in frame.columns else [Path(n).stem for n in names]
        return InputImages(files, names, ids)
    if path.exists():  # one file (a special one is listed as unreadable, not opened)
        return InputImages([path], [str(source)], [path.stem])
    raise ConfigError(f"input={path}: does not exist")


# --------------------------------------------------------------------------- dataset


class ViewTransform:
    """uint8 image -> uint8 views [V, C, S, S]: the eval centre crop, or five crops (corners
    and centre) of the resized image. For an `EnsemblePreprocess`, a tuple of such views,
    one per member, each cut from that member's own resize of the image."""

    def __init__(self, preprocess: AnyPreprocess, crops: int = 1) -> None:
        if crops not in CROPS:
            raise ConfigError(f"tta.crops={crops}: one of {CROPS}")
        self.crops = crops
        self.members: list[ViewTransform] = []
        if isinstance(preprocess, EnsemblePreprocess):
            self.members = [ViewTransform(m, crops) for m in preprocess.members]
            return
        if crops > 1 and preprocess.resize_mode != "crop":
            raise ConfigError(
                f"tta.crops={crops} cuts corners off the image; this checkpoint keeps the "
                f"whole image (resize_mode={preprocess.resize_mode}): use tta.crops=1"
            )
        self.transform = eval_transform(preprocess)
        self.resize = resize_op(preprocess)
        self.five_crop = v2.FiveCrop(preprocess.input_size)

    def __call__(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.members:
            return tuple(member(image) for member in self.members)
        if self.crops == 1:
            return self.transform(image).unsqueeze(0)
        return torch.stack(self.five_crop(self.resize(image)))


class ImageFiles(Dataset):
    """Decode files (as training does) or a source's samples (`reader`: key -> uint8 image)
    to TTA views; an unreadable one yields its error."""

    def __init__(
        self,
        files: Sequence[str | Path],
        preprocess: AnyPreprocess,
        transform: ViewTransform,
        reader: Callable[[Any], torch.Tensor] | None = None,
        limits: ReadLimits | None = None,
    ) -> None:
        self.files = list(files)
        self.read = reader or functools.partial(preprocess.read, limits=limits or ReadLimits())
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str | None]:
        try:
            image = self.read(self.files[index])
            views = self.transform(image)
        except Exception as err:  # any decode failure is reported per file, never fatal
            return None, index, error_line(err)
        return views, index, None


def collate_views(
    items: list[tuple[Inputs | None, int, str | None]],
) -> tuple[Inputs | None, torch.Tensor, list[tuple[int, str]]]:
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
    # With `keep_outputs`: mean logits, and backbone features (None for an exported model).
    logits: torch.Tensor | None = None
    features: torch.Tensor | None = None

    @property
    def images_per_second(self) -> float:
        return len(self.indices) / self.seconds if self.seconds > 0 else 0.0


class Predictor:
    """Batched class probabilities from a classifier, averaged over test-time augmentations.

    TTA views are the centre crop (or five crops, `crops=5`) and, with `hflip`, their
    mirror images; the softmax of each view is averaged, which is also right for the
    `mean` ensemble fusion (its output is a log-probability). Views travel as uint8 and
    are normalised on the device, exactly as training batches are. Logits are divided by
    `temperature` (the checkpoint's calibration) before the softmax. Files are read
    within `limits` (`data.max_file_bytes`, `data.max_image_pixels`), as training reads.

    `engine` runs the network (`core.engines`: `torch`, `openvino`, `onnxruntime`, or
    `auto`); a classifier's backbone runs there in `precision` and its head in float32
    PyTorch, as the feature cache and training ran them. `runner` instead gives a
    compiled forward pass from inputs to logits (an exported model, `predictor_from_export`).
    `batch_size=None` is the engine's fastest on a CPU (8 measured), 32 on a GPU.
    """

    def __init__(
        self,
        model: nn.Module | None,
        preprocess: AnyPreprocess,
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
        num_workers: int | None = 0,
        hflip: bool = False,
        crops: int = 1,
        progress: bool = False,
        precision: str = "fp32",
        temperature: float = 1.0,
        limits: ReadLimits | None = None,
        engine: str = "torch",
        runner: Runner | None = None,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size={batch_size}: a positive integer")
        self.device = resolve_device(device)
        chosen = resolve_engine(engine, self.device)
        # The inference copy (BatchNorms folded in fp32); a classifier's head runs from it.
        self.model: nn.Module | None = None
        self.head: Classifier | None = None
        if runner is None:
            if model is None:
                raise ValueError("a Predictor needs a model or a runner")
            self.model = inference_copy(model, resolve_precision(precision, self.device))
            if isinstance(self.model, Classifier):  # the head runs in float32 PyTorch
                self.head = self.model.to(self.device)
            method = "features" if self.head is not None else "forward"
            runner = compile_forward(self.model, chosen.name, precision, self.device, method)
        self.runner = runner
        self.engine = runner.engine
        if batch_size is None:
            batch_size = chosen.cpu_batch if self.device.type == "cpu" else 32
        self.preprocess = preprocess
        self.transform = ViewTransform(preprocess, crops)
        self.batch_size = batch_size
        self.num_workers = default_workers(num_workers)
        self.hflip = hflip
        self.progress = progress
        if not temperature > 0:
            raise ConfigError(f"temperature={temperature}: a number > 0")
        self.temperature = float(temperature)
        self.limits = limits or ReadLimits()

    def loader(
        self, files: Sequence[str | Path], reader: Callable[[Any], torch.Tensor] | None = None
    ) -> DataLoader:
        dataset = ImageFiles(files, self.preprocess, self.transform, reader, self.limits)
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

    @property
    def precision(self) -> str:
        """What the network computes in (known for sure once the engine has compiled)."""
        return self.runner.precision

    def logits(self, x: Inputs) -> torch.Tensor:
        """A classifier's backbone runs on the engine in `precision` and its head in
        float32, as the feature cache and training ran them; any other module runs whole
        on the engine."""
        return self.outputs(x)[0]

    def outputs(self, x: Inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, backbone features): features only for a classifier (None for an
        exported model, whose file ends in logits)."""
        out = self.runner(*as_batches(x))
        if self.head is None:
            return out.float(), None
        features = out.float().to(self.device)
        return self.head.classify_features(features), features

    @torch.inference_mode()
    def probabilities(self, views: Inputs) -> torch.Tensor:
        """[B, V, C, H, W] views (one such batch per member for an `EnsemblePreprocess`) ->
        [B, classes] probabilities averaged over views (and flips)."""
        return self.view_outputs(views)[0]

    @torch.inference_mode()
    def view_outputs(self, views: Inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Probabilities averaged over views (and flips), and the logits and features
        averaged the same way (what the open-set scores read)."""
        batch, num_views = (views if isinstance(views, torch.Tensor) else views[0]).shape[:2]

        def mean(t: torch.Tensor) -> torch.Tensor:
            return t.view(-1, batch, num_views, t.shape[1]).mean(dim=(0, 2))

        with cores_for(self.runner):
            x = map_inputs(lambda t: t.to(self.device, non_blocking=True).flatten(0, 1), views)
            x = normalize_batch(x, self.preprocess)
            if self.hflip:
                x = map_inputs(lambda t: torch.cat([t, t.flip(-1)]), x)
            logits, features = self.outputs(x)
            logits = logits.float()
            probs = (logits / self.temperature).softmax(1)
            return mean(probs), mean(logits), None if features is None else mean(features)

    def predict(
        self,
        files: Sequence[str | Path],
        reader: Callable[[Any], torch.Tensor] | None = None,
        keep_outputs: bool = False,
    ) -> Predictions:
        """Probabilities of `files` (or of a source's keys, opened by `reader`); with
        `keep_outputs`, their mean logits and backbone features too."""
        from rich.progress import Progress

        loader = self.loader(files, reader)
        chunks: list[torch.Tensor] = []
        kept_logits: list[torch.Tensor] = []
        kept_features: list[torch.Tensor] = []
        indices: list[int] = []
        unreadable: list[tuple[int, str]] = []
        start = time.perf_counter()
        with Progress(disable=not self.progress, transient=True) as bar:
            task = bar.add_task("predicting", total=len(files))
            for views, index, bad in loader:
                for i, reason in bad:
                    log.warning("cannot read %s: %s", printable(str(files[i])), reason)
                unreadable += bad
                if views is not None:
                    probs, logits, features = self.view_outputs(views)
                    chunks.append(probs.cpu())
                    if keep_outputs:
                        kept_logits.append(logits.cpu())
                        if features is not None:
                            kept_features.append(features.cpu())
                    indices += index.tolist()
                bar.advance(task, len(index) + len(bad))
        seconds = time.perf_counter() - start
        num_classes = chunks[0].shape[1] if chunks else 0
        probs = torch.cat(chunks) if chunks else torch.empty(0, num_classes)
        result = Predictions(probs, indices, unreadable, seconds)
        if keep_outputs:
            result.logits = torch.cat(kept_logits) if kept_logits else probs.clone()
            result.features = torch.cat(kept_features) if kept_features else None
        return result


def predictor_from_config(
    loaded: LoadedModel, cfg: DictConfig, measured: bool = False
) -> Predictor:
    """The predictor described by an entry config (`device`, `batch_size`, `tta`, ...).

    `precision=auto` runs the backbone as training validated it: bf16 for a probe whose
    features were cached in bf16 or a fine-tune whose val check chose bf16, else fp32;
    with `measured` (eval), in the precision training's val accuracy was measured in, so
    eval reproduces it; `bf16` or `fp32` force it. Files are read within
    `data.max_file_bytes` and `data.max_image_pixels`, as training reads them."""
    precision = str(cfg.get("precision") or "auto")
    if precision == "auto":
        precision = loaded.val_precision if measured else loaded.precision
    return Predictor(
        loaded.model,
        loaded.preprocess,
        precision=precision,
        temperature=loaded.temperature if cfg.get("calibrate", True) else 1.0,
        engine=engine_setting(cfg),
        **loading_settings(cfg),
    )


def engine_setting(cfg: DictConfig) -> str:
    """`inference.engine` (absent: auto)."""
    return str((cfg.get("inference") or {}).get("engine") or "auto")


def run_settings(cfg: DictConfig) -> DictConfig:
    """A predict config for a training config's images: its batch size, loader workers
    and read limits, on the best device, without a progress bar (cross-validation's
    out-of-fold predictions, a pseudo-labelling teacher)."""
    return OmegaConf.create(
        {
            "batch_size": int(cfg.data.batch_size),
            "num_workers": cfg.data.get("num_workers"),
            "device": "auto",
            "progress": False,
            "data": {
                "max_file_bytes": cfg.data.get("max_file_bytes"),
                "max_image_pixels": cfg.data.get("max_image_pixels"),
            },
        }
    )


def loading_settings(cfg: DictConfig) -> dict[str, Any]:
    """The Predictor's settings an entry config gives for any model: device, batch,
    workers, TTA, progress bar and read limits."""
    tta = cfg.get("tta") or {}
    batch_size = cfg.get("batch_size")
    return {
        "device": cfg.get("device", "auto"),
        "batch_size": None if batch_size is None else int(batch_size),
        "num_workers": cfg.get("num_workers"),
        "hflip": bool(tta.get("hflip", False)),
        "crops": int(tta.get("crops", 1)),
        "progress": bool(cfg.get("progress", False)),
        "limits": ReadLimits.from_config(cfg.get("data")),
    }


def predictor_from_export(exported: ExportedModel | str | Path, cfg: DictConfig) -> Predictor:
    """A predictor whose network is an exported model (a folder written by
    `python -m vision_tl.export`), run by the engine its `model.json` names (or
    `inference.engine`), with the card's preprocessing and calibration temperature; the
    class names and threshold are on `load_export`'s result. On the CPU only."""
    if not isinstance(exported, ExportedModel):
        exported = load_export(exported)
    name = engine_setting(cfg)
    engine = engine_for_file(exported.file, exported.engine if name == "auto" else name)
    settings = {**loading_settings(cfg), "device": "cpu"}
    if settings["batch_size"] is None:
        settings["batch_size"] = engine.cpu_batch
    return Predictor(
        None,
        exported.preprocess,
        runner=engine.load(exported.file, exported.precision),
        temperature=exported.temperature if cfg.get("calibrate", True) else 1.0,
        **settings,
    )


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class Labelled:
    """Each image's label and its top-k (indices and probabilities, most probable first)."""

    labels: list[str]
    top_probs: torch.Tensor  # [N, k]
    top_idx: torch.Tensor  # [N, k]


@dataclass(frozen=True)
class LabelRule:
    """How a row of probabilities becomes a label, the one rule `predict`'s rows and
    `serve`'s answers follow: the most probable class; with a binary `operating_point`, the
    positive class when its probability reaches the fitted threshold; `unknown_label` below
    `reject_threshold` or below `open_set_threshold` (scores given)."""

    top_k: int = 3
    reject_threshold: float | None = None
    unknown_label: str = "unknown"
    operating_point: OperatingPoint | None = None
    open_set_threshold: float | None = None

    @classmethod
    def from_config(
        cls,
        cfg: DictConfig,
        operating_point: OperatingPoint | None,
        open_set: OpenSet | None,
    ) -> LabelRule:
        """The rule an entry config asks for (`top_k`, `reject_threshold`, `unknown_label`,
        `apply_operating_point`), with the model's operating point and open-set detector
        (None: not applied)."""
        reject = cfg.get("reject_threshold")
        return cls(
            top_k=int(cfg.get("top_k", 3)),
            reject_threshold=None if reject is None else float(reject),
            unknown_label=str(cfg.get("unknown_label", "unknown")),
            operating_point=operating_point if cfg.get("apply_operating_point", True) else None,
            open_set_threshold=None if open_set is None else open_set.threshold,
        )

    def apply(
        self,
        probs: torch.Tensor,
        class_names: Sequence[str],
        open_set_scores: torch.Tensor | None = None,
    ) -> Labelled:
        classes = list(class_names)
        top_probs, top_idx = probs.topk(max(1, min(int(self.top_k), len(classes))), dim=1)
        labels = [classes[i] for i in top_idx[:, 0].tolist()]
        if self.operating_point is not None:
            labels = self.operating_point.labels(probs, classes)
        rejected = [False] * len(labels)
        if self.reject_threshold is not None:
            rejected = (top_probs[:, 0] < float(self.reject_threshold)).tolist()
        if open_set_scores is not None and self.open_set_threshold is not None:
            below = (open_set_scores < self.open_set_threshold).tolist()
            rejected = [a or b for a, b in zip(rejected, below, strict=True)]
        unknown = self.unknown_label
        labels = [unknown if r else label for label, r in zip(labels, rejected, strict=True)]
        return Labelled(labels, top_probs, top_idx)


def predictions_frame(
    names: Sequence[str],
    probs: torch.Tensor,
    class_names: Sequence[str],
    rule: LabelRule = LabelRule(),
    open_set_scores: torch.Tensor | None = None,
) -> pd.DataFrame:
    """One row per image: path, label (by `rule`), confidence, top-k labels and probs,
    `prob_<class>`; with open-set scores, an `open_set_score` column last."""
    classes = list(class_names)
    done = rule.apply(probs, classes, open_set_scores)
    columns: dict[str, Any] = {
        "path": list(names),
        "label": done.labels,
        "confidence": done.top_probs[:, 0].numpy(),
    }
    for j in range(done.top_idx.shape[1]):
        columns[f"top{j + 1}_label"] = [classes[i] for i in done.top_idx[:, j].tolist()]
        columns[f"top{j + 1}_prob"] = done.top_probs[:, j].numpy()
    for c, name in enumerate(classes):
        columns[f"prob_{name}"] = probs[:, c].numpy()
    if open_set_scores is not None:  # last: the columns before keep their places
        columns["open_set_score"] = open_set_scores.numpy()
    return pd.DataFrame(columns)


def write_unreadable(path: Path, names: Sequence[str], unreadable: list[tuple[int, str]]) -> None:
    """`unreadable.csv` (path, reason), written only when some files could not be read."""
    if unreadable:
        rows = [(names[i], reason) for i, reason in unreadable]
        write_csv(pd.DataFrame(rows, columns=["path", "reason"]), path, index=False)
        log.warning("%d unreadable file(s) listed in %s", len(rows), path)
