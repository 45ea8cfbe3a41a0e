"""Train a classifier: `python -m vision_tl.train [overrides]` (see README for the options)."""

from __future__ import annotations

import math

import hydra
from omegaconf import DictConfig

from vision_tl.cli import run_command
from vision_tl.config import config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run one training job; return the metric a sweeper optimises (NaN for a failed job)."""
    from vision_tl.sweep import run_job

    metrics = run_command(run_job, cfg)
    value = metrics.get(cfg.get("optimized_metric") or "best_val_acc")
    return float(value) if value is not None else math.nan


if __name__ == "__main__":
    main()
