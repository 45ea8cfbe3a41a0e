"""What every `python -m vision_tl.<command>` entry point shares."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from omegaconf import DictConfig

from vision_tl.core.errors import find_user_error

log = logging.getLogger(__name__)

T = TypeVar("T")


def run_command(work: Callable[..., T], cfg: DictConfig, *args: Any) -> T:
    """Run `work(cfg, *args)`; an error the user can fix exits with one line, not a traceback."""
    try:
        return work(cfg, *args)
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise
        log.error("%s", user_error)
        raise SystemExit(f"error: {user_error}") from None
