"""Fault injection for sweep tests: a callback that kills its own process, like a preemption."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtEpoch(L.Callback):
    """SIGKILL the process when epoch `epoch` starts, if `VISION_TL_TEST_KILL=1` is set.

    The kill comes after the previous epoch's `last.ckpt` was written, with no chance to
    clean up, as when a cluster preempts a job.
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if os.environ.get("VISION_TL_TEST_KILL") == "1" and trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtEpoch(L.Callback):
    """Send `VISION_TL_TEST_SIGNAL` (TERM or INT) to this process during the first batch
    of epoch `epoch`, mid-step, as SLURM or a user would; nothing when it is not set, so
    the same command line resumes undisturbed."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int
    ) -> None:
        name = os.environ.get("VISION_TL_TEST_SIGNAL")
        if name and trainer.current_epoch == self.epoch and batch_idx == 0:
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
