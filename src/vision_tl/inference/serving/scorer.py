"""Image bytes in, calibrated class probabilities out: what `serve` runs for each upload,
on the decode path and the `Predictor` that `predict` uses, so both give one answer.

`build_scorer(cfg)` is the one place a served model is made: a checkpoint (`ckpt_path=`)
or an export folder (`model_path=`, run by the engine its `model.json` names).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError
from torch.utils.data import default_collate

from vision_tl.core.engines import cores_for
from vision_tl.core.errors import ConfigError, error_line
from vision_tl.data.decode import ImageTooLarge, ReadLimits, too_large
from vision_tl.inference.checkpoint import load_checkpoint, load_export
from vision_tl.inference.predictor import (
    LabelRule,
    Predictor,
    engine_setting,
    predictor_from_config,
    predictor_from_export,
)
from vision_tl.training.openset import OpenSet

# One image's views as they travel from the HTTP process to the model's: uint8 arrays
# [V, C, S, S] (one per member for an ensemble whose members need different pixels).
# numpy, not torch: a queue pickles arrays by value, where torch would share memory.
Views = np.ndarray | tuple[np.ndarray, ...]


class Refused(ValueError):
    """An upload the server will not score: the HTTP status and the one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Answer:
    """What the client reads for one image (JSON-ready via `to_dict`)."""

    name: str | None
    label: str
    confidence: float
    unknown: bool
    top_k: list[tuple[str, float]]
    probs: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "confidence": self.confidence,
            "unknown": self.unknown,
            "top_k": [{"label": label, "prob": prob} for label, prob in self.top_k],
            "probs": self.probs,
        }


class Scorer:
    """Decode an upload as `predict` decodes a file (`Preprocess.read` within the read
    limits, then the predictor's views), score a batch of such views with the
    `Predictor`, and answer as `predict` labels its rows (`rule`: top-k, a binary model's
    operating point, `reject_threshold`, the open-set threshold the model carries).

    Uploads are refused before any pixel is decoded when the header says the image is
    smaller than `min_side` on a side or has more pixels than `limits.max_pixels`.
    """

    def __init__(
        self,
        predictor: Predictor,
        class_names: Sequence[str],
        info: dict[str, Any],
        rule: LabelRule,
        min_side: int = 16,
        open_set: OpenSet | None = None,
    ) -> None:
        self.predictor = predictor
        self.open_set = open_set
        self.class_names = list(class_names)
        self.info = info
        self.min_side = int(min_side)
        self.rule = rule

    @property
    def limits(self) -> ReadLimits:
        return self.predictor.limits

    def check_header(self, data: bytes) -> None:
        """Refuse what is not an image, or is too small or too large, from the header."""
        if not data:
            raise Refused(400, "empty body: send the image's bytes")
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Image.DecompressionBombError as err:  # Pillow's own, at twice its threshold
            raise Refused(413, f"too large to decode safely: {error_line(err)}") from None
        except UnidentifiedImageError:
            raise Refused(422, "not an image that Pillow can identify") from None
        except (OSError, ValueError) as err:
            raise Refused(422, f"not a readable image: {error_line(err)}") from None
        if width * height > self.limits.max_pixels:
            raise Refused(413, too_large(width, height, self.limits.max_pixels))
        if min(width, height) < self.min_side:
            raise Refused(
                422, f"image is {width}x{height}: smaller than serve.min_side={self.min_side} px"
            )

    def decode(self, data: bytes) -> Views:
        """The views of one upload, or `Refused` (422 for an undecodable image: truncated,
        corrupt; 413 for one over `data.max_image_pixels`)."""
        self.check_header(data)
        try:
            image = self.predictor.preprocess.read(io.BytesIO(data), self.limits)
            views = self.predictor.transform(image)
        except ImageTooLarge as err:
            raise Refused(413, str(err)) from None
        except Exception as err:  # any decode failure is the upload's, never the server's
            raise Refused(422, f"cannot decode the image: {error_line(err)}") from None
        if isinstance(views, tuple):
            return tuple(v.numpy() for v in views)
        return views.numpy()

    def rows(self, batch: Sequence[Views]) -> torch.Tensor:
        """One row per image of `batch`: its calibrated class probabilities, then, when the
        model has an open-set detector, its open-set score (what `answers` reads)."""
        tensors = [
            tuple(torch.from_numpy(v) for v in views)
            if isinstance(views, tuple)
            else torch.from_numpy(views)
            for views in batch
        ]
        with cores_for(self.predictor.runner):
            probs, logits, features = self.predictor.view_outputs(default_collate(tensors))
            if self.open_set is None:
                return probs.cpu()
            scores = self.open_set.scores(features, logits, self.predictor.temperature)
            return torch.cat([probs, scores.to(probs)[:, None]], dim=1).cpu()

    def answers(self, names: Sequence[str | None], rows: np.ndarray) -> list[Answer]:
        """One answer per image (`rows` from `rows`), labelled as `predict` labels its rows."""
        values = torch.as_tensor(rows, dtype=torch.float32)
        probs = values[:, : len(self.class_names)]
        scores = None if self.open_set is None else values[:, len(self.class_names)]
        done = self.rule.apply(probs, self.class_names, scores)
        tops = zip(done.top_idx.tolist(), done.top_probs.tolist(), strict=True)
        return [
            Answer(
                name=name,
                label=label,
                confidence=top_probs[0],
                unknown=label == self.rule.unknown_label,
                top_k=[(self.class_names[i], p) for i, p in zip(top_idx, top_probs, strict=True)],
                probs=dict(zip(self.class_names, row, strict=True)),
            )
            for name, label, (top_idx, top_probs), row in zip(
                names, done.labels, tops, probs.tolist(), strict=True
            )
        ]


def file_digest(path: Path) -> str:
    """`sha256:` and the first 12 hex digits of the file: the model version `/info` shows."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()[:12]}"


def build_scorer(cfg: DictConfig | dict[str, Any]) -> Scorer:
    """The scorer an entry config describes (`ckpt_path` or an export folder's
    `model_path`, `precision`, `calibrate`, `inference.engine`, `top_k`,
    `reject_threshold`, `data.max_image_pixels`, `serve.*`): the one place a served model
    is made."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    if cfg.get("model_path") and cfg.get("ckpt_path"):
        raise ConfigError("give ckpt_path or model_path, not both")
    serve = cfg.get("serve") or {}
    max_body = int(serve.get("max_body_bytes") or ReadLimits().max_file_bytes)
    data = cfg.get("data") or {}
    predictor_cfg = OmegaConf.create(
        {
            "device": cfg.get("device", "auto"),
            "batch_size": int(serve.get("max_batch_size") or 1),
            "num_workers": 0,
            "tta": OmegaConf.to_container(cfg.tta) if cfg.get("tta") else {},
            "precision": cfg.get("precision", "auto"),
            "calibrate": cfg.get("calibrate", True),
            "inference": {"engine": engine_setting(cfg)},
            "progress": False,
            "data": {
                "max_file_bytes": max_body,
                "max_image_pixels": data.get("max_image_pixels"),
            },
        }
    )
    if cfg.get("model_path"):  # an export folder (python -m vision_tl.export)
        exported = load_export(cfg.model_path)
        predictor = predictor_from_export(exported, predictor_cfg)
        class_names, preprocess = exported.class_names, exported.preprocess
        described = {"model": str(exported.file), "backbones": exported.card.get("backbones")}
        version = file_digest(exported.file)
        open_set, operating_point = exported.open_set, exported.operating_point
    else:
        loaded = load_checkpoint(cfg.get("ckpt_path"))
        predictor = predictor_from_config(loaded, predictor_cfg)
        class_names, preprocess = loaded.class_names, loaded.preprocess
        described = {
            "checkpoint": str(loaded.path),
            "backbones": [b.name for b in loaded.model.backbones()],
        }
        version = file_digest(loaded.path)
        open_set, operating_point = loaded.open_set, loaded.operating_point
    if not cfg.get("apply_open_set", True):
        open_set = None
    rule = LabelRule.from_config(cfg, operating_point, open_set)
    info = {
        "classes": class_names,
        "preprocessing": preprocess.to_dict(),
        "version": version,
        **described,
        "engine": predictor.engine,
        "precision": predictor.precision,
        "device": str(predictor.device),
        "temperature": predictor.temperature,
        "tta": {"hflip": predictor.hflip, "crops": predictor.transform.crops},
        "top_k": rule.top_k,
        "reject_threshold": rule.reject_threshold,
        "operating_point": None if rule.operating_point is None else rule.operating_point.as_dict(),
        "open_set": None
        if open_set is None
        else {"kind": open_set.kind, "threshold": open_set.threshold},
        "unknown_label": rule.unknown_label,
        "limits": {
            "max_body_bytes": max_body,
            "max_image_pixels": predictor.limits.max_pixels,
            "min_side": int(serve.get("min_side", 16)),
            "max_images": int(serve.get("max_images", 16)),
        },
    }
    return Scorer(predictor, class_names, info, rule, info["limits"]["min_side"], open_set)
