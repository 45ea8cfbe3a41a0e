"""Train a classifier: `python -m vision_tl.train [overrides]` (see README for the options)."""

from __future__ import annotations

import logging
import math

import hydra
from omegaconf import DictConfig

from vision_tl.config import config_dir
from vision_tl.errors import find_user_error

__all__ = ["find_user_error", "main"]

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run one training job; return the metric a sweeper optimises (NaN for a failed job)."""
    from vision_tl.sweep import run_job

    try:
        metrics = run_job(cfg)
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise
        log.error("%s", user_error)
        raise SystemExit(f"error: {user_error}") from None
    value = metrics.get(cfg.get("optimized_metric") or "best_val_acc")
    return float(value) if value is not None else math.nan


if __name__ == "__main__":
    main()
