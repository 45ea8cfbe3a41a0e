"""Judge a checkpoint on labelled images: `python -m vision_tl.eval ckpt_path=CKPT data.root=D`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vision_tl.core.cli import run_command
from vision_tl.core.config import config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="eval")
def main(cfg: DictConfig) -> float:
    """Write metrics.json, per_class.csv, predictions.csv and PNGs; return top-1 accuracy."""
    from vision_tl.inference.eval import run_eval

    return run_command(run_eval, cfg)["acc"]


if __name__ == "__main__":
    main()
