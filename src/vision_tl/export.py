"""Export a checkpoint: `python -m vision_tl.export ckpt_path=CKPT format=onnx|torchscript`."""

from __future__ import annotations

from omegaconf import DictConfig

from vision_tl.core.cli import command, run_command


@command("export")
def main(cfg: DictConfig) -> None:
    """Write model.onnx or model.pt, and model.json, into the run dir."""
    from vision_tl.inference.export import run_export

    run_command(run_export, cfg)


if __name__ == "__main__":
    main()
