"""Judge a checkpoint on labelled images: `python -m vision_tl.eval ckpt_path=CKPT data.root=D`."""

from __future__ import annotations

from omegaconf import DictConfig

from vision_tl.core.cli import command, run_as_program, run_command


@command("eval")
def main(cfg: DictConfig) -> float:
    """Write metrics.json, per_class.csv, predictions.csv and PNGs; return top-1 accuracy."""
    from vision_tl.inference.eval import run_eval

    return run_command(run_eval, cfg)["acc"]


if __name__ == "__main__":
    run_as_program(main)
