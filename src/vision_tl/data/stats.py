"""Images per class and split: a log table, and a table plus bar chart in TensorBoard."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from matplotlib.figure import Figure

from vision_tl.data.source import SPLITS, Catalog


def class_count_rows(split: Catalog) -> tuple[list[str], list[list[int]]]:
    """(split names present, one row of counts per class in class-index order)."""
    splits = [s for s in SPLITS if split.samples.get(s)]
    counts = [split.class_counts(s) for s in splits]
    return splits, [list(row) for row in zip(*counts, strict=True)]


def class_count_table(split: Catalog, markdown: bool = False) -> str:
    """Counts per class, with the train share, as aligned text or a Markdown table."""
    splits, rows = class_count_rows(split)
    total = sum(r[0] for r in rows) or 1
    header = ["class", *splits, "train %"]
    body = [
        [name, *map(str, row), f"{100 * row[0] / total:.1f}"]
        for name, row in zip(split.class_names, rows, strict=True)
    ]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*r) for r in [header, *body])


def class_counts_figure(split: Catalog) -> Figure:
    """Grouped bars per class (one bar per split): imbalance is visible at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits, rows = class_count_rows(split)
    n = len(split.class_names)
    fig, ax = plt.subplots(figsize=(min(16, 3 + 0.4 * n), 4), dpi=80)
    width = 0.8 / max(1, len(splits))
    for j, name in enumerate(splits):
        ax.bar([i + j * width for i in range(n)], [r[j] for r in rows], width, label=name)
    ax.set_xticks(
        [i + 0.4 - width / 2 for i in range(n)],
        split.class_names,
        rotation=90 if n > 8 else 0,
        fontsize=8,
    )
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    return fig


def log_class_counts(loggers: Iterable[Any], split: Catalog) -> None:
    """Write the table (TEXT tab) and the bar chart (IMAGES tab) to every TensorBoard logger."""
    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_text") and hasattr(experiment, "add_figure"):
            experiment.add_text("data/class_counts", class_count_table(split, markdown=True), 0)
            experiment.add_figure("data/class_counts", class_counts_figure(split), 0)


def imbalance(counts: Sequence[int]) -> float:
    """Largest over smallest non-empty class count (1.0 when balanced)."""
    present = [c for c in counts if c > 0]
    return max(present) / min(present) if present else 1.0
