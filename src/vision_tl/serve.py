"""Serve a model over HTTP: `python -m vision_tl.serve ckpt_path=CKPT serve.port=8000`."""

from __future__ import annotations

from omegaconf import DictConfig

from vision_tl.core.cli import command, run_command


@command("serve")
def main(cfg: DictConfig) -> None:
    """POST /predict, GET /health, GET /info and a drop-an-image page at /, until stopped."""
    from vision_tl.inference.serving import run_serve

    run_command(run_serve, cfg)


if __name__ == "__main__":
    main()
