"""Figures: drawn for TensorBoard and the run folders, written whole or not at all."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from vision_tl.core.io import write_bytes


def save_figure(fig: Figure, path: str | Path, **savefig: Any) -> None:
    """`fig.savefig(path)` written atomically (`core.io`), then the figure is closed."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", **savefig)
    finally:
        plt.close(fig)
    write_bytes(path, buffer.getbuffer())


def confusion_matrix_figure(confmat: torch.Tensor, class_names: Sequence[str]) -> Figure:
    """Row-normalised confusion matrix (true class per row), with counts when few classes."""
    counts = confmat.float()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    n = len(class_names)
    size = min(16, 2 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size), dpi=80)
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ticks = range(n)
    ax.set_xticks(ticks, class_names, rotation=90 if n > 8 else 45, ha="right", fontsize=8)
    ax.set_yticks(ticks, class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                color = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", color=color, fontsize=7)
    fig.tight_layout()
    return fig
