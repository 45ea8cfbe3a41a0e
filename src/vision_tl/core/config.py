"""Where the Hydra configs live, and the resolvers they use."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from omegaconf import OmegaConf

from vision_tl.core.launch import rank_suffix

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def config_dir() -> Path:
    """Return the config folder: shipped in the wheel, or the repo's `conf/` in a checkout."""
    packaged = _PACKAGE_DIR / "conf"
    if packaged.is_dir():
        return packaged
    return _PACKAGE_DIR.parents[1] / "conf"


def cache_dir() -> Path:
    """Root for generated datasets and downloaded weights (`VISION_TL_CACHE` overrides it)."""
    env = os.environ.get("VISION_TL_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "vision_tl"


def slurm_job() -> str | None:
    """`<job id>` (an array task: `<array job id>_<task id>`) inside a SLURM batch job; None
    outside SLURM and in an interactive allocation (`srun --pty bash`, `salloc`), where
    each command is a new run, as Lightning's SLURM environment sees it too."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else job


def run_name(default: str, overrides: str = "") -> str:
    """A run folder's name: `default` (a timestamp), or inside a SLURM batch job
    `slurm-<job>-<digest of the overrides>`, the same when SLURM requeues the job (after a
    preemption or a timeout), so the rerun finds its run and resumes it; another command in
    the same job gets a folder of its own."""
    job = slurm_job()
    if job is None:
        return default
    return f"slurm-{job}-{hashlib.sha1(overrides.encode()).hexdigest()[:8]}"


def register_resolvers() -> None:
    """Register `${vtl.*:...}` resolvers once; configs need them before they resolve."""
    if not OmegaConf.has_resolver("vtl.is_set"):
        # Pretrained weights default to on for the user's own data (a folder or a
        # manifest) and off for the built-in smoke-test set, which must run offline.
        OmegaConf.register_new_resolver(
            "vtl.is_set", lambda *values: any(v is not None for v in values)
        )
    if not OmegaConf.has_resolver("vtl.cache_dir"):
        OmegaConf.register_new_resolver("vtl.cache_dir", lambda: str(cache_dir()))
    if not OmegaConf.has_resolver("vtl.run_name"):
        OmegaConf.register_new_resolver("vtl.run_name", run_name, use_cache=True)
    if not OmegaConf.has_resolver("vtl.rank_suffix"):
        # One log file per process of a multi-process job (`core.launch.rank_suffix`).
        OmegaConf.register_new_resolver("vtl.rank_suffix", rank_suffix)
    if not OmegaConf.has_resolver("vtl.rank_zero"):
        # `value` on global rank 0, else null (files only rank 0 writes, e.g. Hydra's .hydra/).
        OmegaConf.register_new_resolver(
            "vtl.rank_zero", lambda value, devices=1: None if rank_suffix(devices) else value
        )
