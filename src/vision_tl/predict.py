"""Predict unlabelled images: `python -m vision_tl.predict ckpt_path=CKPT input=DIR`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vision_tl.core.cli import run_command
from vision_tl.core.config import config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="predict")
def main(cfg: DictConfig) -> None:
    """Write predictions.csv (and submission.csv, unreadable.csv) into the run dir."""
    from vision_tl.inference.predict import run_predict

    run_command(run_predict, cfg)


if __name__ == "__main__":
    main()
