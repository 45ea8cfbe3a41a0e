"""A checkpoint run over a pool of unlabelled images: probabilities, backbone features and
open-set flags, what `discover`, `suggest` and pseudo-labelling read.

A pool is what `predict` takes as `input` (a folder, one image, a CSV with a `path`
column), or a `predict` run's `predictions.csv`: then only the rows it labelled
`unknown_label` are the pool, already judged, with paths resolved against that run's
`input` folder (its `.hydra/config.yaml`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from vision_tl.core.errors import ConfigError
from vision_tl.inference.checkpoint import LoadedModel
from vision_tl.inference.predictor import InputImages, Predictor, collect_inputs

log = logging.getLogger(__name__)


@dataclass
class Pool:
    """The readable pool images (`files`, reported as `names`) with the checkpoint's
    calibrated probabilities, features and open-set flags (True: unknown)."""

    files: list[Path]
    names: list[str]
    probs: torch.Tensor
    features: torch.Tensor
    unknown: torch.Tensor

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, mask: torch.Tensor) -> Pool:
        rows = mask.nonzero().flatten().tolist()
        return Pool(
            [self.files[i] for i in rows],
            [self.names[i] for i in rows],
            self.probs[rows],
            self.features[rows],
            self.unknown[rows],
        )


def pool_inputs(
    spec: str | Path | None, unknown_label: str = "unknown"
) -> tuple[InputImages, bool]:
    """The pool's images, and whether they are already flagged unknown (a predict run's
    `predictions.csv`)."""
    path = Path(str(spec)).expanduser() if spec else None
    if path is not None and path.suffix.lower() == ".csv" and path.is_file():
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        if {"path", "label", "confidence"} <= set(frame.columns):  # written by predict
            names = frame.loc[frame["label"] == unknown_label, "path"].tolist()
            if not names:
                raise ConfigError(f"input={path}: no image labelled '{unknown_label}' in it")
            base = _predict_input(path) or path.parent
            files = [base / name for name in names]
            return InputImages(files, names, [Path(n).stem for n in names]), True
    return collect_inputs(spec), False


def _predict_input(predictions: Path) -> Path | None:
    """The folder a predict run read, from its `.hydra/config.yaml`, when it was a folder."""
    config = predictions.parent / ".hydra" / "config.yaml"
    if not config.is_file():
        return None
    given = OmegaConf.load(config).get("input")
    folder = Path(str(given)).expanduser() if given else None
    return folder if folder is not None and folder.is_dir() else None


def run_pool(
    loaded: LoadedModel, predictor: Predictor, cfg: DictConfig, need_flags: bool = True
) -> Pool:
    """Run the checkpoint over `cfg.input`'s images; flag the unknown ones by its open-set
    detector (a predict run's unknown rows are all flagged already)."""
    inputs, flagged = pool_inputs(cfg.get("input"), str(cfg.get("unknown_label", "unknown")))
    log.info("Reading %d pool image(s) from %s", len(inputs.files), cfg.get("input"))
    result = predictor.predict(inputs.files, keep_outputs=True)  # warns of unreadable files
    if not result.indices:
        raise ConfigError(f"input={cfg.get('input')}: none of its images could be read")
    if result.features is None:
        raise ConfigError("this command needs a checkpoint (ckpt_path), not an exported model")
    files = [inputs.files[i] for i in result.indices]
    names = [inputs.names[i] for i in result.indices]
    detector = loaded.open_set
    if flagged:
        unknown = torch.ones(len(files), dtype=torch.bool)
    elif detector is not None:
        assert result.logits is not None
        unknown = detector.unknown(result.features, result.logits, predictor.temperature)
    elif need_flags:
        raise ConfigError(
            f"{loaded.path}: has no open-set threshold (trained with open_set.score=null); "
            "train again with the default open_set.score=auto"
        )
    else:
        unknown = torch.zeros(len(files), dtype=torch.bool)
    return Pool(files, names, result.probs, result.features, unknown)
