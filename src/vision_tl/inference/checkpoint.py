"""Load a `vision_tl.train` checkpoint for inference: safely, on the CPU, with its preprocessing."""

from __future__ import annotations

import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vision_tl.core.errors import ConfigError
from vision_tl.data.preprocess import AnyPreprocess
from vision_tl.models.classifier import Classifier


@dataclass
class LoadedModel:
    """A network ready for inference, with the class names and preprocessing it was trained on."""

    model: Classifier
    class_names: list[str]
    preprocess: AnyPreprocess  # per member for an ensemble whose members need different pixels
    path: Path
    # The backbone's precision when training validated (bf16 for features cached in bf16).
    precision: str = "fp32"
    # The calibration temperature fitted after training (1.0 for older checkpoints).
    temperature: float = 1.0


def load_checkpoint(ckpt_path: str | Path | None) -> LoadedModel:
    """Load a checkpoint on the CPU, weights only (no pickled code runs).

    Checkpoints of earlier layouts are upgraded on load (`vision_tl.training.compat`). A
    missing, corrupt or foreign file is a one-line `ConfigError`, not a traceback.
    """
    from vision_tl.training.task import ClassificationTask

    if not ckpt_path:
        raise ConfigError("ckpt_path is required, e.g. ckpt_path=RUN_DIR/checkpoints/best.ckpt")
    path = Path(ckpt_path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={path}: does not exist or is not a file")
    try:
        task = ClassificationTask.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(
            f"cannot load checkpoint {path}: {_load_failure(path, err)}; "
            "expected a .ckpt written by vision_tl.train"
        ) from err
    model = task.model.eval()
    return LoadedModel(
        model,
        list(task.class_names),
        task.preprocess,
        path,
        task.feature_precision,
        task.temperature,
    )


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
