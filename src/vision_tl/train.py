"""Train a classifier: `python -m vision_tl.train [overrides]` (see README for the options)."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from vision_tl.config import config_dir
from vision_tl.errors import VisionTLError

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run one training job; return the metric a sweeper optimises."""
    from vision_tl.training import run_training

    try:
        metrics = run_training(cfg)
    except VisionTLError as err:
        log.error("%s", err)
        raise SystemExit(f"error: {err}") from None
    value = metrics.get(cfg.get("optimized_metric") or "best_val_acc")
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
