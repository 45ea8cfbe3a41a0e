"""Checkpoints written by earlier vision_tl layouts load unchanged: the upgrades live here.

Format 1 (vision_tl 0.1, before the regrouped layout): ensemble fusion weights sat at
`model.heads.*` and `model.fuse.*`; they are now inside the registered fusion module,
at `model.fusion.heads.*` and `model.fusion.fuse.*`.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vision_tl.core.errors import ConfigError

CHECKPOINT_FORMAT = 2
_FORMAT_1_RENAMES = (("model.heads.", "model.fusion.heads."), ("model.fuse.", "model.fusion.fuse."))


def checkpoint_format(checkpoint: dict[str, Any]) -> int:
    return int(checkpoint.get("vision_tl", {}).get("format", 1))


def upgrade_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Rename an older checkpoint's keys in place to the current layout; returns it."""
    if checkpoint_format(checkpoint) >= CHECKPOINT_FORMAT:
        return checkpoint
    state = checkpoint.get("state_dict", {})
    for key in list(state):
        for old, new in _FORMAT_1_RENAMES:
            if key.startswith(old):
                state[new + key[len(old) :]] = state.pop(key)
                break
    checkpoint.setdefault("vision_tl", {})["format"] = CHECKPOINT_FORMAT
    return checkpoint


@dataclass(frozen=True)
class SavedFacts:
    """What a checkpoint's `vision_tl` entry records beside the weights, each field read as
    a file written before it existed means it: the one reader of that entry, for the
    training task and for inference alike."""

    preprocess: dict[str, Any] | None = None  # None: resolve it from the saved model config
    best_epoch: int = -1
    val_acc_best: float | None = None
    probe: dict[str, Any] | None = None
    feature_precision: str = "fp32"
    # What calibration's val check chose for inference (`calibration.bf16_check`), if run.
    inference_precision: str | None = None
    temperature: float = 1.0
    operating_point: dict[str, Any] | None = None
    open_set: dict[str, Any] | None = None

    @property
    def precision(self) -> str:
        """The backbone's precision as training validated it: the val check's choice, else
        the precision its cached features were computed in."""
        return str(self.inference_precision or self.feature_precision)

    @classmethod
    def of(cls, checkpoint: dict[str, Any]) -> SavedFacts:
        meta = checkpoint.get("vision_tl", {})
        return cls(
            preprocess=meta.get("preprocess") or None,
            best_epoch=int(meta.get("best_epoch", -1)),
            val_acc_best=meta.get("val_acc_best"),
            probe=meta.get("probe"),
            feature_precision=str(meta.get("feature_precision", "fp32")),
            inference_precision=meta.get("inference_precision"),
            temperature=float(meta.get("temperature", 1.0)),
            operating_point=meta.get("operating_point"),
            open_set=meta.get("open_set"),
        )


def checkpoint_path(ckpt_path: str | Path | None, key: str = "ckpt_path") -> Path:
    """`ckpt_path` resolved, or a one-line `ConfigError` naming `key` when it is not given
    or is not a file."""
    if not ckpt_path:
        raise ConfigError(f"{key} is required, e.g. {key}=RUN_DIR/checkpoints/best.ckpt")
    path = Path(ckpt_path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{key}={path}: does not exist or is not a file")
    return path


def unloadable(path: Path, err: Exception) -> ConfigError:
    """The one line for a checkpoint that did not load (corrupt, foreign, pickled code)."""
    return ConfigError(
        f"cannot load checkpoint {path}: {_load_failure(path, err)}; "
        "expected a .ckpt written by vision_tl.train"
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
