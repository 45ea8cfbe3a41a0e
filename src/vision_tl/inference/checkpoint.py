"""Load a `vision_tl.train` checkpoint for inference: safely, on the CPU, with its preprocessing.

Inference reads the network, its classes and what was fitted after training straight from
the file, without the training task: `predict`, `eval` and `serve` then start without
importing Lightning and torchmetrics (~2.4 s of a `predict` process here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vision_tl.core.errors import ConfigError
from vision_tl.core.io import read_json
from vision_tl.data.preprocess import AnyPreprocess, EnsemblePreprocess, Preprocess, load_preprocess
from vision_tl.models.classifier import Classifier, build_model
from vision_tl.training.binary import OperatingPoint
from vision_tl.training.compat import (
    SavedFacts,
    checkpoint_path,
    unloadable,
    upgrade_checkpoint,
)
from vision_tl.training.openset import OpenSet

# The network's weights in a checkpoint's `state_dict` (the training task's `model`).
_NETWORK = "model."


@dataclass
class LoadedModel:
    """A network ready for inference, with the class names and preprocessing it was trained on."""

    model: Classifier
    class_names: list[str]
    preprocess: AnyPreprocess  # per member for an ensemble whose members need different pixels
    path: Path
    # The backbone's precision as training validated it (`SavedFacts.precision`): what
    # predict and serve run it in.
    precision: str = "fp32"
    # The precision training's val accuracy was measured in: what eval runs it in.
    val_precision: str = "fp32"
    # The calibration temperature fitted after training (1.0 for older checkpoints).
    temperature: float = 1.0
    # A two-class threshold fitted on val (`training.binary.OperatingPoint`), or None.
    operating_point: OperatingPoint | None = None
    # The open-set detector fitted after training (`training.openset.OpenSet`), or None.
    open_set: OpenSet | None = None


def load_checkpoint(ckpt_path: str | Path | None) -> LoadedModel:
    """Load a checkpoint on the CPU, weights only (no pickled code runs).

    Checkpoints of earlier layouts are upgraded on load (`vision_tl.training.compat`). A
    missing, corrupt or foreign file is a one-line `ConfigError`, not a traceback. The
    network is built with random weights and given the checkpoint's, whatever its saved
    settings say: loading never downloads or reads another file.
    """
    path = checkpoint_path(ckpt_path)
    try:  # every read of the file's contents: a malformed entry is the same one line
        checkpoint = upgrade_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
        saved, facts = checkpoint["hyper_parameters"], SavedFacts.of(checkpoint)
        class_names = [str(name) for name in saved["class_names"]]
        model = build_model(saved["model"], len(class_names), pretrained=False)
        weights = {
            key[len(_NETWORK) :]: value
            for key, value in checkpoint["state_dict"].items()
            if key.startswith(_NETWORK)
        }
        model.load_state_dict(weights)
        if facts.preprocess:
            preprocess = load_preprocess(facts.preprocess)
        else:  # written before the resolved preprocessing was saved
            preprocess = model.preprocess.resolve(saved.get("preprocess_overrides"))
        return LoadedModel(
            model.eval(),
            class_names,
            preprocess,
            path,
            facts.precision,
            facts.feature_precision,
            facts.temperature,
            OperatingPoint.from_dict(facts.operating_point),
            OpenSet.from_dict(facts.open_set),
        )
    except ConfigError:
        raise
    except Exception as err:
        raise unloadable(path, err) from err


def check_class_names(ckpt: Sequence[str], data: Sequence[str], where: str) -> None:
    """Fail when the data's classes differ from the checkpoint's: indices would be wrong."""
    if list(ckpt) != list(data):
        raise ConfigError(
            f"class list mismatch: the checkpoint has {list(ckpt)} but {where} has {list(data)}"
        )


@dataclass
class ExportedModel:
    """A folder written by `python -m vision_tl.export`, as its `model.json` describes it:
    the model file, the engine and precision it runs in, and what a checkpoint would give."""

    file: Path
    class_names: list[str]
    preprocess: AnyPreprocess
    engine: str  # auto: any installed engine that reads the file
    precision: str  # fp32, bf16 (where native), int8
    temperature: float
    card: dict[str, Any]
    open_set: OpenSet | None = None  # a logit-only score and its threshold
    operating_point: OperatingPoint | None = None


def load_export(folder: str | Path | None) -> ExportedModel:
    """Read an export folder's `model.json` (one-line errors for a missing or foreign one)."""
    if not folder:
        raise ConfigError("model_path is required: a folder written by python -m vision_tl.export")
    root = Path(folder).expanduser()
    card_path = root / "model.json"
    if not card_path.is_file():
        raise ConfigError(f"model_path={root}: no model.json (not an export folder)")
    card = read_json(card_path)
    if not isinstance(card, dict) or "file" not in card or "class_names" not in card:
        raise ConfigError(f"{card_path}: not a vision_tl export card (no file or class_names)")
    file = root / str(card["file"])
    if not file.is_file():
        raise ConfigError(f"model_path={root}: the model file {card['file']} is missing")
    if "inputs" in card:
        preprocess: AnyPreprocess = EnsemblePreprocess(
            tuple(Preprocess.from_dict(entry) for entry in card["inputs"])
        )
    else:
        preprocess = Preprocess.from_dict(card)
    needs = card.get("runtime") or {}
    return ExportedModel(
        file,
        [str(c) for c in card["class_names"]],
        preprocess,
        str(needs.get("engine", "auto")),
        str(needs.get("precision", "fp32")),
        float(card.get("temperature") or 1.0),
        card,
        OpenSet.from_dict(card.get("open_set")),
        OperatingPoint.from_dict(card.get("operating_point")),
    )
