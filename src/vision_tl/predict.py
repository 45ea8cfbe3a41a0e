"""Predict unlabelled images: `python -m vision_tl.predict ckpt_path=CKPT input=DIR`."""

from __future__ import annotations

from omegaconf import DictConfig

from vision_tl.core.cli import command, run_as_program, run_command


@command("predict")
def main(cfg: DictConfig) -> None:
    """Write predictions.csv (and submission.csv, unreadable.csv) into the run dir."""
    from vision_tl.inference.predict import run_predict

    run_command(run_predict, cfg)


if __name__ == "__main__":
    run_as_program(main)
