"""Train a classifier: `python -m vision_tl.train [overrides]` (see README for the options)."""

from __future__ import annotations

import math
from functools import partial

from omegaconf import DictConfig

from vision_tl.core.cli import command, run_command


@command("train")
def main(cfg: DictConfig) -> float | None:
    """Run one training job (`training.train.run_training`), as a resumable, contained job
    inside a sweep (`sweeps.jobs.run_job`); return the metric a sweeper optimises (NaN
    for a failed job)."""
    from vision_tl.inference.predict import predict_for_run
    from vision_tl.sweeps.jobs import run_job
    from vision_tl.sweeps.study import open_job_trial
    from vision_tl.training.train import run_training

    work = partial(run_training, predict=predict_for_run, open_trial=open_job_trial)
    metrics = run_command(run_job, cfg, work)
    value = metrics.get(cfg.get("optimized_metric") or "best_val_acc")
    return float(value) if value is not None else math.nan


if __name__ == "__main__":
    main()
