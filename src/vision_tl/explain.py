"""Grad-CAM overlays: `python -m vision_tl.explain ckpt_path=CKPT input=DIR [target=CLASS]`."""

from __future__ import annotations

from omegaconf import DictConfig

from vision_tl.core.cli import command, run_command


@command("explain")
def main(cfg: DictConfig) -> None:
    """Write one overlay PNG per image (per member for an ensemble) and explanations.csv."""
    from vision_tl.inference.explain import run_explain

    run_command(run_explain, cfg)


if __name__ == "__main__":
    main()
