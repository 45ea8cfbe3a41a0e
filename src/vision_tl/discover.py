"""Group unknown images into candidate new classes:
`python -m vision_tl.discover ckpt_path=CKPT input=POOL` (groups.csv, groups.html)."""

from __future__ import annotations

from omegaconf import DictConfig

from vision_tl.core.cli import command, run_command


@command("discover")
def main(cfg: DictConfig) -> None:
    """Cluster the pool's unknown images (`inference.discover.run_discover`)."""
    from vision_tl.inference.discover import run_discover

    run_command(run_discover, cfg)


if __name__ == "__main__":
    main()
