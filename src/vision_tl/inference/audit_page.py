"""audit.html: one self-contained page (inline CSS, base64 JPEG thumbnails, no script, no
link out) that a person reads offline, or mails, to decide what to fix in a dataset."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from vision_tl.core.io import write_text
from vision_tl.data.decode import load_rgb

THUMB_SIDE = 144

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin:0 0 4px} h2{margin:28px 0 8px;border-bottom:1px solid #ccc}
.where{color:#666;margin-bottom:16px;word-break:break-all}
.counts{display:flex;gap:12px;flex-wrap:wrap}
.count{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:90px}
.count b{display:block;font-size:24px} .count.hot b{color:#c0392b}
table{border-collapse:collapse;background:#fff;margin:6px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;width:310px}
.card.single{width:160px}
.pics{display:flex;gap:6px}
.pics figure{margin:0;width:144px}
.pics img{width:144px;height:144px;object-fit:contain;background:#eee}
figcaption{font-size:11px;color:#555;word-break:break-all}
.meta{font-size:12px;margin-top:4px} .score{font-weight:bold}
.more{color:#666;font-style:italic}
"""

SECTIONS = {
    "leak": (
        "Leaks across splits",
        "The same image (identical, resized or re-encoded) in train and in val or test: it "
        "inflates the accuracy reported on the held-out split.",
    ),
    "duplicate": (
        "Duplicates within a split",
        "Copies of one image in the same split: they weigh that image more than the others.",
    ),
    "label": (
        "Suspected label errors",
        "A probe that never saw the image's label believes another class (confident "
        "learning). Score: 1 - the probability of the given label.",
    ),
    "outlier": (
        "Outliers",
        "Images unlike the rest (far from their nearest neighbours) or claimed by no class: "
        "candidates for 'belongs to no class'. Score: a robust z-score.",
    ),
}


class FindingLike(Protocol):
    path: str
    issue: str
    score: float
    detail: str
    note: str


def thumbnail_uri(path: str, background: tuple[int, int, int] = (255, 255, 255)) -> str:
    """The image at `path` as a small base64 JPEG data URI (empty if it will not decode)."""
    try:
        image = load_rgb(path, background, min_side=THUMB_SIDE)
    except Exception:
        return ""
    return image_uri(image)


def image_uri(image: Image.Image, side: int = THUMB_SIDE) -> str:
    """A PIL image, shrunk to fit `side`, as a base64 JPEG data URI: pages stay one file."""
    image = image.convert("RGB")
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _statistics(stats: Mapping[str, Any]) -> str:
    per_class = stats["per_class"]
    splits = sorted({s for counts in per_class.values() for s in counts}, key="train val test".find)
    parts = [
        html_table(
            ["class", *splits],
            ([name, *(c.get(s, 0) for s in splits)] for name, c in per_class.items()),
        ),
        "<p>Imbalance in train (largest / smallest class): "
        f"<b>{stats['imbalance_train']:.2f}</b></p>",
        html_table(
            ["", "min", "p5", "median", "p95", "max"],
            ([name, *stats[name].values()] for name in ("width", "height", "aspect")),
        ),
        f"<p>{stats['smaller_than_input']} image(s) with a shorter side under the input size "
        f"({stats['input_size']} px); {stats['extreme_aspect']} with an aspect ratio beyond "
        "2.5:1.</p>",
        html_table(["mode", "images"], sorted(stats["modes"].items())),
    ]
    if stats["scan_notes"]:
        parts.append(
            html_table(["odd but usable (pre-flight scan)", "images"], stats["scan_notes"].items())
        )
    return "".join(parts)


def _figure(uri: str, caption: str) -> str:
    img = f'<img class="thumb" src="{uri}" alt="{html.escape(caption)}">' if uri else "(unreadable)"
    return f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _cards(
    findings: Sequence[FindingLike],
    limit: int,
    thumb: Callable[[str], str],
    name: Callable[[str], str],
    given: Mapping[str, str],
) -> str:
    cards = []
    for f in findings[:limit]:
        pair = f.issue in ("leak", "duplicate")
        figures = _figure(thumb(f.path), name(f.path))
        if pair:
            figures += _figure(thumb(f.detail), name(f.detail))
        label = html.escape(given.get(f.path, "?"))
        if f.issue == "label":
            line = f"given <b>{label}</b> &rarr; suggested <b>{html.escape(f.detail)}</b>"
        elif f.issue == "outlier":
            line = f"labelled {label}; {html.escape(f.detail)}"
        else:
            line = html.escape(f.note)
        cards.append(
            f'<div class="card{"" if pair else " single"}"><div class="pics">{figures}</div>'
            f'<div class="meta"><span class="score">score {f.score:.3f}</span><br>{line}'
            "</div></div>"
        )
    more = len(findings) - limit
    tail = f'<p class="more">{more} more in issues.csv</p>' if more > 0 else ""
    return f'<div class="grid">{"".join(cards)}</div>{tail}'


def write_page(
    path: str | Path,
    findings: Sequence[FindingLike],
    counts: Mapping[str, int],
    stats: Mapping[str, Any],
    *,
    given: Mapping[str, str],
    where: str,
    thumbnails: int = 60,
    background: tuple[int, int, int] = (255, 255, 255),
) -> None:
    """Write the page: counts, statistics, then each finding kind, highest score first
    (`thumbnails` per kind; every finding is in issues.csv)."""

    @cache
    def thumb(file: str) -> str:
        return thumbnail_uri(file, background)

    base = where if os.path.isdir(where) else os.path.dirname(where)  # a folder or a CSV

    def name(file: str) -> str:
        try:
            return os.path.relpath(file, base)
        except ValueError:  # another drive (Windows)
            return file

    cards = "".join(
        f'<div class="count{" hot" if n else ""}"><b>{n}</b>{html.escape(kind)}</div>'
        for kind, n in counts.items()
    )
    body = [
        "<h1>Dataset audit</h1>",
        f'<div class="where">{html.escape(where)}: {stats["images"]} images, '
        f"{stats['classes']} classes</div>",
        f'<div class="counts">{cards}</div>',
        "<h2>Statistics</h2>",
        _statistics(stats),
    ]
    for kind, (title, why) in SECTIONS.items():
        selected = [f for f in findings if f.issue == kind]
        body.append(f'<h2 id="{kind}">{title} ({len(selected)})</h2><p>{why}</p>')
        if selected:
            body.append(_cards(selected, thumbnails, thumb, name, given))
    bad = [f for f in findings if f.issue == "bad_file"]
    body.append(f'<h2 id="bad_file">Unusable files ({len(bad)})</h2>')
    if bad:
        body.append(html_table(["file", "reason"], ((name(f.path), f.detail) for f in bad)))
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Dataset audit</title><style>{CSS}</style></head><body>"
        + "".join(body)
        + "</body></html>"
    )
    write_text(path, page)
