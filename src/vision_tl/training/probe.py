"""The converged linear probe: its settings chosen on the training split, never on val.

On cached features one epoch of a linear head costs milliseconds, so rather than one
fixed LR and a few epochs, a small grid (learning rate x L2 penalty, and with or without
the cached augmented views when the augmentation is random) is trained for the probe's
full number of epochs on k-1 stratified folds of the training split and scored on the
held-out fold.

The penalty is the standard linear evaluation's: L2-regularised multinomial logistic
regression, cross-entropy + l2/2 x the squared norm of the head's weights (`l2_penalty`), in
the loss. The objective is then the same whatever `optimizer=` runs it; the optimizer's
own weight decay is off for the probe (AdamW's decoupled decay has no such objective, and
means something else for Adam or SGD).

The setting chosen by the one-standard-error rule (`choose`) then trains the head on the
whole training split, in the ordinary Lightning fit. The val split is never read here, so
the val accuracy a run reports stays an honest estimate.

Each candidate trains exactly as the fit will: the run's optimizer and scheduler
(`optimizer.*` other than LR and weight decay, `scheduler.*`), batch size, sampler, loss
(label smoothing, class weights, the L2 penalty) and one random cached view per image per
epoch.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch.utils.data import BatchSampler

from vision_tl.core.errors import ConfigError
from vision_tl.data.features import CachedFeatures
from vision_tl.data.samplers import ViewSampler, train_sampler
from vision_tl.models.classifier import Classifier

log = logging.getLogger(__name__)

SEARCH_SEED = 0  # the search draws its folds, batches and views from its own generator


@dataclass(frozen=True)
class ProbeGrid:
    """What the search tries, for how many epochs, on how many folds."""

    lrs: Sequence[float]
    l2s: Sequence[float]
    epochs: int
    folds: int


@dataclass
class ProbeResult:
    """The chosen setting, every candidate's held-out score, and what the search cost."""

    lr: float
    l2: float  # the head's L2 penalty (`l2_penalty`); the optimizer's weight decay is 0
    views: str  # "augmented" (the cached random views) or "eval" (the eval transform only)
    epochs: int
    folds: int
    holdout_acc: float | None  # None when nothing was searched
    candidates: list[dict[str, Any]] = field(default_factory=list)
    search_s: float = 0.0
    features_s: float = 0.0  # this run's feature extraction (0 when the cache was warm)
    features_images_per_s: float | None = None  # when the features were computed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Heads on features are tiny ops: one thread runs them faster than several, and a
    busy CPU does not stall it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _head_copy(model: Classifier) -> Classifier:
    """A copy of `model` that shares its (frozen) backbones and owns its head."""
    memo = {id(b): b for b in model.backbones()}
    return copy.deepcopy(model, memo).train()


@torch.no_grad()
def zero_logit_layers(model: Classifier) -> None:
    """Start the layers that give the class scores at zero, as logistic regression and BiT's
    heads do. The probe's objective is convex, so its optimum does not depend on where it
    starts; but on a small set 100 full-batch steps do not get there, and a random start
    left its trace in what the search chose and what the fit reached, seed by seed."""
    for layer in model.logit_layers():
        layer.weight.zero_()
        if layer.bias is not None:
            layer.bias.zero_()


def penalised(model: Classifier) -> list[torch.Tensor]:
    """What the probe's L2 penalty acts on: the head's trainable weight matrices (biases are
    not penalised, as in logistic regression). Gathered once per fit: walking the model's
    parameters costs more than a head's step."""
    return [p for p in model.head_parameters() if p.requires_grad and p.ndim > 1]


def l2_penalty(
    weights: Sequence[Sequence[torch.Tensor]], strengths: Sequence[float]
) -> torch.Tensor | float:
    """The sum over heads of strength/2 x the squared norm of their `penalised` weights,
    added to the loss. The heads' matching layers are stacked, so the search's many heads
    cost a few ops per step rather than a few per head (on CPU these small ops are what a
    step costs)."""
    if not any(strengths):
        return 0.0
    scale = _half(strengths)
    total: torch.Tensor | float = 0.0
    for layer in zip(*weights, strict=True):
        total = total + _scaled_squares(torch.stack(layer), scale)
    return total


def _half(strengths: Sequence[float]) -> torch.Tensor:
    return 0.5 * torch.tensor(strengths, dtype=torch.float32)


def _scaled_squares(stacked: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The sum over rows (one per head) of scale x the row's squared norm."""
    return (stacked.float().pow(2).flatten(1).sum(1) * scale).sum()


def _batches(
    labels: torch.Tensor, views: int, batch_size: int, sampler_kind: str, num_classes: int
) -> BatchSampler:
    """The batches of one epoch, drawn as the fit's train loader draws them."""
    base = train_sampler(sampler_kind, labels.tolist(), num_classes)
    sampler = ViewSampler(base, len(labels), views) if views > 1 else base
    return BatchSampler(sampler, batch_size, drop_last=len(labels) > batch_size)


def _linear_layer(model: Classifier) -> torch.nn.Linear | None:
    """The head's only module when it is one Linear layer on the features (the default
    probe: `model/head=linear` on one backbone, no dropout), else None."""
    head = getattr(model, "head", None)
    layers = list(head.children()) if isinstance(head, torch.nn.Sequential) else [head]
    if len(layers) == 1 and isinstance(layers[0], torch.nn.Linear):
        return layers[0]
    return None


class StackedLinear(torch.nn.Module):
    """Many linear heads as one: a (heads x classes x dim) weight, one matmul and one loss
    per step for all of them, instead of a handful of small ops per head (on CPU those ops
    are what a step costs). Heads that share an LR share a parameter, so the run's
    optimizer gets one group per LR. Adam, AdamW (no decay) and SGD update each element on
    its own, so a stacked head follows exactly the path it would follow alone."""

    def __init__(
        self, layers: Sequence[torch.nn.Linear], lrs: Sequence[float], l2s: Sequence[float]
    ) -> None:
        super().__init__()
        self.order = sorted(range(len(layers)), key=lambda i: lrs[i])
        self.scale = _half([l2s[i] for i in self.order])  # `l2_penalty`'s, per stacked row
        self.group_lrs: list[float] = []
        weights, biases = [], []
        for lr, members in itertools.groupby(self.order, key=lambda i: lrs[i]):
            chosen = [layers[i] for i in members]
            self.group_lrs.append(lr)
            weights.append(torch.nn.Parameter(torch.stack([m.weight.detach() for m in chosen])))
            bias = [
                m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features)
                for m in chosen
            ]
            biases.append(
                torch.nn.Parameter(torch.stack(bias), requires_grad=chosen[0].bias is not None)
            )
        self.weights = torch.nn.ParameterList(weights)
        self.biases = torch.nn.ParameterList(biases)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of every head, (heads x batch x classes), heads in `order`."""
        weight = torch.cat(list(self.weights))
        bias = torch.cat(list(self.biases))
        heads, classes, dim = weight.shape
        logits = features @ weight.reshape(heads * classes, dim).T
        return logits.reshape(len(features), heads, classes).transpose(0, 1) + bias.unsqueeze(1)

    def penalty(self) -> torch.Tensor:
        """`l2_penalty` of the stacked weights, each head at its own strength."""
        return _scaled_squares(torch.cat(list(self.weights)), self.scale)

    @torch.no_grad()
    def write_back(self, layers: Sequence[torch.nn.Linear]) -> None:
        """Copy each stacked head into its own Linear layer."""
        weight, bias = torch.cat(list(self.weights)), torch.cat(list(self.biases))
        for row, i in enumerate(self.order):
            layers[i].weight.copy_(weight[row])
            if layers[i].bias is not None:
                layers[i].bias.copy_(bias[row])


def _train_heads(
    task: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: list[tuple[float, float]],
    epochs: int,
    batch_size: int,
    sampler_kind: str,
    teacher_columns: int = 0,
    stack: bool = True,
) -> list[Classifier]:
    """Train one head per (lr, l2) on rows `x` (views x n x dim), side by side: every
    head sees the same batches. Rows ending in `teacher_columns` cached teacher
    logits train with the run's distillation loss. Plain linear heads train as one
    `StackedLinear` unless `stack` is off."""
    models = [_head_copy(task.model) for _ in settings]
    layers = [_linear_layer(m) for m in models]
    stacked = None
    if stack and teacher_columns == 0 and all(layer is not None for layer in layers):
        stacked = StackedLinear(layers, [lr for lr, _ in settings], [l2 for _, l2 in settings])
        groups = [
            {"params": [w, b] if b.requires_grad else [w], "lr": lr, "weight_decay": 0}
            for w, b, lr in zip(stacked.weights, stacked.biases, stacked.group_lrs, strict=True)
        ]
    else:
        groups = [
            {
                "params": [p for p in m.head_parameters() if p.requires_grad],
                "lr": lr,
                "weight_decay": 0,
            }
            for m, (lr, _) in zip(models, settings, strict=True)
        ]
        weights, strengths = [penalised(m) for m in models], [l2 for _, l2 in settings]
    optimizer = task.optimizer_factory(params=groups)
    num_classes = len(task.class_names)
    views, n = x.shape[0], x.shape[1]
    flat = x.reshape(views * n, -1)
    batches = _batches(y, views, batch_size, sampler_kind, num_classes)
    steps = len(batches)
    scheduler, per_step = None, True
    if task.scheduler_factory is not None:
        spec = task.scheduler_factory(
            optimizer, total_steps=steps * epochs, steps_per_epoch=max(1, steps)
        )
        if "monitor" not in spec:  # a plateau scheduler needs val: the search leaves it out
            scheduler, per_step = spec["scheduler"], spec.get("interval", "epoch") == "step"
    for _ in range(epochs):
        for batch in batches:
            index = torch.as_tensor(batch)
            features, teacher = split_columns(flat[index], teacher_columns)
            target = y[index % n]
            if stacked is not None:
                # The fit's loss, exactly: each head's block of the mean holds the same
                # targets, so the mean over all blocks x heads is the sum of per-head losses.
                logits = stacked(features)
                heads = logits.shape[0]
                loss = task.loss(logits.reshape(-1, logits.shape[-1]), target.repeat(heads))
                loss = loss * heads + stacked.penalty()
            else:
                loss = 0.0
                for m in models:
                    logits = m.classify_features(features)
                    task_loss = task.loss(logits, target)  # the fit's loss, exactly
                    if teacher is not None:
                        task_loss = task.distill.loss(task_loss, logits, teacher)
                    loss = loss + task_loss
                loss = loss + l2_penalty(weights, strengths)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None and per_step:
                scheduler.step()
        if scheduler is not None and not per_step:
            scheduler.step()
    if stacked is not None:
        stacked.write_back(layers)
    return models


def split_columns(x: torch.Tensor, columns: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cached rows as (features, teacher logits); no teacher columns: (rows, None)."""
    return (x[..., :-columns], x[..., -columns:]) if columns else (x, None)


def choose(candidates: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """The one-standard-error rule: of the candidates whose held-out accuracy is within one
    standard error of the best, the most regularised (the cached augmented views, then the
    larger L2 penalty, then the smaller LR). On a few hundred images, held-out accuracies
    a couple of images apart are noise; this picks the setting least likely to overfit."""
    top = max(c["holdout_acc"] for c in candidates)
    se = math.sqrt(top * (1 - top) / max(n, 1))
    tied = [c for c in candidates if c["holdout_acc"] >= top - se - 1e-9]
    return min(tied, key=lambda c: (c["views"] != "augmented", -c["l2"], c["lr"]))


@torch.no_grad()
def _score(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model.classify_features(x).float()
    correct = float((logits.argmax(1) == y).float().mean())
    return correct, float(F.cross_entropy(logits, y))


def search_probe(
    task: Any,
    features: CachedFeatures,
    grid: ProbeGrid,
    batch_size: int,
    sampler_kind: str,
) -> ProbeResult:
    """Choose the probe's LR, L2 penalty and views by k-fold cross-validation on the
    training split of `features` (its val split is never read)."""
    start = time.perf_counter()
    columns = features.teacher_columns
    x_eval, y = features.tensors("train", train=False)
    x_eval = x_eval[0]
    options: dict[str, torch.Tensor] = {"eval": x_eval.unsqueeze(0)}
    if features.train_store is not None:
        x_aug, y_aug = features.tensors("train", train=True)
        if not torch.equal(y_aug, y):
            raise RuntimeError("augmented and eval features list the training files differently")
        options = {"augmented": x_aug, **options}
    counts = np.bincount(y.numpy(), minlength=len(task.class_names))
    folds = min(grid.folds, int(counts[counts > 0].min()))
    if folds < 2:
        raise ConfigError(
            "finetune.search needs at least 2 training images in every class to hold one "
            "out; set finetune.search=false"
        )
    settings = list(itertools.product(grid.lrs, grid.l2s))
    scores: dict[tuple[str, float, float], list[tuple[float, float]]] = {
        (v, lr, l2): [] for v in options for lr, l2 in settings
    }
    splitter = StratifiedKFold(folds, shuffle=True, random_state=SEARCH_SEED)
    with one_thread(), torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(SEARCH_SEED)
        for fit_rows, held_rows in splitter.split(np.zeros(len(y)), y.numpy()):
            fit_index, held_index = torch.as_tensor(fit_rows), torch.as_tensor(held_rows)
            for views, x in options.items():
                models = _train_heads(
                    task,
                    x[:, fit_index],
                    y[fit_index],
                    settings,
                    grid.epochs,
                    batch_size,
                    sampler_kind,
                    columns,
                )
                held_x = split_columns(x_eval[held_index], columns)[0]
                for model, (lr, l2) in zip(models, settings, strict=True):
                    held = _score(model, held_x, y[held_index])
                    scores[(views, lr, l2)].append(held)
    candidates = [
        {
            "views": views,
            "lr": lr,
            "l2": l2,
            "holdout_acc": round(float(np.mean([a for a, _ in s])), 6),
            "holdout_loss": round(float(np.mean([loss for _, loss in s])), 6),
        }
        for (views, lr, l2), s in scores.items()
    ]

    best = choose(candidates, len(y))
    result = ProbeResult(
        lr=best["lr"],
        l2=best["l2"],
        views=best["views"],
        epochs=grid.epochs,
        folds=folds,
        holdout_acc=best["holdout_acc"],
        candidates=candidates,
        search_s=round(time.perf_counter() - start, 3),
        features_s=round(features.seconds_built, 3),
        features_images_per_s=round(features.images_per_s, 2) if features.images_per_s else None,
    )
    log.info(
        "Probe search: %d settings x %d folds on the training split in %.1f s; chose lr=%g, "
        "l2=%g, %s features (held-out acc %.4f); the head now trains %d epochs",
        len(candidates),
        folds,
        result.search_s,
        result.lr,
        result.l2,
        result.views,
        result.holdout_acc,
        result.epochs,
    )
    return result
