"""Open-set recognition: a score that says how much an image looks like the known classes,
and a threshold fitted on data, so `predict` can answer `unknown` instead of forcing one of
the trained classes onto an image of something else.

Scores (higher = more known), one registered function each:
- `msp`: the top calibrated softmax probability (Hendrycks & Gimpel, 2017), the baseline;
- `energy`: `logsumexp(logits)` (Liu et al., NeurIPS 2020), from logits alone, so an
  exported model applies it too;
- `knn`: the cosine similarity to the k-th nearest training feature (Sun et al., ICML 2022),
  from a bank of L2-normalised training features the checkpoint carries;
- `knn_msp` (the default without a pool): `knn` and `msp`, each standardised on the known
  val images, summed. On vehicles6 with two classes held out it was the best or near-best
  of these on both hold-outs measured, where each single score failed on one;
- `pool`: a known-vs-unknown direction in feature space learnt from the run's unlabelled
  pool (`data.unlabeled`), which holds the unknown classes the labelled images lack (a
  logistic regression self-trained from a kNN contrast, `pool_direction`);
- `pool_msp` (the default with a pool that looks unlike the known classes): `pool` and
  `msp`, standardised and summed. On vehicles6 with four hold-outs it lifted AUROC from
  0.74-0.84 (`knn_msp`, mean 0.80) to 0.84-0.96 (mean 0.90), above `knn_msp` on each
  (`bench/openset_pool.py`, `bench/unlabelled.py`).

The threshold keeps `tpr` of the known val images (they never trained the model or the
bank); with examples of unknown images, the one that best separates them (largest TPR -
FPR) among those keeping at least `tpr`. All scores are fitted at once (they are cheap),
the chosen one decides, and the logit-only ones travel in an export's card.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vision_tl.core.errors import ConfigError
from vision_tl.core.registry import Registry
from vision_tl.core.runtime import backbone_precision
from vision_tl.core.validate import check_values
from vision_tl.data.augment import map_inputs
from vision_tl.data.decode import ReadLimits
from vision_tl.data.features import split_teacher
from vision_tl.data.unlabeled import list_images, unlabeled_pool
from vision_tl.training.rules import RULES

log = logging.getLogger(__name__)

# (features, logits, temperature, detector) -> [N] scores, higher = more like the known classes.
ScoreFn = Callable[[torch.Tensor | None, torch.Tensor, float, "OpenSet"], torch.Tensor]
SCORES: Registry[ScoreFn] = Registry("open-set score")
# Scores computed from the logits alone: what an exported model (logits only) can apply.
LOGIT_SCORES = ("energy", "msp")
# The detector field other scores need (None there: the score cannot be computed).
NEEDS = {"knn": "bank", "knn_msp": "bank", "pool": "direction", "pool_msp": "direction"}


@SCORES.register("msp")
def max_softmax(features: Any, logits: torch.Tensor, temperature: float, det: Any) -> torch.Tensor:
    return (logits.double() / temperature).softmax(1).amax(1).float()


@SCORES.register("energy")
def energy(features: Any, logits: torch.Tensor, temperature: float, det: Any) -> torch.Tensor:
    return torch.logsumexp(logits.double(), dim=1).float()


@SCORES.register("knn")
def knn(features: Any, logits: torch.Tensor, temperature: float, det: Any) -> torch.Tensor:
    if features is None or det.bank is None:
        raise ConfigError("open_set.score=knn needs backbone features and the training bank")
    return knn_similarity(features, det.bank, det.k)


@SCORES.register("knn_msp")
def knn_msp(features: Any, logits: torch.Tensor, temperature: float, det: Any) -> torch.Tensor:
    """`knn` and `msp`, each standardised by its mean and spread on the known val images,
    summed: near-copies of nothing known (knn) and confusion between known classes (msp)."""
    return standardised_sum(("knn", "msp"), features, logits, temperature, det)


@SCORES.register("pool")
def pool(features: Any, logits: torch.Tensor, temperature: float, det: Any) -> torch.Tensor:
    if features is None or det.direction is None:
        raise ConfigError(
            "open_set.score=pool needs backbone features and a direction fitted on a pool "
            "(train with data.unlabeled=POOL)"
        )
    return (features.double() @ det.direction.double() + det.offset).float()


@SCORES.register("pool_msp")
def pool_msp(features: Any, logits: torch.Tensor, temperature: float, det: Any) -> torch.Tensor:
    """`pool` and `msp`, standardised on the known val images and summed: what the pool's
    unknown classes look like (pool) and confusion between known classes (msp)."""
    return standardised_sum(("pool", "msp"), features, logits, temperature, det)


def standardised_sum(
    names: tuple[str, ...], features: Any, logits: torch.Tensor, temperature: float, det: Any
) -> torch.Tensor:
    """The sum of `names`' scores, each standardised by its (mean, std) in `det.stats`."""
    total = torch.zeros(len(logits))
    for name in names:
        mean, std = det.stats[name]
        total += (SCORES.get(name)(features, logits, temperature, det) - mean) / std
    return total


def knn_similarity(
    features: torch.Tensor, bank: torch.Tensor, k: int, chunk: int = 1024
) -> torch.Tensor:
    """Cosine similarity of each row of `features` to its k-th nearest row of `bank`."""
    bank = F.normalize(bank.float(), dim=1)
    k = max(1, min(int(k), len(bank)))
    out = []
    for rows in features.float().split(chunk):
        sims = F.normalize(rows, dim=1) @ bank.T
        out.append(sims.topk(k, dim=1).values[:, -1])
    return torch.cat(out) if out else torch.empty(0)


@dataclass
class OpenSet:
    """`kind`'s score, and `thresholds` per score kind (images scoring below are unknown);
    `bank`: L2-normalised training features for `knn`; `direction` and `offset`: the
    pool's known-vs-unknown direction for `pool`; `fitted_on`: what chose them."""

    kind: str
    thresholds: dict[str, float]
    tpr: float = 0.95
    k: int = 1
    bank: torch.Tensor | None = None
    fitted_on: dict[str, Any] = field(default_factory=dict)
    # (mean, std) of a score on the known val images, for the summed scores.
    stats: dict[str, tuple[float, float]] = field(default_factory=dict)
    direction: torch.Tensor | None = None
    offset: float = 0.0

    @property
    def threshold(self) -> float:
        return self.thresholds[self.kind]

    def kinds(self) -> list[str]:
        """The score kinds this detector can compute (the logit-only ones always)."""
        return [k for k in SCORES if k not in NEEDS or getattr(self, NEEDS[k]) is not None]

    def scores(
        self,
        features: torch.Tensor | None,
        logits: torch.Tensor,
        temperature: float = 1.0,
        kind: str | None = None,
    ) -> torch.Tensor:
        """Each image's score (higher = more known) by `kind` (default: this detector's)."""
        return SCORES.get(kind or self.kind)(features, logits, temperature, self)

    def unknown(
        self, features: torch.Tensor | None, logits: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        """True where an image scores below the fitted threshold."""
        return self.scores(features, logits, temperature) < self.threshold

    def as_dict(self) -> dict[str, Any]:
        """What the checkpoint stores (the bank as a float16 tensor)."""
        bank = None if self.bank is None else self.bank.to(torch.float16)
        return {
            "kind": self.kind,
            "thresholds": dict(self.thresholds),
            "tpr": self.tpr,
            "k": self.k,
            "bank": bank,
            "fitted_on": dict(self.fitted_on),
            "stats": {k: list(v) for k, v in self.stats.items()},
            "direction": self.direction,
            "offset": self.offset,
        }

    def card(self) -> dict[str, Any] | None:
        """The entry an export's `model.json` carries: this detector when its score needs
        only logits, else the best logit-only score fitted beside it."""
        kind = self.kind if self.kind in LOGIT_SCORES else self.fitted_on.get("logit_kind")
        if kind not in self.thresholds:
            return None
        return {"kind": kind, "threshold": self.thresholds[kind], "tpr": self.tpr}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> OpenSet | None:
        if not data:
            return None
        if "thresholds" not in data:  # an export card: one logit-only score
            kind = str(data["kind"])
            return cls(kind, {kind: float(data["threshold"])}, float(data.get("tpr", 0.95)))
        bank, direction = data.get("bank"), data.get("direction")
        return cls(
            str(data["kind"]),
            {str(k): float(v) for k, v in data["thresholds"].items()},
            float(data.get("tpr", 0.95)),
            int(data.get("k", 1)),
            None if bank is None else torch.as_tensor(bank).float(),
            dict(data.get("fitted_on") or {}),
            {str(k): (float(v[0]), float(v[1])) for k, v in (data.get("stats") or {}).items()},
            None if direction is None else torch.as_tensor(direction).double(),
            float(data.get("offset", 0.0)),
        )


def bank_of(features: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """At most `size` training features, L2-normalised (a seeded random subset beyond it)."""
    return F.normalize(sample_rows(features, size, seed).float(), dim=1)


def threshold_at_tpr(known: torch.Tensor, tpr: float) -> float:
    """The score that keeps at least `tpr` of `known` (scores at or above it are known)."""
    if not 0 < tpr < 1:
        raise ConfigError(f"open_set.tpr={tpr}: a number > 0 and < 1")
    ordered = known.double().sort(descending=True).values
    keep = min(len(ordered), max(1, int(torch.ceil(torch.tensor(tpr * len(ordered))))))
    return float(ordered[keep - 1])


def best_separating(known: torch.Tensor, unknown: torch.Tensor, tpr: float) -> float:
    """Among thresholds keeping at least `tpr` of `known`, the one with the largest TPR - FPR."""
    floor = threshold_at_tpr(known, tpr)
    candidates = torch.cat([known, unknown]).double().unique()
    candidates = candidates[candidates <= floor]
    if len(candidates) == 0:
        return floor
    kept = (known.double()[None, :] >= candidates[:, None]).double().mean(1)
    passed = (unknown.double()[None, :] >= candidates[:, None]).double().mean(1)
    return float(candidates[(kept - passed).argmax()])


def sample_rows(features: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """At most `size` rows of `features` (a seeded random subset beyond it)."""
    if len(features) <= size:
        return features
    generator = torch.Generator().manual_seed(seed)
    return features[torch.randperm(len(features), generator=generator)[:size]]


def pool_direction(
    train: torch.Tensor,
    val: torch.Tensor,
    pool: torch.Tensor,
    tpr: float,
    k: int = 10,
    rounds: int = 3,
    strength: float = 0.1,
) -> tuple[torch.Tensor, float] | None:
    """(direction, offset): a linear score, higher = more like the known classes, learnt
    from an unlabelled pool that may hold classes the labelled images lack; None when the
    pool looks like the known classes: the share of it below the seed's threshold exceeds
    the known images' 1 - `tpr` by less than 1 - `tpr` again, or than three standard
    errors of the two shares (with only known classes in the pool, a direction scored
    unknown images worse than chance on vehicles6).

    The seed score is a kNN contrast: similarity to the nearest training feature minus
    similarity to the k-th nearest other pool feature. An image of an unknown class has
    close neighbours in the pool (its own class) and none among the training images; a
    known one has both. The pool images below the seed's threshold keeping `tpr` of the
    known val images (that share of the pool) are taken as unknown, the pool's upper half
    and the training images as known, and a class-balanced L2 logistic regression
    (C = `strength`, on features standardised by the training split) separates them;
    `rounds` times, each relabelling the pool by the last fit at the same share. On
    vehicles6 this lifted AUROC well above the kNN and softmax scores, on the pool itself
    and on unseen images alike (`bench/openset_pool.py`)."""
    from sklearn.linear_model import LogisticRegression

    train, val, pool = train.double(), val.double(), pool.double()

    def contrast(x: torch.Tensor, own: bool = False) -> torch.Tensor:
        nearest_pool = knn_similarity(x, pool, k + 1 if own else k)
        return (knn_similarity(x, train, 1) - nearest_pool).double()

    score = contrast(pool, own=True)
    share = float((score < threshold_at_tpr(contrast(val), tpr)).double().mean())
    expected = 1 - tpr  # the share of known images below the threshold
    noise = 3 * math.sqrt(expected * tpr * (1 / len(val) + 1 / len(pool)))
    if share - expected < max(expected, noise):
        # Not clearly more of the pool than of the known images is below the threshold:
        # nothing in it looks unknown, and a direction would only learn noise.
        return None
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    model = LogisticRegression(C=strength, class_weight="balanced", max_iter=3000)
    for _ in range(rounds):
        low = score <= torch.quantile(score, share)
        high = score >= torch.quantile(score, 0.5)
        x = torch.cat([train, pool[high], pool[low]])
        y = torch.cat([torch.ones(len(train) + int(high.sum())), torch.zeros(int(low.sum()))])
        model.fit(((x - mean) / std).numpy(), y.numpy())
        coef = torch.as_tensor(model.coef_[0], dtype=torch.float64)
        score = ((pool - mean) / std) @ coef + float(model.intercept_[0])
    direction = coef / std
    return direction, float(model.intercept_[0]) - float((direction * mean).sum())


def fit_open_set(
    kind: str,
    val_features: torch.Tensor,
    val_logits: torch.Tensor,
    train_features: torch.Tensor,
    temperature: float = 1.0,
    tpr: float = 0.95,
    k: int = 1,
    bank_size: int = 4096,
    unknown: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
    pool: torch.Tensor | None = None,
) -> OpenSet:
    """A detector whose thresholds keep `tpr` of the known val images, for every score kind
    it can compute (`unknown`: (features, logits) of example unknown images to separate
    from them; `pool`: features of unlabelled images, for the `pool` scores)."""
    SCORES.get(kind)  # an unknown name fails here, in one line
    detector = OpenSet(kind, {}, tpr, k, bank_of(train_features, bank_size, seed))
    if pool is not None and len(pool):
        fitted = pool_direction(train_features, val_features, pool, tpr)
        if fitted is not None:
            detector.direction, detector.offset = fitted
    if kind not in detector.kinds():
        log.warning(
            "Open set: the pool looks like the labelled classes (not clearly more of it "
            "than of the known val images is below the threshold), so the %s score is not "
            "fitted; knn_msp decides",
            kind,
        )
        detector.kind = "knn_msp"
    for name in ("knn", "msp", "pool"):  # what the summed scores standardise by
        if name not in detector.kinds():
            continue
        known = detector.scores(val_features, val_logits, temperature, name).double()
        std = float(known.std()) if len(known) > 1 else 0.0
        detector.stats[name] = (float(known.mean()), std if std > 1e-6 else 1.0)
    for name in detector.kinds():
        known = detector.scores(val_features, val_logits, temperature, name)
        if unknown is None:
            detector.thresholds[name] = threshold_at_tpr(known, tpr)
        else:
            other = detector.scores(*unknown, temperature, name)
            detector.thresholds[name] = best_separating(known, other, tpr)
    detector.fitted_on = {
        "val_images": len(val_logits),
        "bank_images": len(detector.bank) if detector.bank is not None else 0,
        "unknown_images": 0 if unknown is None else len(unknown[1]),
        "pool_images": 0 if pool is None else len(pool),
        "logit_kind": "energy",
    }
    return detector


# --------------------------------------------------------------------------- after a run


@dataclass(frozen=True)
class OpenSetSettings:
    """`open_set.*`: the score that decides (`score`, null: none fitted), the share of known
    val images kept (`tpr`), the k of `knn`, how many training features the checkpoint
    keeps (`bank_size`), a folder or CSV of example unknown images (`unknown`); and the
    run's unlabelled pool (`data.unlabeled`), of which at most `pool_size` images teach
    the `pool` scores, read within `limits`."""

    score: str | None = "knn_msp"
    tpr: float = 0.95
    k: int = 1
    bank_size: int = 4096
    unknown: str | None = None
    pool_size: int = 4096
    pool: str | None = None
    limits: ReadLimits = field(default_factory=ReadLimits)

    @classmethod
    def from_config(
        cls,
        node: Mapping[str, Any] | None,
        pool: str | None = None,
        limits: ReadLimits | None = None,
    ) -> OpenSetSettings:
        """The settings of `node`, `score: auto` resolved here, before any training:
        `pool_msp` when the run has a pool, else `knn_msp`."""
        node, pool = dict(node or {}), str(pool) if pool else None
        # The command line's table (`training.rules`), so settings built in code obey it.
        check_values("open_set", node, RULES, {"data": {"unlabeled": pool}})
        nullable = ("score", "unknown")
        fields = [k for k in cls.__dataclass_fields__ if k in node and k not in ("pool", "limits")]
        given = {"score": "auto"} | {
            k: node[k] for k in fields if node[k] is not None or k in nullable
        }
        if given["score"] == "auto":
            given["score"] = "pool_msp" if pool else "knn_msp"
        return cls(**given, pool=pool, limits=limits or ReadLimits())


@torch.inference_mode()
def outputs(
    model: Any,
    datamodule: Any,
    samples: str | list[tuple[str, int]],
    device: torch.device,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, labels, features) of a split or of other files, with `model`'s weights: the
    cached features while the datamodule serves them, else the images through the backbone
    in `precision` (its head in float32, as inference runs it)."""
    served = isinstance(samples, str) and datamodule.features is not None
    model = model.to(device).eval()
    chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for x, y in datamodule.eval_loader(samples):
        if len(y) == 0:
            continue
        if served:
            features = split_teacher(x)[0].to(device).float()
        else:
            x = datamodule.normalize(map_inputs(lambda t: t.to(device), x))
            with backbone_precision(precision, device):
                features = model.features(x).float()
        logits = model.classify_features(features).float()
        chunks.append((logits.cpu(), y.cpu(), features.cpu()))
    if not chunks:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, 0)
    return tuple(torch.cat(parts) for parts in zip(*chunks, strict=True))  # type: ignore[return-value]


def fit_for_run(
    settings: OpenSetSettings,
    model: Any,
    datamodule: Any,
    val: tuple[torch.Tensor, torch.Tensor],
    temperature: float,
    device: torch.device,
    seed: int = 0,
    precision: str = "fp32",
) -> OpenSet | None:
    """The run's detector from its best weights (`model`) and their val (logits, features):
    thresholds on val, the bank from train, the `pool` direction from the run's pool,
    separated from `settings.unknown`'s images when given, each through the backbone in
    `precision` (the val pass's). None when no score is asked for or a split gave nothing."""
    val_logits, val_features = val
    if settings.score is None or len(val_logits) == 0:
        return None
    _, _, train_features = outputs(model, datamodule, "train", device, precision)
    if len(train_features) == 0:
        return None
    unknown = None
    if settings.unknown:
        files = [(f, -1) for f in list_images(settings.unknown, "open_set.unknown")]
        logits, _, features = outputs(model, datamodule, files, device, precision)
        unknown = (features, logits) if len(logits) else None
    pool_features = None
    if settings.pool and NEEDS.get(str(settings.score)) == "direction":
        cache = datamodule.cache_root
        files = unlabeled_pool(settings.pool, datamodule.catalog.all_keys(), cache, settings.limits)
        if len(files) > settings.pool_size:
            rows = sample_rows(torch.arange(len(files)), settings.pool_size, seed)
            files = [files[i] for i in rows.sort().values]
        log.info("Open set: %d pool image(s) teach the pool score", len(files))
        pool = [(f, -1) for f in files]
        pool_features = outputs(model, datamodule, pool, device, precision)[2]
    return fit_open_set(
        settings.score,
        val_features,
        val_logits,
        train_features,
        temperature,
        settings.tpr,
        settings.k,
        settings.bank_size,
        unknown,
        seed,
        pool_features,
    )


def detector_summary(detector: OpenSet) -> dict[str, Any]:
    """What metrics.json says of a fitted detector (everything but its tensors)."""
    return {k: v for k, v in detector.as_dict().items() if k not in ("bank", "direction")} | {
        "threshold": detector.threshold
    }


# --------------------------------------------------------------------------- how well it works


def open_set_metrics(known: torch.Tensor, unknown: torch.Tensor) -> dict[str, float]:
    """AUROC of known vs unknown by score, and the FPR on unknown at 95% TPR on known."""
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    scores = torch.cat([known, unknown]).double()
    target = torch.cat([torch.ones(len(known)), torch.zeros(len(unknown))]).long()
    auroc = float(binary_auroc(scores, target))
    fpr, tpr, _ = binary_roc(scores, target)
    fpr95 = float(fpr[tpr >= 0.95].min()) if bool((tpr >= 0.95).any()) else 1.0
    return {"open_set_auroc": auroc, "open_set_fpr95": fpr95}


def risk_coverage(scores: torch.Tensor, correct: torch.Tensor) -> tuple[list[float], list[float]]:
    """Coverage (share of images answered, most known-looking first) against risk (share of
    the answered that are wrong: an unknown image or a misclassified known one)."""
    order = scores.double().argsort(descending=True)
    wrong = (~correct.bool())[order].double()
    answered = torch.arange(1, len(order) + 1, dtype=torch.float64)
    return (answered / len(order)).tolist(), (wrong.cumsum(0) / answered).tolist()


def plot_risk_coverage(curves: dict[str, tuple[list[float], list[float]]], path: Path) -> None:
    """One risk-coverage line per score kind (lower is better), saved as a PNG."""
    import matplotlib.pyplot as plt

    from vision_tl.core.plots import save_figure

    fig, ax = plt.subplots(figsize=(5, 4))
    for name, (coverage, risk) in curves.items():
        ax.plot(coverage, risk, label=name)
    ax.set(xlabel="coverage (share answered)", ylabel="risk (share answered wrongly)")
    ax.set_title("Risk-coverage: known and unknown images")
    ax.legend()
    save_figure(fig, path)
