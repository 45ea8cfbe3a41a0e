"""Load a `vision_tl.train` checkpoint for inference: safely, on the CPU, with its preprocessing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vision_tl.core.errors import ConfigError
from vision_tl.data.preprocess import AnyPreprocess
from vision_tl.models.classifier import Classifier
from vision_tl.training.binary import OperatingPoint
from vision_tl.training.task import load_task


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
    # A two-class threshold fitted on val (`training.binary.OperatingPoint`), or None.
    operating_point: OperatingPoint | None = None


def load_checkpoint(ckpt_path: str | Path | None) -> LoadedModel:
    """Load a checkpoint on the CPU, weights only (no pickled code runs).

    Checkpoints of earlier layouts are upgraded on load (`vision_tl.training.compat`). A
    missing, corrupt or foreign file is a one-line `ConfigError`, not a traceback.
    """
    task = load_task(ckpt_path)
    model = task.model.eval()
    return LoadedModel(
        model,
        list(task.class_names),
        task.preprocess,
        Path(ckpt_path).expanduser().resolve(),  # type: ignore[arg-type]
        task.feature_precision,
        task.temperature,
        OperatingPoint.from_dict(task.operating_point),
    )


def check_class_names(ckpt: Sequence[str], data: Sequence[str], where: str) -> None:
    """Fail when the data's classes differ from the checkpoint's: indices would be wrong."""
    if list(ckpt) != list(data):
        raise ConfigError(
            f"class list mismatch: the checkpoint has {list(ckpt)} but {where} has {list(data)}"
        )
