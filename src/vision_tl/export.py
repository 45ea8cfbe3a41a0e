"""Export a checkpoint: `python -m vision_tl.export ckpt_path=CKPT format=onnx|torchscript`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vision_tl.core.cli import run_command
from vision_tl.core.config import config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="export")
def main(cfg: DictConfig) -> None:
    """Write model.onnx or model.pt, and model.json, into the run dir."""
    from vision_tl.inference.export import run_export

    run_command(run_export, cfg)


if __name__ == "__main__":
    main()
