"""`submission.csv`: `id,label` by default, or a competition's own sample file followed to
the letter (its column names and its row order), since a leaderboard rejects anything else.

A template's first column holds the ids. Its other columns are either one label column,
or one column per class (named as the classes), which get the probabilities.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from vision_tl.core.errors import ConfigError
from vision_tl.core.io import open_regular

log = logging.getLogger(__name__)


def submission_settings(value: Any) -> tuple[bool, Path | None]:
    """(write it, template) from `submission`: `true`/`false`, or `{write, template}` (a
    template implies writing)."""
    if isinstance(value, bool) or value is None:
        return bool(value), None
    template = value.get("template")
    path = Path(str(template)).expanduser() if template else None
    return bool(value.get("write")) or path is not None, path


def read_template(path: Path) -> pd.DataFrame:
    """The sample submission, ids as text (leading zeros kept); a one-line error when it is
    not a CSV with an id column and at least one other."""
    try:
        with open_regular(path) as handle:
            template = pd.read_csv(handle, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise ConfigError(f"submission.template={path}: not a readable CSV ({err})") from None
    if template.shape[1] < 2:
        raise ConfigError(
            f"submission.template={path}: needs an id column and a label column "
            f"(or one column per class); it has {list(template.columns)}"
        )
    return template


def submission_frame(
    ids: Sequence[str],
    labels: Sequence[str],
    probs: torch.Tensor,
    class_names: Sequence[str],
    template: Path | None = None,
) -> pd.DataFrame:
    """The submission rows: `id,label` in prediction order, or the template's columns in
    its row order (ids the run has no prediction for keep the template's values, logged)."""
    if template is None:
        return pd.DataFrame({"id": list(ids), "label": list(labels)})
    sample = read_template(template)
    id_column, *columns = list(sample.columns)
    by_id = {str(i): row for row, i in enumerate(ids)}
    rows = [by_id.get(str(i)) for i in sample[id_column]]
    missing = sum(r is None for r in rows)
    if missing == len(rows):
        raise ConfigError(
            f"submission.template={template}: none of its {len(rows)} ids ({id_column!r}) "
            "matches an input image's id (the file stem, or the input CSV's id column)"
        )
    out = sample.copy()
    per_class = set(columns) <= set(class_names)
    if per_class:
        for name in columns:
            column = probs[:, list(class_names).index(name)].tolist()
            out[name] = [
                out.at[k, name] if r is None else f"{column[r]:.6g}" for k, r in enumerate(rows)
            ]
    elif len(columns) == 1:
        out[columns[0]] = [
            out.at[k, columns[0]] if r is None else labels[r] for k, r in enumerate(rows)
        ]
    else:
        raise ConfigError(
            f"submission.template={template}: after the id column {id_column!r} expected one "
            f"label column or columns named as the classes ({', '.join(class_names)}); got "
            f"{columns}"
        )
    if missing:
        log.warning(
            "submission.csv: %d of the template's %d ids have no prediction (unreadable or "
            "not in the input); their rows keep the template's values",
            missing,
            len(rows),
        )
    extra = len(ids) - (len(rows) - missing)
    if extra > 0:
        log.warning("submission.csv: %d predicted image(s) are not in the template", extra)
    return out
