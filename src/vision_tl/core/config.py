"""Where the Hydra configs live, and the resolvers they use."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

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
