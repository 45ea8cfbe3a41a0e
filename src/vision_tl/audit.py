"""Audit a dataset before training on it: `python -m vision_tl.audit data.root=DIR`."""

from __future__ import annotations

from omegaconf import DictConfig

from vision_tl.core.cli import command, run_command


@command("audit")
def main(cfg: DictConfig) -> None:
    """Write audit.html, issues.csv, clean_manifest.csv and audit.json into the run dir."""
    from vision_tl.inference.audit import run_audit

    run_command(run_audit, cfg)


if __name__ == "__main__":
    main()
