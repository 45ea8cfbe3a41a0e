"""Facts about the machine a command runs on: usable CPU cores, the torch device to use."""

from __future__ import annotations

import os

import torch

from vision_tl.core.errors import ConfigError


def available_cpus() -> int:
    """CPU cores this process may use (a container's cpuset, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` is the GPU when there is one; anything else must be a torch device name."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name} is not a torch device (auto, cpu, cuda, cuda:1)") from err
