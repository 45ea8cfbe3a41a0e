"""Backbone selection: rank candidate backbones by the converged linear probe on their
cached features, and say which one to train.

Each candidate is one ordinary training run (`finetune=linear_probe`, whose search picks
the head's settings on the training split) in `<out>/candidates/<name>/`, with the
`job_status.json` every sweep job keeps: running the same command into the same folder
again reuses finished candidates (and the feature cache serves any unfinished one), a
failing candidate (no weights offline, out of memory) is recorded and the next one runs.
The leaderboard's val accuracy of a candidate is therefore exactly what the printed
`python -m vision_tl.train ...` line gives.
"""

from __future__ import annotations

import logging
import re
import shlex
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from vision_tl.core.errors import ConfigError, find_user_error
from vision_tl.core.io import read_json, write_csv, write_text
from vision_tl.core.stats import tied_with_best
from vision_tl.sweeps.jobs import isolated_job
from vision_tl.sweeps.report import to_markdown
from vision_tl.sweeps.status import read_status, write_status

log = logging.getLogger(__name__)

# Small, fast backbones for a CPU; larger ones when a GPU makes extraction cheap.
DEFAULT_CPU = (
    "timm/tf_efficientnet_lite0",
    "timm/tf_efficientnet_lite1",
    "timm/tf_efficientnet_lite2",
    "timm/mobilenetv3_large_100",
    "resnet18",
)
DEFAULT_GPU = (
    "resnet50",
    "timm/convnext_tiny",
    "timm/efficientnet_b3",
    "timm/vit_base_patch16_224",
    "timm/tf_efficientnet_lite2",
)
SELECT_KEYS = ("candidates", "weights_dir", "time_budget")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
COLUMNS = (
    "backbone",
    "status",
    "val_acc",
    "val_acc_lo",  # its 95% interval over the val images (`core.stats`)
    "val_acc_hi",
    "tied_with_best",  # the interval overlaps the best candidate's: not ranked apart
    "macro_f1",
    "params",
    "feature_dim",
    "images_per_s",
    "seconds",
)


@dataclass(frozen=True)
class Candidate:
    """A backbone to try: a registry or `timm/` name, and where its weights come from."""

    name: str
    weights: str | None = None
    weights_path: str | None = None

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name)

    def overrides(self) -> list[str]:
        """The `train` overrides that select this backbone."""
        out = [f"model.backbone.name={self.name}"]
        if self.weights is not None:
            out.append(f"model.backbone.weights={self.weights}")
        if self.weights_path is not None:
            out.append(f"model.backbone.weights_path={self.weights_path}")
        return out


def find_weights(name: str, weights_dir: Path) -> Path | None:
    """A file in `weights_dir` named after the model: `tf_efficientnet_lite0.in1k.safetensors`
    for `timm/tf_efficientnet_lite0` (also `<model>.pth`, `.pt`, `.bin`, `.ckpt`)."""
    model = name.split("/")[-1].split(".")[0]
    for path in sorted(weights_dir.iterdir()):
        stem = path.name
        if path.suffix in WEIGHT_SUFFIXES and (
            stem == f"{model}{path.suffix}" or stem.startswith(f"{model}.")
        ):
            return path.resolve()
    return None


def parse_candidates(spec: Any, weights_dir: str | None, on_gpu: bool) -> list[Candidate]:
    """`candidates` (names, or mappings with `name` and `weights` or `weights_path`; None:
    the default list for this machine) with local weights looked up in `weights_dir`."""
    folder = Path(weights_dir).expanduser() if weights_dir else None
    if folder is not None and not folder.is_dir():
        raise ConfigError(f"weights_dir={weights_dir} is not a folder")
    items = list(spec) if spec is not None else list(DEFAULT_GPU if on_gpu else DEFAULT_CPU)
    if not items:
        raise ConfigError("candidates is empty: give at least one backbone name")
    out: list[Candidate] = []
    for item in items:
        if isinstance(item, str):
            fields: dict[str, Any] = {"name": item}
        elif isinstance(item, dict) and "name" in item:
            fields = dict(item)
        else:
            raise ConfigError(
                f"candidate {item!r}: give a backbone name or a mapping with `name` "
                "(and optionally `weights` or `weights_path`)"
            )
        unknown = sorted(set(fields) - {"name", "weights", "weights_path"})
        if unknown:
            raise ConfigError(f"candidate {fields['name']}: unknown keys {', '.join(unknown)}")
        if fields.get("weights_path") is None and folder is not None:
            found = find_weights(fields["name"], folder)
            if found is not None:
                fields["weights_path"] = str(found)
        candidate = Candidate(**fields)
        if candidate.slug in {c.slug for c in out}:
            raise ConfigError(f"candidate {candidate.name} is listed twice")
        out.append(candidate)
    return out


def _user_overrides() -> list[str]:
    """The command line's overrides that `train` understands (the select keys left out)."""
    if not HydraConfig.initialized():
        return []
    overrides = list(HydraConfig.get().overrides.task)
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in SELECT_KEYS]


def train_line(candidate: Candidate, overrides: list[str]) -> str:
    """The exact command that trains `candidate` as the leaderboard measured it."""
    ignored = ("model.backbone.", "finetune=", "finetune.mode", "paths.output_dir", "test=")
    kept = [o for o in overrides if not o.lstrip("+~").startswith(ignored)]
    args = [*kept, *candidate.overrides(), "finetune=linear_probe"]
    return " ".join(["python -m vision_tl.train", *(shlex.quote(a) for a in args)])


def _candidate_cfg(cfg: DictConfig, candidate: Candidate, job_dir: Path) -> DictConfig:
    run = cfg.copy()
    with open_dict(run):
        for key in SELECT_KEYS:
            run.pop(key, None)
        run.model.backbone.name = candidate.name
        run.model.backbone.weights = candidate.weights or run.model.backbone.get("weights")
        run.model.backbone.weights_path = candidate.weights_path
        run.paths.output_dir = str(job_dir)
        run.finetune.mode = "linear_probe"
    return run


def _row(candidate: Candidate, status: dict[str, Any], metrics: dict[str, Any] | None) -> dict:
    metrics = metrics or {}
    probe = metrics.get("probe") or {}
    state = status.get("status", "not run")
    if state == "failed":
        state = f"failed: {status.get('error') or 'unknown error'}"
    interval = metrics.get("best_val_acc_ci95") or [None, None]
    return {
        "backbone": candidate.name,
        "status": state,
        "val_acc": metrics.get("best_val_acc"),
        "val_acc_lo": interval[0],
        "val_acc_hi": interval[1],
        "macro_f1": metrics.get("val_f1_macro"),
        "params": metrics.get("params"),
        "feature_dim": metrics.get("feature_dim"),
        "images_per_s": probe.get("features_images_per_s"),
        "seconds": status.get("seconds"),
    }


def run_candidate(cfg: DictConfig, candidate: Candidate, job_dir: Path, train: Any) -> dict:
    """Train one candidate, or reuse its finished run; a failure is recorded, not raised."""
    spec = {**asdict(candidate), "overrides": _user_overrides()}
    previous = read_status(job_dir) or {}
    metrics_file = job_dir / "metrics.json"
    if previous.get("candidate") == spec and previous.get("status") == "done":
        metrics = read_json(metrics_file)
        if metrics is not None:
            log.info("Candidate %s finished in an earlier run: reusing it", candidate.name)
            return _row(candidate, previous, metrics)
    attempts = int(previous.get("attempts", 0)) + 1
    write_status(job_dir, status="running", candidate=spec, attempts=attempts, error=None)
    start = time.perf_counter()
    try:
        with isolated_job(parallel_jobs=1):
            metrics = train(_candidate_cfg(cfg, candidate, job_dir))
    except Exception as err:
        user_error = find_user_error(err)
        message = str(user_error) if user_error else f"{type(err).__name__}: {err}"
        message = (message.splitlines() or [""])[0]
        log.error("Candidate %s failed: %s", candidate.name, message)
        status = write_status(
            job_dir, status="failed", error=message, seconds=round(time.perf_counter() - start, 1)
        )
        return _row(candidate, status, None)
    except BaseException:
        write_status(job_dir, status="interrupted")
        raise
    status = write_status(job_dir, status="done", seconds=round(time.perf_counter() - start, 1))
    return _row(candidate, status, metrics)


def pareto_front(frame: pd.DataFrame) -> pd.Series:
    """Rows no other row beats on both val accuracy and extraction speed."""
    ok = frame["val_acc"].notna() & frame["images_per_s"].notna()
    front = pd.Series(False, index=frame.index)
    for i in frame.index[ok]:
        acc, speed = frame.at[i, "val_acc"], frame.at[i, "images_per_s"]
        others = frame[ok & (frame.index != i)]
        beaten = (others["val_acc"] >= acc) & (others["images_per_s"] >= speed)
        beaten &= (others["val_acc"] > acc) | (others["images_per_s"] > speed)
        front[i] = not beaten.any()
    return front


def plot_pareto(frame: pd.DataFrame, path: Path) -> bool:
    """Val accuracy against extraction images/s, the Pareto front joined and marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vision_tl.core.plots import save_figure

    done = frame[frame["val_acc"].notna() & frame["images_per_s"].notna()]
    if done.empty:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=100)
    front = done[done["pareto"]].sort_values("images_per_s")
    ax.scatter(done["images_per_s"], done["val_acc"], color="tab:gray", label="candidate")
    ax.plot(front["images_per_s"], front["val_acc"], "o-", color="tab:red", label="Pareto front")
    for _, row in done.iterrows():
        ax.annotate(row["backbone"], (row["images_per_s"], row["val_acc"]), fontsize=7)
    ax.set_xlabel("feature extraction images/s")
    ax.set_ylabel("val accuracy (converged linear probe)")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return True


def run_select(cfg: DictConfig, train: Any) -> pd.DataFrame:
    """Rank `cfg.candidates` by `train` (a training run) into `cfg.paths.output_dir`:
    leaderboard.csv / .md, pareto.png and winner.txt (the line that trains the winner)."""
    import torch

    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = cfg.get("candidates")
    spec = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else spec
    candidates = parse_candidates(spec, cfg.get("weights_dir"), torch.cuda.is_available())
    budget = cfg.get("time_budget")
    start = time.perf_counter()
    rows = []
    for candidate in candidates:
        job_dir = out / "candidates" / candidate.slug
        if budget is not None and time.perf_counter() - start > float(budget):
            log.warning("time_budget=%s s spent: %s not run", budget, candidate.name)
            rows.append(_row(candidate, {"status": "skipped: time budget"}, None))
            continue
        rows.append(run_candidate(cfg, candidate, job_dir, train))
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    frame = frame.astype({"params": "Int64", "feature_dim": "Int64"})
    frame = frame.sort_values(["val_acc", "images_per_s"], ascending=False, na_position="last")
    frame = frame.reset_index(drop=True)
    frame["tied_with_best"] = tied_with_best(frame, "val_acc")
    frame["pareto"] = pareto_front(frame)
    write_csv(frame, out / "leaderboard.csv", index=False)
    plot_pareto(frame, out / "pareto.png")
    done = frame[frame["status"] == "done"]
    text = to_markdown(frame)
    if done.empty:
        write_text(out / "leaderboard.md", text + "\nNo candidate finished.\n")
        raise ConfigError(f"no candidate finished; see {out / 'leaderboard.csv'}")
    winner = next(c for c in candidates if c.name == done.iloc[0]["backbone"])
    line = train_line(winner, _user_overrides())
    write_text(out / "winner.txt", line + "\n")
    write_text(
        out / "leaderboard.md",
        f"{text}\nWinner: {winner.name}. Train it with:\n\n```\n{line}\n```\n",
    )
    log.info("Leaderboard: %s\nTrain the winner (%s) with:\n%s", out, winner.name, line)
    return frame
