"""Knowledge distillation (Hinton et al., 2015): a trained vision_tl checkpoint, ensembles
included, teaches the configured student.

The loss is `(1 - alpha) * task loss + alpha * T^2 * KL(teacher_T || student_T)`, with both
distributions softened by the temperature T (the T^2 keeps the gradient scale of the soft
term independent of T). At alpha=0 it is the task loss alone.

The teacher takes the student's input batches: it un-normalises them with the student's
mean/std, resizes them to its own input size and normalises them with its own statistics,
so any checkpoint can teach any student of the same classes. When the student trains on
cached features (its views are fixed), the teacher's logits are cached with them, one row
per view, in the same extraction pass (`data.features.build_features`): the
teacher does not run during training. Otherwise it runs on every training batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vision_tl.core.errors import ConfigError
from vision_tl.data.augment import Inputs, denormalize_batch, map_inputs, normalize_batch
from vision_tl.data.preprocess import AnyPreprocess, EnsemblePreprocess, Preprocess
from vision_tl.training.task import load_task


class Teacher(nn.Module):
    """A frozen checkpoint's network that reads batches prepared for the student.

    Either side may be an ensemble with per-member preprocessing: the student's view with
    the most pixels is the source, and each teacher member gets its own adaptation of it.
    """

    def __init__(
        self, model: nn.Module, own: AnyPreprocess, student: AnyPreprocess, num_classes: int
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.own, self.student = own, student
        self.num_classes = num_classes

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # BatchNorm and dropout stay in inference mode

    def _source(self, x: Inputs) -> tuple[torch.Tensor, Preprocess]:
        if isinstance(self.student, EnsemblePreprocess):
            members = list(zip(x, self.student.members, strict=True))
            return max(members, key=lambda member: member[1].input_size)
        return x, self.student  # type: ignore[return-value]

    def adapt(self, x: Inputs) -> Inputs:
        """A student batch as this teacher's input (its size(s) and mean/std)."""
        source, pre = self._source(x)
        if isinstance(self.own, EnsemblePreprocess):
            return tuple(adapt(source, pre, target) for target in self.own.members)
        return adapt(source, pre, self.own)

    @torch.no_grad()
    def forward(self, x: Inputs) -> torch.Tensor:
        return self.model(self.adapt(x))


def adapt(x: torch.Tensor, source: Preprocess, target: Preprocess) -> torch.Tensor:
    """A normalised batch of `source`'s preprocessing as `target` would have made it from the
    same pixels: un-normalise, resize to `target`'s input size, normalise with its stats."""
    size = (target.input_size, target.input_size)
    if source.mean == target.mean and source.std == target.std and x.shape[-2:] == size:
        return x
    x = denormalize_batch(x.float(), source)
    if x.shape[-2:] != size:
        mode = "bicubic" if target.interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    return normalize_batch(x.mul_(255.0), target)  # it takes 0-255 pixel values


@dataclass
class Distillation:
    """The teacher and the KD loss's settings."""

    teacher: Teacher
    temperature: float
    alpha: float
    path: str

    def loss(
        self, task_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor
    ) -> torch.Tensor:
        return kd_loss(task_loss, student, teacher, self.temperature, self.alpha)


def kd_loss(
    task_loss: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """`(1 - alpha) * task_loss + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))`."""
    if alpha == 0:
        return task_loss
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits.float() / t, dim=1),
        F.log_softmax(teacher_logits.float() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - alpha) * task_loss + alpha * t * t * soft


def build_distillation(
    spec: Mapping[str, Any] | None, class_names: Sequence[str], student: AnyPreprocess
) -> Distillation | None:
    """The teacher of `distill.teacher` (None when unset), checked against the data's classes."""
    spec = dict(spec or {})
    if not spec.get("teacher"):
        return None
    task = load_task(spec["teacher"], key="distill.teacher")
    if list(task.class_names) != list(class_names):
        raise ConfigError(
            f"distill.teacher={spec['teacher']}: its classes {list(task.class_names)} differ "
            f"from the data's {list(class_names)}"
        )
    teacher = Teacher(task.model, task.preprocess, student, len(class_names))
    return Distillation(
        teacher, float(spec.get("temperature", 4.0)), float(spec.get("alpha", 0.5)), spec["teacher"]
    )


@torch.no_grad()
def accuracy_and_speed(
    model: nn.Module, batches: Iterable[tuple[Inputs, torch.Tensor]]
) -> tuple[float, float]:
    """Accuracy and forward images/s of `model` on normalised `(images, labels)` batches."""
    model.eval()
    right = total = 0
    seconds = 0.0
    for x, y in batches:
        if len(y) == 0:
            continue
        start = time.perf_counter()
        logits = model(x)
        seconds += time.perf_counter() - start
        right += int((logits.argmax(1) == y).sum())
        total += len(y)
    return (right / total if total else float("nan")), (total / seconds if seconds else 0.0)


def distill_report(task: Any, datamodule: Any, student_val_acc: float | None) -> dict[str, Any]:
    """The teacher's and the student's val accuracy and forward images/s, on the val images
    (the same batches, normalised for the student; the teacher adapts them)."""
    distill: Distillation = task.distill
    features = datamodule.features
    datamodule.use_features(None)
    try:

        def batches() -> Iterable[tuple[Inputs, torch.Tensor]]:
            for batch in datamodule.val_dataloader():
                x, y = datamodule.on_after_batch_transfer(batch, 0)
                yield map_inputs(lambda t: t.to(task.device), x), y.to(task.device)

        distill.teacher.to(task.device)
        teacher_acc, teacher_speed = accuracy_and_speed(distill.teacher, batches())
        _, student_speed = accuracy_and_speed(task.model, batches())
    finally:
        datamodule.use_features(features)
    return {
        "teacher": distill.path,
        "temperature": distill.temperature,
        "alpha": distill.alpha,
        "teacher_val_acc": round(teacher_acc, 6),
        "student_val_acc": student_val_acc,
        "teacher_images_per_s": round(teacher_speed, 2),
        "student_images_per_s": round(student_speed, 2),
    }
