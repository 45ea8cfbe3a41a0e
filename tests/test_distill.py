"""Distillation: the KD loss, the teacher's view of student batches, cached teacher logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

from vision_tl.core.errors import ConfigError
from vision_tl.data.preprocess import Preprocess
from vision_tl.training.distill import Teacher, build_distillation, kd_loss
from vision_tl.training.train import run_training


def test_kd_loss_is_the_task_loss_at_alpha_0_and_the_formula_otherwise() -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 4), torch.randn(6, 4) * 3
    y = torch.randint(0, 4, (6,))
    ce = F.cross_entropy(student, y)
    assert torch.equal(kd_loss(ce, student, teacher, 4.0, 0.0), ce)
    t, alpha = 2.0, 0.3
    p_teacher = torch.softmax(teacher / t, 1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(student / t, 1))).sum(1).mean()
    expected = (1 - alpha) * ce + alpha * t * t * kl
    torch.testing.assert_close(kd_loss(ce, student, teacher, t, alpha), expected)


def test_teacher_sees_the_student_batch_at_its_own_size_and_statistics() -> None:
    student = Preprocess(input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    own = Preprocess(input_size=48, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    seen: list[torch.Tensor] = []
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 48 * 48, 3))
    net.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0]))
    teacher = Teacher(net, own, student, num_classes=3)
    raw = torch.rand(2, 3, 32, 32)
    s_mean, s_std = (
        torch.tensor(student.mean).view(1, 3, 1, 1),
        torch.tensor(student.std).view(1, 3, 1, 1),
    )
    logits = teacher((raw - s_mean) / s_std)
    assert logits.shape == (2, 3) and not logits.requires_grad
    t_mean, t_std = torch.tensor(own.mean).view(1, 3, 1, 1), torch.tensor(own.std).view(1, 3, 1, 1)
    resized = F.interpolate(raw, size=(48, 48), mode="bilinear", antialias=True)
    torch.testing.assert_close(seen[0], (resized - t_mean) / t_std, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_distillation_caches_teacher_logits_for_fixed_views_and_runs_it_otherwise(
    compose_train, image_folder: Path, tmp_path: Path
) -> None:
    common = [*TINY, f"data.root={image_folder}", "test=false", "logger=none"]
    spy = "+callbacks.spy._target_=helpers.spies.RunSpy"
    teacher_dir = tmp_path / "teacher"
    run_training(
        compose_train(
            [*common, "data.image_size=48", "trainer.max_epochs=1", "finetune=full"], teacher_dir
        )
    )
    teacher = teacher_dir / "checkpoints" / "best.ckpt"

    probe_dir = tmp_path / "probe"
    probe = run_training(
        compose_train(
            [
                *common,
                spy,
                "finetune=linear_probe",
                "finetune.search=false",
                "trainer.max_epochs=3",
                "data.augment=flip_crop",
                "data.feature_views=2",
                "data.feature_precision=fp32",
                f"distill.teacher={teacher}",
                "distill.alpha=0.7",
            ],
            probe_dir,
        )
    )
    seen = json.loads((probe_dir / "spy.json").read_text())
    assert seen["feature_inputs"] and seen["teacher_calls"] == 0, "cached: no teacher in the fit"
    assert seen["start"]["cached_teacher_max_diff"] < 1e-4
    report = probe["distill"]
    assert report["alpha"] == 0.7 and report["teacher"] == str(teacher)
    assert 0 <= report["teacher_val_acc"] <= 1 and report["teacher_images_per_s"] > 0
    assert report["student_val_acc"] == probe["best_val_acc"]

    full_dir = tmp_path / "full"
    run_training(
        compose_train(
            [*common, spy, "finetune=full", "trainer.max_epochs=1", f"distill.teacher={teacher}"],
            full_dir,
        )
    )
    seen = json.loads((full_dir / "spy.json").read_text())
    train_batches = 3  # 24 training images in batches of 8; validation runs no teacher
    assert seen["teacher_calls"] == train_batches, "images: the teacher runs on every batch"

    with pytest.raises(ConfigError, match=r"distill\.teacher=.*its classes"):
        build_distillation({"teacher": str(teacher)}, ["cat", "dog"], Preprocess())
