"""A callback that watches a real training run from the inside, for tests that must fail
when the run silently does something else than its config says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


class RunSpy(L.Callback):
    """Write `spy.json` into the run dir: backbone forward calls during fit (after the
    feature cache was built), the autocast state inside the backbone, the trainer's precision
    and the loss function's class weights."""

    def __init__(self) -> None:
        self.calls = 0
        self.autocast: list[str] = []
        self._hooks: list[Any] = []

    def _seen(self, module: torch.nn.Module, inputs: Any) -> None:
        self.calls += 1
        device = inputs[0].device.type if inputs and torch.is_tensor(inputs[0]) else "cpu"
        enabled = torch.is_autocast_enabled(device)
        self.autocast.append(str(torch.get_autocast_dtype(device)) if enabled else "off")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hooks = [b.register_forward_pre_hook(self._seen) for b in pl_module.model.backbones()]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for hook in self._hooks:
            hook.remove()
        weights = pl_module.class_weights
        record = {
            "backbone_calls": self.calls,
            "autocast": sorted(set(self.autocast)),
            "precision": str(trainer.precision),
            "class_weights": None if weights is None else weights.tolist(),
            "feature_inputs": bool(pl_module.feature_inputs),
        }
        Path(trainer.default_root_dir, "spy.json").write_text(json.dumps(record))
