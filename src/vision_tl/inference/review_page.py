"""review.html, written by `eval`: a run's mistakes, to look at rather than read in a CSV.

One self-contained file (inline CSS, base64 JPEG thumbnails, no link out, no script) that
opens offline from the run folder: the confusion matrix, whose cells open the images they
count (CSS `:target`, so it works with scripts off), the most-confused pairs ranked, the
highest-loss images beside their Grad-CAM, and per-class precision and recall with their
95% intervals.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from vision_tl.core.io import write_text
from vision_tl.core.stats import format_interval
from vision_tl.inference.audit_page import html_table, image_uri, thumbnail_uri

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin:0 0 4px} h2{margin:28px 0 8px;border-bottom:1px solid #ccc}
.where{color:#666;margin-bottom:12px;word-break:break-all}
table{border-collapse:collapse;background:#fff;margin:6px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
table.confusion td{min-width:34px;text-align:center}
table.confusion a{display:block;color:inherit;text-decoration:none}
table.confusion td.hit a{font-weight:bold}
.cell{display:none;background:#fff;border:1px solid #bbb;border-radius:6px;padding:8px;
 margin:10px 0}
.cell:target{display:block}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:144px} figure img{width:144px;height:144px;object-fit:contain;
 background:#eee}
figcaption{font-size:11px;color:#555;word-break:break-all}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;display:flex;gap:6px}
.more{color:#666;font-style:italic}
"""


def cell_id(true: int, predicted: int) -> str:
    return f"cell-{true}-{predicted}"


def _shade(rate: float, diagonal: bool) -> str:
    """Blue for the diagonal, red off it, as deep as the share of the true class."""
    alpha = 0.08 + 0.72 * rate if rate > 0 else 0.0
    colour = "52,120,200" if diagonal else "205,60,50"
    return f"background:rgba({colour},{alpha:.2f})"


def _figure(uri: str, caption: str) -> str:
    img = f'<img src="{uri}" alt="{html.escape(caption)}">' if uri else "(unreadable)"
    return f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _confusion(confmat: torch.Tensor, classes: Sequence[str]) -> str:
    counts = confmat.tolist()
    head = "<tr><th>true \\ predicted</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    rows = []
    for i, name in enumerate(classes):
        total = max(1, sum(counts[i]))
        cells = []
        for j, n in enumerate(counts[i]):
            style = _shade(n / total, i == j)
            text = f'<a href="#{cell_id(i, j)}">{n}</a>' if n else ""
            hit = ' class="hit"' if i == j else ""
            cells.append(f'<td{hit} style="{style}" title="{n} of {total}">{text}</td>')
        rows.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    return f'<table class="confusion">{head}</tr>{"".join(rows)}</table>'


def most_confused(confmat: torch.Tensor, classes: Sequence[str]) -> pd.DataFrame:
    """Off-diagonal (true, predicted) pairs with at least one image, most images first."""
    counts = confmat.numpy()
    support = counts.sum(1)
    rows = [
        (classes[i], classes[j], int(counts[i, j]), counts[i, j] / max(1, support[i]), i, j)
        for i in range(len(classes))
        for j in range(len(classes))
        if i != j and counts[i, j]
    ]
    frame = pd.DataFrame(rows, columns=["true", "predicted", "images", "share", "i", "j"])
    return frame.sort_values(["images", "share"], ascending=False, kind="stable")


def write_review(
    path: str | Path,
    *,
    predictions: pd.DataFrame,
    files: Sequence[str | Path | None],
    classes: Sequence[str],
    confmat: torch.Tensor,
    per_class: pd.DataFrame,
    metrics: Mapping[str, Any],
    cams: Mapping[int, np.ndarray],
    per_cell: int = 48,
    background: tuple[int, int, int] = (255, 255, 255),
    thumb: Callable[[str], str] | None = None,
) -> None:
    """Write the page. `predictions` is eval's per-image frame (path, true_label,
    top1_label, confidence, loss), `files` the file of each row (None: no file to show),
    `cams` Grad-CAM overlays by row for the highest-loss images."""
    thumb = thumb or (lambda file: thumbnail_uri(file, background))
    index = {name: k for k, name in enumerate(classes)}
    true = [index[t] for t in predictions["true_label"]]
    predicted = [index[p] for p in predictions["top1_label"]]
    by_cell: dict[tuple[int, int], list[int]] = {}
    for row, pair in enumerate(zip(true, predicted, strict=True)):
        by_cell.setdefault(pair, []).append(row)

    def caption(row: int) -> str:
        r = predictions.iloc[row]
        return f"{r['path']} ({r['confidence']:.2f})"

    sections = []
    for (i, j), rows in sorted(by_cell.items()):
        rows = sorted(rows, key=lambda r: -float(predictions.iloc[r]["loss"]))
        shown = [r for r in rows if files[r] is not None][:per_cell]
        figures = "".join(_figure(thumb(str(files[r])), caption(r)) for r in shown)
        more = len(rows) - len(shown)
        tail = f'<p class="more">{more} more in predictions.csv</p>' if more > 0 else ""
        sections.append(
            f'<section class="cell" id="{cell_id(i, j)}"><h3>true {html.escape(classes[i])}, '
            f"predicted {html.escape(classes[j])}: {len(rows)} image(s), highest loss first"
            f'</h3><div class="grid">{figures}</div>{tail}</section>'
        )

    pairs = most_confused(confmat, classes)
    pair_rows = [
        (r.true, r.predicted, r.images, f"{r.share:.1%}") for r in pairs.itertuples(index=False)
    ]
    worst = []
    for row, overlay in cams.items():
        r = predictions.iloc[row]
        text = (
            f"{r['path']}: true {r['true_label']}, predicted {r['top1_label']} "
            f"({r['confidence']:.2f}), loss {r['loss']:.2f}"
        )
        uri = thumb(str(files[row])) if files[row] is not None else ""
        worst.append(
            f'<div class="card">{_figure(uri, text)}'
            f"{_figure(image_uri(Image.fromarray(overlay)), 'Grad-CAM of the predicted class')}"
            "</div>"
        )
    class_rows = [
        (
            r["class"],
            f"{r['precision']:.3f}",
            format_interval([r["precision_lo"], r["precision_hi"]])
            if pd.notna(r["precision_lo"])
            else "n/a",
            f"{r['recall']:.3f}",
            format_interval([r["recall_lo"], r["recall_hi"]])
            if pd.notna(r["recall_lo"])
            else "n/a",
            f"{r['f1']:.3f}",
            int(r["support"]),
        )
        for _, r in per_class.iterrows()
    ]
    acc = metrics["acc"]
    body = [
        "<h1>Review of a run's mistakes</h1>",
        f'<div class="where">{html.escape(str(metrics.get("ckpt_path", "")))} on the '
        f"{html.escape(str(metrics.get('split', '')))} split of "
        f"{html.escape(str(metrics.get('data', '')))}</div>",
        f"<p>{len(predictions)} images: accuracy <b>{acc:.4f}</b> (95% interval "
        f"{format_interval(metrics.get('acc_ci95'))}), macro F1 {metrics['f1_macro']:.4f}, "
        f"ECE {metrics['ece']:.4f}.</p>",
        '<h2 id="confusion">Confusion matrix</h2><p>Rows are the true classes. Click a '
        "count to see its images.</p>",
        _confusion(confmat, classes),
        *sections,
        f'<h2 id="pairs">Most-confused pairs ({len(pairs)})</h2>',
        html_table(["true", "predicted as", "images", "share of the true class"], pair_rows)
        if pair_rows
        else "<p>No mistakes.</p>",
        f'<h2 id="worst">Highest loss, with Grad-CAM ({len(worst)})</h2>',
        f'<div class="grid">{"".join(worst)}</div>',
        '<h2 id="classes">Per class</h2>',
        html_table(
            ["class", "precision", "95% interval", "recall", "95% interval", "F1", "images"],
            class_rows,
        ),
    ]
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Review</title><style>{CSS}</style></head><body>" + "".join(body) + "</body></html>"
    )
    write_text(path, page)
