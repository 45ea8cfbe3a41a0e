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

import copy
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch.utils.data import BatchSampler

from vision_tl.core.errors import ConfigError
from vision_tl.core.launch import from_rank_zero
from vision_tl.core.runtime import one_thread
from vision_tl.data.features import CachedFeatures
from vision_tl.data.samplers import ViewSampler, train_sampler
from vision_tl.models.classifier import Classifier

log = logging.getLogger(__name__)

SEARCH_SEED = 0  # the search draws its folds, batches and views from its own generator
FIRST_ROUND_VIEWS = 2  # a views decision's first round: one view alone has no variety


@dataclass(frozen=True)
class ShortRecipe:
    """The careful user's probe, searched beside the converged one: the run's optimizer at
    `lr` (its own weight decay, no L2 penalty), batches of `batch_size`, a constant LR, and
    the epoch (at most `max_epochs`) where the training split's held-out folds score best."""

    lr: float = 1e-3
    batch_size: int = 32
    max_epochs: int = 30


@dataclass(frozen=True)
class ProbeGrid:
    """What the search tries, for how many epochs, on how many folds: the converged
    probe's LR x L2 grid and, with `short`, the early-stopped recipe beside it. With a
    random augmentation, whether the cached views pay is decided first on a stratified
    subset of `views_subset` training images (0: on the whole split)."""

    lrs: Sequence[float]
    l2s: Sequence[float]
    epochs: int
    folds: int
    short: ShortRecipe | None = None
    views_subset: int = 0
    # Rows (images x (1 + views)) the search holds in memory at most: past it, it runs on a
    # stratified subset of the training split (250k rows of 1,280 floats: 1.3 GB).
    max_rows: int = 250_000


@dataclass
class ProbeResult:
    """The chosen setting, every candidate's held-out score, and what the search cost."""

    lr: float
    l2: float  # the head's L2 penalty (`l2_penalty`); the optimizer's weight decay is 0
    views: str  # "augmented" (the cached random views) or "eval" (the eval transform only)
    epochs: int
    folds: int
    holdout_acc: float | None  # None when nothing was searched
    num_images: int = 0  # the training images held out once each (the accuracies' n)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    recipe: str = "converged"  # or "short" (`ShortRecipe`)
    batch_size: int | None = None  # the fit's batch (None: the policy's)
    scheduled: bool = True  # whether the fit follows the run's LR schedule
    recipes: dict[str, float] = field(default_factory=dict)  # each recipe's best held-out acc
    recipe_margin: float | None = None  # the winner's held-out lead over the other recipe
    views_decision: dict[str, Any] | None = None  # the subset decision, when one was made
    search_s: float = 0.0
    features_s: float = 0.0  # this run's feature extraction (0 when the cache was warm)
    features_images_per_s: float | None = None  # when the features were computed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _head_copy(model: Classifier) -> Classifier:
    """A copy of `model` that shares its (frozen) backbones and owns its head, in train
    mode."""
    memo = {id(b): b for b in model.backbones()}
    head = copy.deepcopy(model, memo)
    _head_mode(head, True)
    return head


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
    short: bool = False,
    on_epoch: Callable[[list[Classifier]], None] | None = None,
) -> list[Classifier]:
    """Train one head per (lr, l2) on rows `x` (views x n x dim), side by side: every
    head sees the same batches. Rows ending in `teacher_columns` cached teacher
    logits train with the run's distillation loss. Plain linear heads train as one
    `StackedLinear` unless `stack` is off. `short`: the early-stopped recipe (the
    optimizer's own weight decay, a constant LR). `on_epoch` sees the heads after each
    epoch (held-out scores per epoch)."""
    models = [_head_copy(task.model) for _ in settings]
    layers = [_linear_layer(m) for m in models]
    stacked = None
    if stack and teacher_columns == 0 and all(layer is not None for layer in layers):
        stacked = StackedLinear(layers, [lr for lr, _ in settings], [l2 for _, l2 in settings])
        groups = [
            {"params": [w, b] if b.requires_grad else [w], "lr": lr}
            for w, b, lr in zip(stacked.weights, stacked.biases, stacked.group_lrs, strict=True)
        ]
    else:
        groups = [
            {"params": [p for p in m.head_parameters() if p.requires_grad], "lr": lr}
            for m, (lr, _) in zip(models, settings, strict=True)
        ]
        weights, strengths = [penalised(m) for m in models], [l2 for _, l2 in settings]
    if not short:  # the converged probe's penalty is in the loss, not the optimizer
        for group in groups:
            group["weight_decay"] = 0
    optimizer = task.optimizer_factory(params=groups)
    num_classes = len(task.class_names)
    views, n = x.shape[0], x.shape[1]
    flat = x.reshape(views * n, -1)
    batches = _batches(y, views, batch_size, sampler_kind, num_classes)
    steps = len(batches)
    scheduler, per_step = None, True
    if task.scheduler_factory is not None and not short:
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
        if on_epoch is not None:
            if stacked is not None:
                stacked.write_back(layers)
            on_epoch(models)
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


def _head_mode(model: Classifier, training: bool) -> None:
    """Put the modules outside the backbones in train or eval mode. The backbones are
    frozen (in eval mode) and shared by every head of a search, and the search scores a
    head after every epoch: `Module.train` walking their hundreds of modules each time
    cost more than the scoring itself, so the walk stops at each backbone."""
    backbones = {id(b) for b in model.backbones()}
    stack: list[torch.nn.Module] = [model]
    while stack:
        module = stack.pop()
        if id(module) in backbones:
            continue
        module.training = training and not getattr(module, "frozen", False)
        stack.extend(module.children())


@torch.no_grad()
def _score(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    _head_mode(model, False)
    logits = model.classify_features(x).float()
    correct = float((logits.argmax(1) == y).float().mean())
    return correct, float(F.cross_entropy(logits, y))


def _folds(y: torch.Tensor, wanted: int, num_classes: int) -> int:
    counts = np.bincount(y.numpy(), minlength=num_classes)
    folds = min(wanted, int(counts[counts > 0].min()))
    if folds < 2:
        raise ConfigError(
            "finetune.search needs at least 2 training images in every class to hold one "
            "out; set finetune.search=false"
        )
    return folds


def _options(features: CachedFeatures, views: str | None) -> tuple[dict[str, torch.Tensor], Any]:
    """The training rows each views option trains on ({name: views x n x dim}), the eval
    rows (held-out folds are always scored on those) and the labels."""
    x_eval, y = features.tensors("train", train=False)
    x_eval = x_eval[0]
    options: dict[str, torch.Tensor] = {"eval": x_eval.unsqueeze(0)}
    if features.train_store is not None and views != "eval":
        x_aug, y_aug = features.tensors("train", train=True)
        if not torch.equal(y_aug, y):
            raise RuntimeError("augmented and eval features list the training files differently")
        options = {"augmented": x_aug} if views == "augmented" else {"augmented": x_aug, **options}
    return options, (x_eval, y)


def _capped(features: CachedFeatures, max_rows: int, folds: int) -> CachedFeatures:
    """`features` with its training split cut to a stratified subset when its rows (every
    image's eval view and its augmented views) would exceed `max_rows` in memory."""
    train = features.samples["train"]
    per_image = 1 + (features.train_store.views if features.train_store is not None else 0)
    if len(train) * per_image <= max_rows:
        return features
    keep = set(stratified_subset(train, max_rows // per_image, folds))
    log.info(
        "Probe search on a stratified %d of the %d training images (%d rows at most in memory)",
        len(keep),
        len(train),
        max_rows,
    )
    samples = {**features.samples, "train": [s for s in train if s[0] in keep]}
    return dataclasses.replace(features, samples=samples)


def search_probe(
    task: Any,
    features: CachedFeatures,
    grid: ProbeGrid,
    batch_size: int,
    sampler_kind: str,
    views: str | None = None,
    announce: bool = True,
) -> ProbeResult:
    """Choose the probe by k-fold cross-validation on the training split of `features`
    (its val split is never read): the converged probe's LR and L2 penalty, the
    early-stopped recipe's epoch (`grid.short`), the views (`views`: only that option),
    and which recipe trains the head. In a job of several ranks, rank 0 searches and the
    others take its result (`core.launch`). `announce`: log the choice (a views
    decision's searches log at debug level)."""
    args = (task, features, grid, batch_size, sampler_kind, views, announce)
    return from_rank_zero(lambda: _search(*args))


def _search(
    task: Any,
    features: CachedFeatures,
    grid: ProbeGrid,
    batch_size: int,
    sampler_kind: str,
    views: str | None,
    announce: bool = True,
) -> ProbeResult:
    start = time.perf_counter()
    columns = features.teacher_columns
    features = _capped(features, grid.max_rows, grid.folds)
    options, (x_eval, y) = _options(features, views)
    folds = _folds(y, grid.folds, len(task.class_names))
    settings = list(itertools.product(grid.lrs, grid.l2s))
    scores: dict[tuple[str, float, float], list[tuple[float, float]]] = {
        (v, lr, l2): [] for v in options for lr, l2 in settings
    }
    short = grid.short
    curves: dict[str, list[list[float]]] = {v: [] for v in options} if short else {}
    splitter = StratifiedKFold(folds, shuffle=True, random_state=SEARCH_SEED)
    with one_thread(), torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(SEARCH_SEED)
        for fit_rows, held_rows in splitter.split(np.zeros(len(y)), y.numpy()):
            fit_index, held_index = torch.as_tensor(fit_rows), torch.as_tensor(held_rows)
            held_x = split_columns(x_eval[held_index], columns)[0]
            held_y = y[held_index]
            for name, x in options.items():
                fit_x, fit_y = x[:, fit_index], y[fit_index]
                models = _train_heads(
                    task, fit_x, fit_y, settings, grid.epochs, batch_size, sampler_kind, columns
                )
                for model, (lr, l2) in zip(models, settings, strict=True):
                    scores[(name, lr, l2)].append(_score(model, held_x, held_y))
                if short is not None:
                    curve: list[float] = []
                    _train_heads(
                        task,
                        fit_x,
                        fit_y,
                        [(short.lr, 0.0)],
                        short.max_epochs,
                        short.batch_size,
                        sampler_kind,
                        columns,
                        short=True,
                        on_epoch=partial(_record, curve, held_x, held_y),
                    )
                    curves[name].append(curve)
    candidates = [
        {
            "recipe": "converged",
            "views": name,
            "lr": lr,
            "l2": l2,
            "epochs": grid.epochs,
            "holdout_acc": round(float(np.mean([a for a, _ in s])), 6),
            "holdout_loss": round(float(np.mean([loss for _, loss in s])), 6),
        }
        for (name, lr, l2), s in scores.items()
    ]
    best = choose(candidates, len(y))
    recipes = {"converged": best["holdout_acc"]}
    winner: dict[str, Any] = best
    if short is not None:
        shorts = []
        for name, per_fold in curves.items():
            mean = np.mean(np.asarray(per_fold), axis=0)  # held-out acc after each epoch
            epoch = int(np.argmax(mean))  # the first epoch at the best mean
            shorts.append(
                {
                    "recipe": "short",
                    "views": name,
                    "lr": short.lr,
                    "l2": 0.0,
                    "epochs": epoch + 1,
                    "holdout_acc": round(float(mean[epoch]), 6),
                    "curve": [round(float(a), 4) for a in mean],
                }
            )
        quick = max(shorts, key=lambda c: (c["holdout_acc"], c["views"] == "eval"))
        candidates += shorts
        recipes["short"] = quick["holdout_acc"]
        if quick["holdout_acc"] > best["holdout_acc"]:
            winner = quick
    loser = min(recipes.values()) if len(recipes) > 1 else None
    result = ProbeResult(
        lr=winner["lr"],
        l2=winner["l2"],
        views=winner["views"],
        epochs=winner["epochs"],
        folds=folds,
        holdout_acc=winner["holdout_acc"],
        num_images=len(y),
        candidates=candidates,
        search_s=round(time.perf_counter() - start, 3),
        features_s=round(features.seconds_built, 3),
        features_images_per_s=round(features.images_per_s, 2) if features.images_per_s else None,
        recipe=winner["recipe"],
        batch_size=short.batch_size if winner["recipe"] == "short" and short else batch_size,
        scheduled=winner["recipe"] == "converged",
        recipes=recipes,
        recipe_margin=None if loser is None else round(winner["holdout_acc"] - loser, 6),
    )
    log.log(
        logging.INFO if announce else logging.DEBUG,
        "Probe search: %d candidates x %d folds on the training split in %.1f s; chose the %s "
        "recipe (lr=%g, l2=%g, %s features, held-out acc %.4f%s); the head now trains %d "
        "epochs in batches of %d",
        len(candidates),
        folds,
        result.search_s,
        result.recipe,
        result.lr,
        result.l2,
        result.views,
        result.holdout_acc,
        "" if result.recipe_margin is None else f", {result.recipe_margin:+.4f} over the other",
        result.epochs,
        result.batch_size,
    )
    return result


def _record(curve: list[float], x: torch.Tensor, y: torch.Tensor, models: list) -> None:
    """Append the held-out accuracy of the (one) head after an epoch."""
    curve.append(_score(models[0], x, y)[0])
    _head_mode(models[0], True)


def stratified_subset(samples: Sequence[tuple[str, int]], size: int, folds: int) -> list[str]:
    """About `size` keys of `samples` in the classes' proportions (at least `folds` of each
    class that has them), drawn from the search's own seed."""
    rng = np.random.default_rng(SEARCH_SEED)
    by_class: dict[int, list[str]] = {}
    for key, label in samples:
        by_class.setdefault(label, []).append(key)
    fraction = min(1.0, size / max(1, len(samples)))
    chosen = []
    for _, keys in sorted(by_class.items()):
        take = min(len(keys), max(folds, round(len(keys) * fraction)))
        chosen += [keys[i] for i in sorted(rng.choice(len(keys), take, replace=False))]
    return sorted(chosen)


def decide_views(
    task: Any,
    grid: ProbeGrid,
    batch_size: int,
    sampler_kind: str,
    views: int,
    subset_with: Callable[[int], CachedFeatures],
) -> tuple[dict[str, Any], CachedFeatures]:
    """Whether training on the cached augmented views beats the eval view, judged by the
    same cross-validation (the converged grid) on a subset of the training split, adding
    views to the subset a round at a time: `subset_with(k)` is the subset's features
    with its first k views. The first round has `FIRST_ROUND_VIEWS` (or all `views`, when
    fewer); another view is added while the views' held-out accuracy improves. They win
    once they beat the eval view by more than one standard error; the rounds stop when they
    have all `views` or stop improving. Returns the decision with its evidence, and the
    subset's last features (whose rows the whole split's views reuse)."""
    quick = dataclasses.replace(grid, short=None)  # the data is judged, not the recipe
    searched = 0.0

    def best(features: CachedFeatures, option: str) -> float:
        nonlocal searched
        result = search_probe(task, features, quick, batch_size, sampler_kind, option, False)
        searched += result.search_s
        return max(c["holdout_acc"] for c in result.candidates)

    count = min(FIRST_ROUND_VIEWS, views)
    features = subset_with(count)
    eval_acc = best(features, "eval")
    n = len(features.samples["train"])
    # They cost `views` extractions of every training image: they must beat the eval view
    # by more than a standard error of the subset's held-out accuracy, not by an image.
    se = math.sqrt(eval_acc * (1 - eval_acc) / max(n, 1))
    rounds: list[dict[str, Any]] = []
    while True:
        acc = best(features, "augmented")
        improved = acc > (rounds[-1]["augmented_acc"] if rounds else eval_acc)
        rounds.append({"views": count, "augmented_acc": acc})
        if acc > eval_acc + se or count == views or not improved:
            break
        count += 1
        features = subset_with(count)
    decision = {
        "views": acc > eval_acc + se,
        "margin_needed": round(se, 6),
        "num_images": n,
        "augmented_acc": acc,
        "eval_acc": eval_acc,
        "rounds": rounds,
        "search_s": round(searched, 3),
    }
    return decision, features
