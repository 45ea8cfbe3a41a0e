"""Callbacks that measure what the run reports in metrics.json."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class TrainThroughput(L.Callback):
    """Training images per second, data loading included and validation excluded."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.seconds += now - self._last
            self.images += len(batch[1])
        self._last = now

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0
