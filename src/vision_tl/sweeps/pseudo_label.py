"""Pseudo-labelling (`semi=pseudo_label`): learn from `data.unlabeled`'s images too.

Round 0 trains on the labelled images alone. Its best checkpoint (or `semi.teacher`)
labels the pool with calibrated probabilities; a pool image joins class c when its
probability of c is at least `semi.min_confidence` (0.9) and, with `semi.quantile`, at
least that quantile of the teacher's confidence on its correctly classified training
images of c (a per-class threshold chosen on the training split, never on val); the most
confident first, no class more than `semi.max_ratio` times the (lower) median class's
count, relative to the labelled class shares, and never an image the teacher's open-set
detector calls unknown. On vehicles6 the fixed 0.9
gained more than the training-split quantiles (0.1, 0.2, 0.5), than quantiles of val
confidence and than top-n per class (`bench/unlabelled.py`): a teacher is overconfident
on its own training images, so their quantiles reject most of the pool.
The next round trains on labelled + pseudo-labelled images (hard labels), and teaches the
round after it. Each round is an ordinary run in its own folder reading the data through
`FoldSource`, so val and test stay exactly the labelled run's, and round 0's val accuracy
is the "without" of the same run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, open_dict

from vision_tl.core.errors import ConfigError
from vision_tl.core.io import write_json
from vision_tl.data.decode import ReadLimits
from vision_tl.data.source import Catalog, Source
from vision_tl.data.unlabeled import unlabeled_pool
from vision_tl.inference.checkpoint import LoadedModel, load_checkpoint
from vision_tl.inference.predictor import Predictor, predictor_from_config, run_settings
from vision_tl.sweeps.cv import FoldSource, finished_run
from vision_tl.training.build import build_data

log = logging.getLogger(__name__)

TrainFn = Callable[..., dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class Selection:
    """`semi.*`: how sure the teacher must be, how many per class, and unknown images."""

    min_confidence: float = 0.9
    quantile: float | None = None
    max_ratio: float | None = 2.0
    exclude_unknown: bool = True

    @classmethod
    def from_config(cls, node: Any) -> Selection:
        fields = [k for k in cls.__dataclass_fields__ if k in node]
        return cls(**{k: node[k] for k in fields if node[k] is not None or k != "min_confidence"})


def class_thresholds(
    probs: torch.Tensor, labels: torch.Tensor, quantile: float | None, floor: float
) -> torch.Tensor:
    """Per class: `floor`, or with a `quantile`, the teacher's confidence at that quantile on
    its correctly classified training images of the class when higher (1.0 when it gets
    none right)."""
    out = torch.full((probs.shape[1],), float(floor))
    if quantile is None:
        return out
    confidence, predicted = probs.max(1)
    for c in range(probs.shape[1]):
        right = confidence[(labels == c) & (predicted == c)]
        out[c] = max(floor, float(torch.quantile(right.double(), quantile))) if len(right) else 1.0
    return out


def confident(
    probs: torch.Tensor, unknown: torch.Tensor, thresholds: torch.Tensor
) -> list[torch.Tensor]:
    """Per class, the pool rows predicted as it that pass its threshold and are not
    unknown, the most confident first."""
    confidence, predicted = probs.max(1)
    passing = []
    for c in range(probs.shape[1]):
        rows = ((predicted == c) & (confidence >= thresholds[c]) & ~unknown).nonzero().flatten()
        passing.append(rows[confidence[rows].argsort(descending=True, stable=True)])
    return passing


def capped(
    passing: list[torch.Tensor], max_ratio: float | None, shares: torch.Tensor | None = None
) -> list[tuple[int, int]]:
    """(pool row, class) of `passing`'s rows. With `max_ratio`, no class keeps more than that
    many times the median class's count, each count taken relative to the class's share of
    the labelled images (`shares`; equal when None). The lower median: with two classes it
    is the smaller count, so a teacher sure of one class alone cannot tilt training to it,
    and with many a class the pool lacks does not stop the others."""
    if max_ratio is not None:
        if shares is None:
            shares = torch.full((len(passing),), 1.0 / len(passing))
        pairs = list(zip(passing, shares.tolist(), strict=True))
        relative = torch.tensor([len(rows) / share for rows, share in pairs if share > 0])
        median = float(relative.median())  # torch's median is the lower one
        passing = [rows[: int(max_ratio * median * share + 1e-9)] for rows, share in pairs]
    return [(int(r), c) for c, rows in enumerate(passing) for r in rows]


def label_pool(
    loaded: LoadedModel,
    predictor: Predictor,
    source: Source,
    catalog: Catalog,
    pool: list[str],
    selection: Selection,
) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The pseudo-labelled (file, class) pairs, and what was decided (per class)."""
    train, names = catalog.samples["train"], catalog.class_names
    labels = torch.tensor([c for _, c in train])
    thresholds = torch.full((len(names),), float(selection.min_confidence))
    if selection.quantile is not None:  # only then the teacher runs over its training images
        own = predictor.predict([k for k, _ in train], source.reader(loaded.preprocess))
        readable = labels[torch.tensor(own.indices, dtype=torch.long)]
        thresholds = class_thresholds(
            own.probs, readable, selection.quantile, selection.min_confidence
        )
    result = predictor.predict(pool, keep_outputs=True)
    unknown = torch.zeros(len(result.indices), dtype=torch.bool)
    if selection.exclude_unknown and loaded.open_set is not None:
        assert result.logits is not None
        unknown = loaded.open_set.unknown(result.features, result.logits, predictor.temperature)
    shares = torch.bincount(labels, minlength=len(names)).float() / len(labels)
    passing = confident(result.probs, unknown, thresholds)
    chosen = capped(passing, selection.max_ratio, shares)
    sure = {name: len(rows) for name, rows in zip(names, passing, strict=True)}
    used = {name: 0 for name in names}
    for _, c in chosen:
        used[names[c]] += 1
    decided = {
        "pool_images": len(result.indices),
        "unreadable": len(result.unreadable),
        "unknown_excluded": int(unknown.sum()),
        "thresholds": {name: round(float(t), 6) for name, t in zip(names, thresholds, strict=True)},
        "sure_per_class": sure,
        "used_per_class": used,
        "used": len(chosen),
    }
    return [(pool[result.indices[row]], c) for row, c in chosen], decided


def round_config(cfg: DictConfig, folder: Path, final: bool) -> DictConfig:
    """A round's run: this config in `folder`, no pseudo-labelling of its own; only the
    last round writes predictions."""
    run = cfg.copy()
    with open_dict(run):
        run.paths.output_dir = str(folder)
        run.semi = None
        if not final:
            run.predict_input = None
    return run


def run_pseudo_label(cfg: DictConfig, train: TrainFn) -> dict[str, Any]:
    """Round 0, then `semi.rounds` rounds with pseudo-labels; `metrics.json` (the last
    round's, with `semi`) and `semi.json` in the run dir. A rerun after a stop reuses the
    rounds that finished with the same config."""
    semi = cfg.semi
    if not cfg.data.get("unlabeled"):
        raise ConfigError("semi=pseudo_label needs data.unlabeled=DIR (images without labels)")
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = build_data(cfg.data)
    catalog = data.catalog
    limits = ReadLimits.from_config(cfg.data)
    cache = Path(cfg.data.cache).expanduser() if cfg.data.get("cache") else None
    pool = unlabeled_pool(cfg.data.unlabeled, catalog.all_keys(), cache, limits)
    selection = Selection.from_config(semi)
    rounds = int(semi.get("rounds") or 1)

    def fit(r: int, samples: Catalog) -> dict[str, Any]:
        folder = out / f"round_{r}"
        run_cfg = round_config(cfg, folder, final=r == rounds)
        done = finished_run(run_cfg, folder)
        if done is not None:
            log.info("Pseudo-labels round %d finished in an earlier run: reusing it", r)
            return done
        return train(run_cfg, source=FoldSource(data.source, samples))

    log.info("Pseudo-labels round 0: %d labelled training images", len(catalog.samples["train"]))
    metrics = fit(0, catalog)
    history: list[dict[str, Any]] = [{"round": 0, "used": 0, "val_acc": metrics["best_val_acc"]}]
    teacher = semi.get("teacher") or _best(metrics)
    for r in range(1, rounds + 1):
        loaded = load_checkpoint(teacher)
        predictor = predictor_from_config(loaded, run_settings(cfg))
        pseudo, decided = label_pool(loaded, predictor, data.source, catalog, pool, selection)
        log.info(
            "Pseudo-labels round %d: %d pool images join training (%s); %d called unknown",
            r,
            decided["used"],
            ", ".join(f"{k} {v}" for k, v in decided["used_per_class"].items()),
            decided["unknown_excluded"],
        )
        if not decided["used"] and any(decided["sure_per_class"].values()):
            log.warning(
                "Pseudo-labels round %d: the teacher is sure of no pool image of %s, and "
                "semi.max_ratio lets no class outnumber the median class, so none join "
                "(semi.max_ratio=null lifts the cap)",
                r,
                ", ".join(k for k, v in decided["sure_per_class"].items() if not v),
            )
        samples = {**catalog.samples, "train": [*catalog.samples["train"], *pseudo]}
        metrics = fit(r, dataclasses.replace(catalog, samples=samples))
        history.append(
            {"round": r, **decided, "teacher": str(teacher), "val_acc": metrics["best_val_acc"]}
        )
        teacher = _best(metrics)
    summary = {
        "method": "pseudo_label",
        "rounds": history,
        "val_acc_without": history[0]["val_acc"],
        "val_acc_with": history[-1]["val_acc"],
        "pool": str(cfg.data.unlabeled),
    }
    write_json(out / "semi.json", summary)
    metrics = {**metrics, "semi": summary}
    write_json(out / "metrics.json", metrics)
    log.info(
        "Pseudo-labels: val acc %.4f without, %.4f with them (%d round(s)); run in %s",
        summary["val_acc_without"],
        summary["val_acc_with"],
        rounds,
        out,
    )
    return metrics


def _best(metrics: dict[str, Any]) -> str:
    return str(metrics.get("best_checkpoint") or metrics.get("last_checkpoint"))
