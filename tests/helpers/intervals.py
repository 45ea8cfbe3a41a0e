"""The check that every accuracy a run writes has its interval beside it."""

from __future__ import annotations

from typing import Any

from vision_tl.core.stats import SUFFIX, is_accuracy


def accuracies_without_interval(record: Any, where: str = "") -> list[str]:
    """Paths of numeric accuracies in a metrics record that have no `<key>_ci95` beside
    them, or whose interval does not contain the accuracy."""
    missing: list[str] = []
    if isinstance(record, list):
        for i, item in enumerate(record):
            missing += accuracies_without_interval(item, f"{where}[{i}]")
    if not isinstance(record, dict):
        return missing
    for key, value in record.items():
        path = f"{where}.{key}"
        missing += accuracies_without_interval(value, path)
        if not is_accuracy(key) or value is None:
            continue
        interval = record.get(f"{key}{SUFFIX}")
        values = value if isinstance(value, dict) else {"": value}
        bounds = interval if isinstance(value, dict) else {"": interval}
        for name, acc in values.items():
            ci = (bounds or {}).get(name)
            if not isinstance(acc, (int, float)):
                continue
            if not (isinstance(ci, list) and ci[0] - 1e-6 <= acc <= ci[1] + 1e-6):
                missing.append(f"{path}{'.' + name if name else ''}")
    return missing
