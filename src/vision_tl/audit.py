"""Audit a dataset before training on it: `python -m vision_tl.audit data.root=DIR`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from vision_tl.core.cli import run_command
from vision_tl.core.config import config_dir


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="audit")
def main(cfg: DictConfig) -> None:
    """Write audit.html, issues.csv, clean_manifest.csv and audit.json into the run dir."""
    from vision_tl.inference.audit import run_audit

    run_command(run_audit, cfg)


if __name__ == "__main__":
    main()
