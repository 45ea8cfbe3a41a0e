"""Pick a backbone: `python -m vision_tl.select data.root=DIR [candidates=[...]]` ranks
candidate backbones by the converged linear probe on their cached features (see README)."""

from __future__ import annotations

from omegaconf import DictConfig

from vision_tl.core.cli import command, run_command


@command("select")
def main(cfg: DictConfig) -> None:
    """Train each candidate's probe (`training.train.run_training`), write the leaderboard,
    the accuracy/speed plot and the winner's train line (`sweeps.select.run_select`)."""
    from vision_tl.sweeps.select import run_select
    from vision_tl.training.train import run_training

    run_command(run_select, cfg, run_training)


if __name__ == "__main__":
    main()
