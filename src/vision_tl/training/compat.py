"""Checkpoints written by earlier vision_tl layouts load unchanged: the upgrades live here.

Format 1 (vision_tl 0.1, before the regrouped layout): ensemble fusion weights sat at
`model.heads.*` and `model.fuse.*`; they are now inside the registered fusion module,
at `model.fusion.heads.*` and `model.fusion.fuse.*`.
"""

from __future__ import annotations

from typing import Any

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
