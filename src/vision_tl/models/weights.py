"""Load weights from a local file: state dict, safetensors or Lightning checkpoint."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vision_tl.core.errors import ConfigError, WeightsError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from `path` safely (no pickled code) and unwrap checkpoint containers."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise WeightsError(f"cannot read weights file {path}: {reason}") from err
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict):
        raise WeightsError(f"weights file {path} holds a {type(data).__name__}, not a state dict")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _best_prefix(keys: list[str], targets: set[str]) -> str:
    """The prefix that, stripped from `keys`, matches the most target keys.

    This lets a Lightning checkpoint (`model.backbone.body.conv1.weight`) or another
    wrapper's state dict load into the bare body (`conv1.weight`).
    """
    counts: Counter[str] = Counter()
    for key in keys:
        for target in targets:
            if key.endswith(target) and (len(key) == len(target) or key[-len(target) - 1] == "."):
                counts[key[: len(key) - len(target)]] += 1
    return counts.most_common(1)[0][0] if counts else ""


def _examples(names: set[str] | list[str], n: int = 3) -> str:
    names = sorted(names)
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def load_weights_file(
    module: nn.Module, path: str | Path, name: str, dropped_keys: Sequence[str] = ()
) -> None:
    """Load `path` into `module` (backbone `name`'s body); any missing, unexpected or
    mis-shaped key is an error. Keys under `dropped_keys` (the cut-off classifier) are
    ignored."""
    target = module.state_dict()
    loaded = read_state_dict(path)
    prefix = _best_prefix(list(loaded), set(target))
    if prefix:
        loaded = {k[len(prefix) :]: v for k, v in loaded.items() if k.startswith(prefix)}
    loaded = {
        k: v
        for k, v in loaded.items()
        if not any(k == d or k.startswith(d + ".") for d in dropped_keys)
    }
    missing = set(target) - set(loaded)
    unexpected = set(loaded) - set(target)
    mismatched = [
        f"{k} {tuple(loaded[k].shape)} vs {tuple(v.shape)}"
        for k, v in target.items()
        if k in loaded and loaded[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_examples(missing)}")
    if unexpected:
        problems.append(f"unexpected {_examples(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch {_examples(mismatched)}")
    if problems:
        raise WeightsError(
            f"weights file {path} does not fit backbone {name}: " + "; ".join(problems)
        )
    module.load_state_dict(loaded)
