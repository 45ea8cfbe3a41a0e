"""Fine-tune policies (a registry): which parts of a classifier train, and when.

Adding a policy is one decorated class below plus `conf/finetune/<name>.yaml`
(`mode: <name>` and its options). Before any Trainer exists a policy says what it will
do: `plan()` lists its stages (one fit, or LP-FT's probe run then the fine-tune, with the
LR scale of each), `converges()` whether its head trains to convergence after a search on
the training split, `cache_bypass_reason()` whether the backbone ever trains. The task
asks it to set the trainable parts at the start, at each epoch start
(`on_train_epoch_start`: newly trainable parameters), when a stage starts from the one
before (`start_finetune`) and after a resume.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from torch import nn

from vision_tl.core.errors import ConfigError
from vision_tl.core.registry import Registry
from vision_tl.core.validate import check_values
from vision_tl.models.classifier import Classifier
from vision_tl.training.probe import ProbeGrid, ShortRecipe
from vision_tl.training.rules import FINETUNE_RULES


def freeze(module: nn.Module) -> None:
    """Stop gradients and keep every submodule in eval mode (BatchNorm stats, Dropout)."""
    for p in module.parameters():
        p.requires_grad_(False)
    for m in module.modules():
        m.frozen = True
    module.eval()


def unfreeze(module: nn.Module) -> None:
    for m in module.modules():
        m.frozen = False
    for p in module.parameters():
        p.requires_grad_(True)


PROBE_STAGE_DIR = "probe"
# torch's BatchNorm layers (their common base class is private).
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class Stage:
    """One fit of a policy's plan, decided before any Trainer exists.

    A stage with `finetune` is a run of that policy of its own, in `<run dir>/<subdir>`
    (LP-FT's probe: a `finetune=linear_probe` run); the last stage is the run itself.
    `lr_scale` multiplies `optimizer.lr`. With `from_previous` the stage starts from the
    previous stage's best weights, and that stage's val score competes for `best.ckpt`.
    """

    name: str
    finetune: Mapping[str, Any] | None = None
    subdir: str | None = None
    lr_scale: float = 1.0
    from_previous: bool = False


@dataclass(frozen=True)
class Convergence:
    """A head trained to convergence on cached features: settings searched on `grid`
    (folds of the training split), then `epochs` epochs in batches of `batch_size`,
    validated once, at the end (`training.probe`)."""

    grid: ProbeGrid
    epochs: int
    batch_size: int


@dataclass(frozen=True)
class FinetunePolicy:
    """Base policy: everything trains. Backbone parameters train at `backbone_lr_mult`
    times the head's learning rate; with `layer_decay` (null or 1: off) each backbone stage
    before the last trains at `layer_decay` times the next stage's LR."""

    name: ClassVar[str] = ""
    # Whether a run logs why the feature cache is bypassed: worth saying when the user may
    # have expected a cache, noise for a policy that plainly trains everything.
    announce_cache_bypass: ClassVar[bool] = True
    backbone_lr_mult: float = 1.0
    layer_decay: float | None = None

    def __post_init__(self) -> None:
        """A policy built in code obeys the `finetune.*` rules of the config (one table)."""
        check_values(
            "finetune", {f.name: getattr(self, f.name) for f in fields(self)}, FINETUNE_RULES
        )

    def setup(self, model: Classifier) -> None:
        """Set the trainable parts for the start of training."""
        for backbone in model.backbones():
            unfreeze(backbone)
        model.train(model.training)

    def on_train_epoch_start(self, model: Classifier, epoch: int) -> list[nn.Parameter]:
        """Change the trainable parts at `epoch`; return parameters that became trainable."""
        return []

    def resume(self, model: Classifier, epoch: int) -> None:
        """Restore the trainable parts of a run resumed after `epoch` epochs."""

    def cache_bypass_reason(self) -> str | None:
        """Why backbone features cannot be cached (the backbone trains), or None."""
        return f"finetune={self.name} trains the backbone"

    def plan(self) -> tuple[Stage, ...]:
        """The fits this policy runs, in order (the last is the run itself)."""
        return (Stage(self.name),)

    def converges(self) -> Convergence | None:
        """How the head trains to convergence when the features are cached, or None when
        the fit trains as configured (`trainer.max_epochs`, `data.batch_size`, `optimizer`)."""
        return None

    def start_finetune(self, model: Classifier) -> None:
        """A stage that starts from the previous one (`Stage.from_previous`) begins: set
        its trainable parts."""


FinetuneClass = Callable[..., FinetunePolicy]
FINETUNE: Registry[FinetuneClass] = Registry("finetune mode")


def register_finetune(name: str) -> Callable[[type[FinetunePolicy]], type[FinetunePolicy]]:
    def decorator(cls: type[FinetunePolicy]) -> type[FinetunePolicy]:
        cls.name = name
        FINETUNE.add(name, cls)
        return cls

    return decorator


@register_finetune("full")
@dataclass(frozen=True)
class Full(FinetunePolicy):
    """Train everything."""

    announce_cache_bypass: ClassVar[bool] = False


@register_finetune("linear_probe")
@dataclass(frozen=True)
class LinearProbe(FinetunePolicy):
    """Frozen backbone (BatchNorm in eval mode); only the head trains.

    With `search` on and the features cached, `folds`-fold cross-validation on the
    training split chooses between two recipes (`vision_tl.training.probe`): the converged
    probe (LR x L2 penalty over `lrs` x `l2s`, then `epochs` epochs in batches of
    `batch_size`) and, with `short_epochs` > 0, the early-stopped one (the optimizer at
    `short_lr`, batches of `short_batch_size`, a constant LR, the epoch up to
    `short_epochs` the folds score best). With a random augmentation, whether the cached
    views pay is decided first on `views_subset` training images (a smaller split, or 0:
    on the whole split, every view extracted), and the views of the rest are extracted
    only when they do. Deciding on half of a small split measured 0.9 points worse on
    hymenoptera (245 training images) than extracting every view.
    """

    search: bool = True
    epochs: int = 100
    batch_size: int = 256
    lrs: tuple[float, ...] = (1e-3, 1e-2)
    l2s: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    folds: int = 3
    short_epochs: int = 30
    short_lr: float = 1e-3
    short_batch_size: int = 32
    views_subset: int = 300

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lrs", "l2s"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))

    def setup(self, model: Classifier) -> None:
        for backbone in model.backbones():
            freeze(backbone)
        model.train(model.training)

    def cache_bypass_reason(self) -> str | None:
        return None

    def converges(self) -> Convergence | None:
        if not self.search:
            return None
        short = None
        if self.short_epochs > 0:
            short = ShortRecipe(self.short_lr, self.short_batch_size, self.short_epochs)
        grid = ProbeGrid(self.lrs, self.l2s, self.epochs, self.folds, short, self.views_subset)
        return Convergence(grid, self.epochs, self.batch_size)


@register_finetune("lp_ft")
@dataclass(frozen=True)
class LpFt(LinearProbe):
    """LP-FT (Kumar et al., ICLR 2022): the run first trains as `finetune=linear_probe`
    with this policy's probe fields (the converged probe on cached features, its settings
    chosen on the training split), then everything fine-tunes from that run's best head
    for `trainer.max_epochs` at `lr_scale` x `optimizer.lr`, with the scheduler's warmup.

    A fresh head's large early gradients are what distort pretrained features on small
    data; starting from the probe's head avoids them. `batchnorm=frozen` keeps the
    backbone's BatchNorm statistics at their pretrained values (its affine weights still
    train); `train` lets them follow the new data.
    """

    # The fine-tune stage reads images by design: nothing to announce.
    announce_cache_bypass: ClassVar[bool] = False
    lr_scale: float = 0.1
    batchnorm: str = "frozen"

    def plan(self) -> tuple[Stage, ...]:
        probe = {f.name: getattr(self, f.name) for f in fields(LinearProbe)}
        probe = {k: list(v) if isinstance(v, tuple) else v for k, v in probe.items()}
        return (
            Stage("probe", {"mode": LinearProbe.name, **probe}, subdir=PROBE_STAGE_DIR),
            Stage("finetune", lr_scale=self.lr_scale, from_previous=True),
        )

    def converges(self) -> Convergence | None:
        return None  # its probe stage converges; the fine-tune trains as configured

    def start_finetune(self, model: Classifier) -> None:
        """The probe stage is over: every parameter trains, BatchNorm as `batchnorm` says."""
        for backbone in model.backbones():
            unfreeze(backbone)
            if self.batchnorm == "frozen":
                for module in backbone.modules():
                    if isinstance(module, BATCHNORMS):
                        module.frozen = True
        model.train(model.training)

    def resume(self, model: Classifier, epoch: int) -> None:
        self.start_finetune(model)  # a checkpoint is written after the probe stage

    def cache_bypass_reason(self) -> str | None:
        return "finetune=lp_ft trains the backbone after its probe stage"


@register_finetune("partial")
@dataclass(frozen=True)
class Partial(FinetunePolicy):
    """Train the last `trainable_stages` stages of each backbone (its declared stages,
    which partition its parameters) and the head."""

    trainable_stages: int = 1

    def setup(self, model: Classifier) -> None:
        for backbone in model.backbones():
            unfreeze(backbone)
            stages = backbone.stages
            if self.trainable_stages > len(stages):
                raise ConfigError(
                    f"finetune.trainable_stages={self.trainable_stages}: {backbone.name} has "
                    f"{len(stages)} stages ({', '.join(s.name for s in stages)})"
                )
            for stage in stages[: len(stages) - self.trainable_stages]:
                freeze(stage)
        model.train(model.training)

    def cache_bypass_reason(self) -> str | None:
        return (
            "finetune=partial trains the last backbone stages; caching the frozen prefix "
            "is not supported, so every epoch decodes images and runs the whole backbone"
        )


@register_finetune("gradual")
@dataclass(frozen=True)
class Gradual(FinetunePolicy):
    """A linear probe until `unfreeze_epoch`, then the whole backbone at
    `backbone_lr_mult` times the head's LR."""

    unfreeze_epoch: int = 1
    backbone_lr_mult: float = 0.1

    def setup(self, model: Classifier) -> None:
        LinearProbe.setup(self, model)  # type: ignore[arg-type]

    def on_train_epoch_start(self, model: Classifier, epoch: int) -> list[nn.Parameter]:
        if epoch != self.unfreeze_epoch:
            return []
        before = {id(p) for p in model.parameters() if p.requires_grad}
        Full.setup(self, model)  # type: ignore[arg-type]
        return [p for p in model.parameters() if p.requires_grad and id(p) not in before]

    def resume(self, model: Classifier, epoch: int) -> None:
        if epoch >= self.unfreeze_epoch:  # the checkpoint's optimizer holds the backbone group
            Full.setup(self, model)  # type: ignore[arg-type]

    def cache_bypass_reason(self) -> str | None:
        return "finetune=gradual unfreezes the backbone during training"


def build_finetune(spec: Mapping[str, Any] | None) -> FinetunePolicy:
    """The policy for a `finetune` config (`mode` plus the policy's options)."""
    options = dict(spec or {})
    cls = FINETUNE.get(str(options.pop("mode", "full")))
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"finetune={cls.name} has no option {', '.join(unknown)}; "
            f"it takes {', '.join(sorted(known))}"
        )
    return cls(**options)
