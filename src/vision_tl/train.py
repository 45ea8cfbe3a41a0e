"""Train a classifier: `python -m vision_tl.train [overrides]` (see README for the options)."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from vision_tl.config import config_dir
from vision_tl.errors import VisionTLError

log = logging.getLogger(__name__)


def find_user_error(err: BaseException | None) -> VisionTLError | None:
    """The user-fixable error behind `err`, if any (Hydra's instantiate wraps them)."""
    while err is not None:
        if isinstance(err, VisionTLError):
            return err
        err = err.__cause__ or err.__context__
    return None


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run one training job; return the metric a sweeper optimises."""
    from vision_tl.training import run_training

    try:
        metrics = run_training(cfg)
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise
        log.error("%s", user_error)
        raise SystemExit(f"error: {user_error}") from None
    value = metrics.get(cfg.get("optimized_metric") or "best_val_acc")
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
