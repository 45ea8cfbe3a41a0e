"""Which unlabelled images to label next:
`python -m vision_tl.suggest ckpt_path=CKPT input=POOL k=60` (label_next.csv)."""

from __future__ import annotations

from omegaconf import DictConfig

from vision_tl.core.cli import command, run_command


@command("suggest")
def main(cfg: DictConfig) -> None:
    """Rank the pool by how much labelling each image helps (`inference.suggest`)."""
    from vision_tl.inference.suggest import run_suggest

    run_command(run_suggest, cfg)


if __name__ == "__main__":
    main()
