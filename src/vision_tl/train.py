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
    from vision_tl.sweeps.cv import run_cv
    from vision_tl.sweeps.jobs import run_job
    from vision_tl.sweeps.pseudo_label import run_pseudo_label
    from vision_tl.sweeps.study import open_job_trial
    from vision_tl.training.train import run_training

    job = partial(run_training, predict=predict_for_run, open_trial=open_job_trial)
    if (cfg.get("cv") or {}).get("folds"):  # K runs and their summary, told to a trial once
        fold = partial(run_training, predict=predict_for_run)
        job = partial(run_cv, train=fold, predict=predict_for_run)
    if cfg.get("semi"):  # rounds of training, each on more pseudo-labelled images
        job = partial(run_pseudo_label, train=partial(run_training, predict=predict_for_run))
    metrics = run_command(run_job, cfg, job)
    value = metrics.get(cfg.get("optimized_metric") or "best_val_acc")
    return float(value) if value is not None else math.nan


if __name__ == "__main__":
    main()
