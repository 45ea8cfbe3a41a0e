"""How checkpoints reach the disk: whole or not at all, in their own folder.

Lightning's `TorchCheckpointIO` saves through fsspec, whose local transaction writes a
temporary file in the system's temp folder and then moves it: on a full run folder the
move leaves a truncated `best.ckpt` behind, and the error names `/tmp/tmpXXXX`. Every
checkpoint vision_tl writes (the Trainer's, through `AtomicCheckpointIO`, and the
calibration's rewrite) goes through `save_checkpoint` instead: serialised in memory, as
Lightning does, then written beside the target and renamed over it (`core.io`).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vision_tl.core.io import write_bytes


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """`torch.save(checkpoint, path)`, atomically: a full disk or a kill midway leaves the
    previous file loadable and no temporary file, and the error names `path`."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    write_bytes(path, buffer.getbuffer())


class AtomicCheckpointIO(TorchCheckpointIO):
    """The Trainer's checkpoint I/O (Lightning's public plugin), saving local files with
    `save_checkpoint`; remote URLs, loading and removing are Lightning's."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: fsspec's
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(checkpoint, path)


def with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """The Trainer's `plugins` (a config's, instantiated) with `AtomicCheckpointIO` added,
    unless they bring a checkpoint I/O of their own."""
    from hydra.utils import instantiate
    from lightning.fabric.plugins import CheckpointIO

    given = instantiate(plugins) if plugins is not None else []
    given = list(given) if isinstance(given, (list, tuple)) else [given]
    if any(isinstance(p, CheckpointIO) for p in given):
        return given
    return [*given, AtomicCheckpointIO()]
