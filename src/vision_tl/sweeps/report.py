"""One table of every job in a sweep, and its plots: the worker of `python -m vision_tl.report`.

Reads only files in the sweep dir (`job_status.json`, `metrics.json`, `history.csv`,
`.hydra/overrides.yaml`), so it works while the sweep is still running and on a sweep
dir copied from a cluster. Writes `summary.csv`, `summary.md`, `heatmap.png`,
`curves.png`, and `hparams/` for TensorBoard's HPARAMS tab. For an Optuna search whose
study it can reach (`multirun.yaml` names its storage), Optuna's own views too:
`optuna_importances.png`, `optuna_history.png`, `optuna_parallel.png`.

A copied sweep may hold anything: a job whose files are damaged (a truncated
`history.csv`, a broken `metrics.json` or `job_status.json`) is left out with one logged
line saying which and why, and the summary is written for the others; every text from the
sweep (folder names, overrides, errors) is escaped in `summary.md`, so a folder named
`<img src=x onerror=alert(1)>` is shown, not rendered.
"""

from __future__ import annotations

import html
import logging
import math
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from vision_tl.core.errors import error_line
from vision_tl.core.io import printable, read_json, write_csv, write_text
from vision_tl.core.stats import tied_with_best
from vision_tl.sweeps.status import STATUS_FILE

log = logging.getLogger(__name__)

METRIC_COLUMNS = (
    "best_val_acc",
    "best_val_acc_lo",  # its 95% interval (`core.stats`), from metrics.json
    "best_val_acc_hi",
    "tied_with_best",  # the interval overlaps the best job's: not ranked apart from it
    "final_val_acc",
    "val_loss",
    "final_train_acc",
    "train_val_gap",
    "best_epoch",
    "epochs",
    "train_time_s",
    "train_images_per_s",
    "peak_rss_mb",
    "peak_gpu_mem_mb",
    "pruned_epoch",
)
# Override keys that name the job rather than a point of the search (the Optuna trial
# number is the job folder's name).
JOB_KEYS = ("trial",)
LR_KEY = "optimizer.lr"
BATCH_KEY = "data.batch_size"
HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")
# Markdown that text could start: escaped. `_` only at a word's edge (GitHub ignores it
# inside words, so `data.batch_size` stays as it is); & < > become HTML entities.
_MARKUP = re.compile(r"([\\`*\[\]|~])|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


class DamagedJob(ValueError):
    """A job folder whose files cannot be read: the report leaves it out and says why."""


def find_jobs(sweep_dir: Path) -> list[Path]:
    """Job folders under `sweep_dir`: those holding a status, metrics or Hydra overrides file.
    A run inside another job's folder is a stage of that job (LP-FT's `probe/`), not a job."""
    markers = (STATUS_FILE, "metrics.json", ".hydra/overrides.yaml")
    found: set[Path] = set()
    for marker in markers:
        for path in sweep_dir.glob(f"**/{marker}"):
            job = path.parent.parent if marker.startswith(".hydra") else path.parent
            if job != sweep_dir and not any(p.startswith(".") for p in job.parts[-1:]):
                found.add(job)
    return sorted(job for job in found if not any(p in found for p in job.parents))


def _read_history(job_dir: Path) -> pd.DataFrame:
    """The job's epochs so far (empty before its first); `DamagedJob` when the file is
    there but is not a history (truncated, cut mid-header, other columns)."""
    path = job_dir / "history.csv"
    if not path.exists():
        return pd.DataFrame()
    try:
        history = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DamagedJob(f"history.csv cannot be read ({error_line(err)})") from None
    missing = [c for c in HISTORY_COLUMNS if c not in history.columns]
    if missing:
        raise DamagedJob(f"history.csv has no column {', '.join(missing)}")
    for column in HISTORY_COLUMNS:
        history[column] = pd.to_numeric(history[column], errors="coerce")
    history = history[history["epoch"].notna()]
    return history.reset_index(drop=True)


def _read_object(job_dir: Path, name: str) -> dict[str, Any]:
    """A JSON object of the job (empty when absent); `DamagedJob` when it is there but
    is not one."""
    path = job_dir / name
    if not path.exists():
        return {}
    data = read_json(path)
    if data is None:
        raise DamagedJob(f"{name} is not a JSON object (truncated or damaged)")
    return data


def _overrides(job_dir: Path, status: dict[str, Any]) -> list[str]:
    if status.get("overrides") is not None:
        return list(status["overrides"])
    try:
        return list(yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or [])
    except (OSError, yaml.YAMLError):
        return []


def _parse_override(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _alive(status: dict[str, Any]) -> bool:
    """Whether a job marked running still runs (only knowable on the machine that ran it)."""
    if status.get("host") != socket.gethostname() or not status.get("pid"):
        return True
    try:
        os.kill(int(status["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def job_row(job_dir: Path, sweep_dir: Path) -> dict[str, Any]:
    """One summary row: overrides, status and the metrics known so far; `DamagedJob` (or
    any error from a file's content) when the job's files cannot be read."""
    status = _read_object(job_dir, STATUS_FILE)
    metrics = _read_object(job_dir, "metrics.json")
    history = _read_history(job_dir)
    state = status.get("status") or ("done" if metrics else "unknown")
    if state == "running" and not _alive(status):
        state = "interrupted"
    overrides = _overrides(job_dir, status)
    row: dict[str, Any] = {
        "job": str(job_dir.relative_to(sweep_dir)),
        "status": state,
        "overrides": " ".join(overrides),
    }
    row.update(dict(_parse_override(o) for o in overrides))
    if not history.empty and history["val_acc"].notna().any():
        last = history.iloc[-1]
        best = history["val_acc"].idxmax() if history["val_acc"].notna().any() else None
        row.update(
            best_val_acc=history["val_acc"].max(),
            best_epoch=int(history.loc[best, "epoch"]) if best is not None else None,
            final_val_acc=last["val_acc"],
            val_loss=last["val_loss"],
            final_train_acc=last["train_acc"],
            train_val_gap=last["train_acc"] - last["val_acc"],
            epochs=int(last["epoch"]) + 1,
        )
    row.update({k: metrics[k] for k in METRIC_COLUMNS if metrics.get(k) is not None})
    interval = metrics.get("best_val_acc_ci95")
    if isinstance(interval, list) and len(interval) == 2:
        row["best_val_acc_lo"], row["best_val_acc_hi"] = interval
    row["error"] = status.get("error") or ""
    return row


def swept_keys(sweep_dir: Path) -> list[str]:
    """Keys the sweep varies, from Hydra's `multirun.yaml` (sweeper params and a,b,c values)."""
    try:
        hydra_cfg = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())["hydra"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return []
    keys = list((hydra_cfg.get("sweeper") or {}).get("params") or {})
    sweep_syntax = ("choice(", "range(", "interval(", "glob(", "tag(")
    for override in (hydra_cfg.get("overrides") or {}).get("task") or []:
        key, value = _parse_override(str(override))
        if "," in value.strip("[]{}") or value.startswith(sweep_syntax):
            keys.append(key)
    return list(dict.fromkeys(keys))


def _numeric(column: pd.Series) -> pd.Series:
    converted = pd.to_numeric(column, errors="coerce")
    return converted if converted.notna().sum() == column.notna().sum() else column


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """A row per job that can be read; each damaged job is logged once and left out."""
    rows = []
    for job in find_jobs(sweep_dir):
        try:
            rows.append(job_row(job, sweep_dir))
        except Exception as err:  # a copied folder may hold anything: never fatal
            reason = str(err) if isinstance(err, DamagedJob) else error_line(err)
            log.warning(
                "Report: job %s left out: %s", printable(str(job.relative_to(sweep_dir))), reason
            )
    return rows


def summarize(sweep_dir: Path, metric: str = "best_val_acc") -> tuple[pd.DataFrame, list[str]]:
    """The summary table sorted by `metric` (best first), and the override keys that vary."""
    rows = job_rows(sweep_dir)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame, []
    fixed = ["job", "status", "overrides", *METRIC_COLUMNS, "error", *JOB_KEYS]
    keys = [c for c in frame.columns if c not in fixed]
    swept = set(swept_keys(sweep_dir))
    varying = [k for k in keys if k in swept or frame[k].astype(str).nunique(dropna=False) > 1]
    for key in varying:
        frame[key] = _numeric(frame[key])
    for column in METRIC_COLUMNS:
        if column not in frame:
            frame[column] = math.nan
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame["tied_with_best"] = tied_with_best(frame, "best_val_acc")
    frame = frame[["job", "status", *varying, *METRIC_COLUMNS, "overrides", "error"]]
    sort_key = metric if metric in frame else "best_val_acc"
    frame = frame.sort_values(sort_key, ascending=False, na_position="last", kind="stable")
    return frame.reset_index(drop=True), varying


def markdown_text(value: Any) -> str:
    """`value` as literal text in Markdown: one line, no HTML, no markup, no table break."""
    text = " ".join(printable(str(value)).split())
    return _MARKUP.sub(lambda m: "\\" + m.group(0), html.escape(text, quote=False))


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (no extra dependency); every cell and header is
    `markdown_text`, so what a folder or an override says is shown, never interpreted."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4g}"
        return markdown_text(value)

    lines = [
        "| " + " | ".join(markdown_text(c) for c in frame.columns) + " |",
        "|" + "---|" * len(frame.columns),
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines) + "\n"


def _tick(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def plot_heatmap(frame: pd.DataFrame, varying: list[str], metric: str, path: Path) -> bool:
    """Metric over learning rate x batch size (one panel per value of the other axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if LR_KEY in varying and BATCH_KEY in varying:
        x_key, y_key = LR_KEY, BATCH_KEY
    elif len(varying) == 2:
        x_key, y_key = varying
    else:
        return False
    data = frame[frame[metric].notna()]
    if data.empty:
        return False
    others = [k for k in varying if k not in (x_key, y_key)]
    groups = list(data.groupby(others, dropna=False)) if others else [("", data)]
    groups = groups[:6]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False)
    for ax, (name, group) in zip(axes[0], groups, strict=False):
        table = group.pivot_table(index=y_key, columns=x_key, values=metric, aggfunc="max")
        image = ax.imshow(table.to_numpy(dtype=float), cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(table.columns)), [_tick(v) for v in table.columns])
        ax.set_yticks(range(len(table.index)), [_tick(v) for v in table.index])
        ax.set_xlabel(x_key)
        ax.set_ylabel(y_key)
        for (i, j), value in pd.DataFrame(table.to_numpy()).stack().items():
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", bbox={"fc": "white"})
        label = name if isinstance(name, str) else ", ".join(map(str, name))
        ax.set_title(f"{metric} {label}".strip())
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    from vision_tl.core.plots import save_figure

    save_figure(fig, path, dpi=100)
    return True


def plot_curves(sweep_dir: Path, frame: pd.DataFrame, varying: list[str], path: Path) -> bool:
    """Train and validation accuracy and loss per epoch, one panel per job (best first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    jobs = [(row, _history_or_none(sweep_dir / row["job"])) for row in frame.to_dict("records")]
    jobs = [(row, h) for row, h in jobs if not h.empty][:24]
    if not jobs:
        return False
    cols = min(4, len(jobs))
    rows = math.ceil(len(jobs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(jobs) :]:
        ax.axis("off")
    for ax, (row, history) in zip(axes.flat, jobs, strict=False):
        ax.plot(history["epoch"], history["train_acc"], label="train acc", color="C0")
        ax.plot(history["epoch"], history["val_acc"], label="val acc", color="C1")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        loss_ax = ax.twinx()
        loss_ax.plot(history["epoch"], history["train_loss"], "--", color="C0", label="train loss")
        loss_ax.plot(history["epoch"], history["val_loss"], "--", color="C1", label="val loss")
        title = " ".join(f"{k.split('.')[-1]}={row[k]}" for k in varying)
        ax.set_title(title or row["job"], fontsize=8)
    handles = [*axes.flat[0].get_lines(), *fig.axes[-1].get_lines()]
    fig.legend(handles, [h.get_label() for h in handles], loc="upper center", ncol=4)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    from vision_tl.core.plots import save_figure

    save_figure(fig, path, dpi=100)
    return True


def _history_or_none(job_dir: Path) -> pd.DataFrame:
    """A job's history for the curves (empty when it has none or changed since the table)."""
    try:
        return _read_history(job_dir)
    except DamagedJob:
        return pd.DataFrame()


def write_hparams(sweep_dir: Path, frame: pd.DataFrame, varying: list[str]) -> Path:
    """Fill TensorBoard's HPARAMS tab: one session per job, its overrides against its metrics."""
    from torch.utils.tensorboard import SummaryWriter

    out = sweep_dir / "hparams"
    shutil.rmtree(out, ignore_errors=True)
    writer = SummaryWriter(log_dir=str(out))
    for row in frame.to_dict("records"):
        hparams = {k: _hparam_value(row.get(k)) for k in varying}
        hparams["status"] = row["status"]
        metrics = {
            f"hparams/{k}": float(row[k])
            for k in ("best_val_acc", "final_val_acc", "val_loss", "train_val_gap")
            if row.get(k) is not None and not math.isnan(float(row[k]))
        }
        writer.add_hparams(hparams, metrics, run_name=row["job"])
    writer.close()
    return out


def _hparam_value(value: Any) -> Any:
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


def write_report(sweep_dir: Path, metric: str | None = None, plots: bool = True) -> pd.DataFrame:
    """Write summary.csv, summary.md and the plots into `sweep_dir`; return the table."""
    sweep_dir = Path(sweep_dir)
    metric = metric or "best_val_acc"
    frame, varying = summarize(sweep_dir, metric)
    if frame.empty:
        return frame
    write_csv(frame, sweep_dir / "summary.csv", index=False)
    name, sort = markdown_text(sweep_dir.name), markdown_text(metric)
    header = (
        f"# Sweep {name}: {len(frame)} jobs, sorted by {sort}\n\n"
        "best\\_val\\_acc\\_lo/hi is its 95% interval over the val images; jobs marked "
        "tied\\_with\\_best overlap the best job's and are not shown to differ from it.\n\n"
    )
    write_text(sweep_dir / "summary.md", header + to_markdown(frame.drop(columns=["overrides"])))
    if plots:
        plot_heatmap(frame, varying, metric, sweep_dir / "heatmap.png")
        plot_curves(sweep_dir, frame, varying, sweep_dir / "curves.png")
        write_hparams(sweep_dir, frame, varying)
        write_study_plots(sweep_dir)
    return frame


def sweep_study(sweep_dir: Path) -> Any:
    """The Optuna study `multirun.yaml` names, when it is stored where this process can
    read it (None, with one logged line saying why, otherwise)."""
    try:
        hydra_cfg = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())["hydra"]
        sweeper = hydra_cfg["sweeper"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    if not isinstance(sweeper, dict) or "study_name" not in sweeper:
        return None
    from vision_tl.sweeps.study import StudySettings, load_study

    settings = StudySettings.from_config(sweeper)
    if settings.kind == "memory":
        log.info("Report: no Optuna views (the study was kept in memory)")
        return None
    local = settings.local_file()
    if local is not None and not local.is_file():
        log.info("Report: no Optuna views (no study file %s here)", printable(str(local)))
        return None
    try:
        found = load_study(settings)
    except Exception as err:  # a server that is gone, a study renamed: the tables still come
        log.info("Report: no Optuna views (%s)", error_line(err))
        return None
    return found[0] if found else None


OPTUNA_VIEWS = {
    "optuna_history.png": ("plot_optimization_history", 1),
    "optuna_importances.png": ("plot_param_importances", 3),
    "optuna_parallel.png": ("plot_parallel_coordinate", 2),
}


def write_study_plots(sweep_dir: Path) -> list[Path]:
    """Optuna's optimisation history, parameter importances and parallel coordinates as
    PNGs; each view that the study has too few finished trials for is skipped with a line."""
    study = sweep_study(sweep_dir)
    if study is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as views

    from vision_tl.core.plots import save_figure

    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    written = []
    for name, (view, needed) in OPTUNA_VIEWS.items():
        if complete < needed:
            log.info("Report: %s skipped: %d completed trials, it needs %d", name, complete, needed)
            continue
        try:
            axes = getattr(views, view)(study)
        except Exception as err:  # one view failing must not cost the others
            log.info("Report: %s skipped: %s", name, error_line(err))
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        save_figure(figure, sweep_dir / name, dpi=100, bbox_inches="tight")
        written.append(sweep_dir / name)
    return written
