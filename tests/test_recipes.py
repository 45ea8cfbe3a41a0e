"""Fine-tuning recipes without a fit: Mixup/CutMix targets and loss, layer-wise LR decay,
the re-plannable cosine schedule and the config checks."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from omegaconf import OmegaConf

from vision_tl.core.errors import ConfigError
from vision_tl.core.validate import violations
from vision_tl.training.finetune import Stage, build_finetune
from vision_tl.training.optim import cosine_with_warmup, step_lr
from vision_tl.training.recipes import build_mixup
from vision_tl.training.task import ClassificationTask, _check_scheduler
from vision_tl.training.train import stage_config

pytestmark = pytest.mark.unit

SPEC = {"backbone": {"name": "resnet18"}, "pretrained": False}


def test_mixed_targets_sum_to_one_and_the_loss_is_soft_target_cross_entropy() -> None:
    torch.manual_seed(0)
    weights = [1.0, 2.0, 0.5]
    task = ClassificationTask(
        SPEC,
        ["a", "b", "c"],
        label_smoothing=0.1,
        class_weights=weights,
        mixup={"alpha": 0.8, "cutmix_alpha": 1.0, "prob": 1.0},
    )
    x, y = torch.rand(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    seen_mixed = False
    for _ in range(4):  # both Mixup and CutMix get picked
        mixed, target = task.mixup(x, y)
        assert mixed.shape == x.shape and target.shape == (8, 3)
        torch.testing.assert_close(target.sum(1), torch.ones(8))
        seen_mixed |= bool((target.max(1).values < 1).any())
    assert seen_mixed

    logits = torch.randn(8, 3)
    smoothed = target * 0.9 + 0.1 / 3
    by_hand = -(smoothed * torch.tensor(weights) * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(task.loss(logits, target), by_hand)
    # prob=0 (the default) or no alpha: no mixing at all
    assert build_mixup({"alpha": 0.8, "cutmix_alpha": 1.0, "prob": 0.0}, 3) is None
    assert build_mixup({"alpha": 0.0, "cutmix_alpha": 0.0, "prob": 1.0}, 3) is None


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_per_member_batches_are_mixed_alike(kind: str) -> None:
    """An ensemble whose members need their own sizes gets one batch per member: every
    member is mixed with the same partner and weight (CutMix: the same relative box)."""
    torch.manual_seed(1)
    on, off = ("alpha", "cutmix_alpha") if kind == "mixup" else ("cutmix_alpha", "alpha")
    mix = build_mixup({on: 1.0, off: 0.0, "prob": 1.0}, 3)
    y = torch.tensor([0, 1, 2, 1])  # each row's partner (the batch rolled by one) differs
    xs = (torch.rand(4, 3, 16, 16), torch.rand(4, 3, 24, 24))
    mixed, target = mix(xs, y)
    torch.testing.assert_close(target.sum(1), torch.ones(4))
    lam = float(target[0, 0])  # row 0: class 0, its partner (row 3) class 1
    assert float(target[0, 1]) == pytest.approx(1 - lam) and 0 < lam < 1
    for x, out in zip(xs, mixed, strict=True):
        assert out.shape == x.shape
        partner = x.roll(1, 0)
        if kind == "mixup":
            torch.testing.assert_close(out, lam * x + (1 - lam) * partner)
        else:
            from_partner = (out == partner).all(1) & (out != x).all(1)
            assert float(from_partner.float().mean()) == pytest.approx(1 - lam, abs=0.1)


@pytest.mark.parametrize("model", [SPEC, {"members": ["resnet18", "mobilenet_v2"]}])
def test_layer_decay_gives_one_group_per_stage_with_lrs_decreasing_by_the_factor(
    model: dict,
) -> None:
    spec = {**model, "pretrained": False}
    finetune = {"mode": "full", "backbone_lr_mult": 0.5, "layer_decay": 0.7}
    task = ClassificationTask(
        spec, ["a", "b"], finetune=finetune, optimizer=partial(torch.optim.SGD, lr=0.1)
    )
    groups = task.configure_optimizers().param_groups
    assert groups[0]["lr"] == pytest.approx(0.1)  # the head
    expected, rest = [], groups[1:]
    for backbone in task.model.backbones():
        stages = list(backbone.stages)
        for depth, stage in enumerate(reversed(stages)):
            group = rest.pop(0)
            assert {id(p) for p in group["params"]} == {id(p) for p in stage.parameters()}
            expected.append(0.1 * 0.5 * 0.7**depth)
            assert group["lr"] == pytest.approx(expected[-1])
    assert not rest
    covered = {id(p) for g in groups for p in g["params"]}
    assert covered == {id(p) for p in task.model.parameters()}


def test_layer_decay_keeps_only_trainable_stages_and_rejects_bad_values() -> None:
    finetune = {"mode": "partial", "trainable_stages": 2, "layer_decay": 0.5}
    task = ClassificationTask(
        SPEC, ["a", "b"], finetune=finetune, optimizer=partial(torch.optim.SGD, lr=1.0)
    )
    lrs = [g["lr"] for g in task.configure_optimizers().param_groups]
    assert lrs == pytest.approx([1.0, 1.0, 0.5])
    with pytest.raises(ConfigError, match=r"layer_decay=1\.5"):
        ClassificationTask(SPEC, ["a", "b"], finetune={"mode": "full", "layer_decay": 1.5})


def test_replanned_cosine_ends_at_its_minimum_on_the_new_last_step() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = cosine_with_warmup(
        optimizer, total_steps=100, steps_per_epoch=10, warmup_epochs=1, min_lr_ratio=0.1
    )["scheduler"]
    (factor,) = schedule.lr_lambdas
    assert factor(40) > 0.5
    factor.replan(4)
    assert factor(40) == pytest.approx(0.1) and factor(39) > 0.1
    state = schedule.state_dict()  # the horizon travels in checkpoints
    assert state["lr_lambdas"][0]["total_steps"] == 40


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [
        ("trainer.max_time", "00:00:05:00", True),
        ("trainer.max_time", {"minutes": 5}, True),
        ("trainer.max_time", "5 minutes", False),
        ("trainer.max_time", {"weeks": 1}, False),
        ("ema.decay", 1.0, False),
        ("ema.decay", None, True),
        ("mixup.prob", 1.5, False),
        ("finetune.layer_decay", 0.0, False),
        ("lr_find_steps", 5, False),
    ],
)
def test_recipe_keys_are_checked(key: str, value: object, ok: bool) -> None:
    cfg = OmegaConf.create({})
    OmegaConf.update(cfg, key, value, force_add=True)
    found = violations(cfg)
    assert (found == []) == ok, found
    if not ok:
        assert found[0].startswith(f"{key}=")


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"trainer.max_epochs": -1}, "nothing would end the fit"),
        ({"trainer.max_epochs": -1, "trainer.max_time": "00:00:05:00"}, None),
        ({"trainer.max_epochs": -1, "trainer.max_steps": 500}, None),
        ({"trainer.max_epochs": -1, "trainer.max_steps": -1}, "nothing would end the fit"),
        (
            {
                "trainer.max_epochs": -1,
                "trainer.max_time": {"minutes": 5},
                "scheduler._target_": "vision_tl.training.optim.one_cycle",
            },
            "scheduler=onecycle needs the run's length",
        ),
        (
            {
                "trainer.max_epochs": 10,
                "scheduler._target_": "vision_tl.training.optim.one_cycle",
            },
            None,
        ),
    ],
)
def test_an_open_ended_fit_needs_something_to_end_it(
    settings: dict[str, object], error: str | None
) -> None:
    cfg = OmegaConf.create({})
    for key, value in settings.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    found = violations(cfg)
    if error is None:
        assert found == []
    else:
        assert (
            len(found) == 1 and found[0].startswith("trainer.max_epochs=-1: ") and error in found[0]
        )


def test_an_open_ended_lp_ft_gives_its_probe_stage_the_probe_s_own_length(
    compose_train, tmp_path
) -> None:
    # The time budget bounds the fine-tune stage only: the probe stage, without one, must
    # not inherit max_epochs=-1 (on images, without the cached-feature search, it would
    # never end).
    timed = ["finetune=lp_ft", "trainer.max_epochs=-1", "trainer.max_time=00:00:10:00"]
    cfg = compose_train(timed, tmp_path)
    probe, _ = build_finetune(OmegaConf.to_container(cfg.finetune, resolve=True)).plan()
    seven = Stage(probe.name, {**probe.finetune, "epochs": 7}, subdir=probe.subdir)
    stage = stage_config(cfg, seven)
    assert stage.trainer.max_time is None and stage.trainer.max_epochs == 7
    assert stage.finetune.mode == "linear_probe" and violations(stage) == []
    assert stage.paths.output_dir == str(tmp_path / "probe")
    bounded = compose_train(["finetune=lp_ft", "trainer.max_epochs=4"], tmp_path)
    assert stage_config(bounded, probe).trainer.max_epochs == 4  # as the run says


def test_a_resume_keeps_the_scheduler_its_checkpoint_records() -> None:
    cosine = partial(cosine_with_warmup, warmup_epochs=1)
    _check_scheduler(None, cosine)  # written before checkpoints recorded it: not checked
    _check_scheduler(["LambdaLR"], cosine)
    _check_scheduler([], None)
    refused = [
        ([], cosine, "used no LR scheduler, this run LambdaLR"),
        (["LambdaLR"], None, "used the LambdaLR LR scheduler, this run none"),
        (["LambdaLR"], partial(step_lr), "used the LambdaLR LR scheduler, this run StepLR"),
    ]
    for saved, factory, message in refused:
        with pytest.raises(ConfigError, match=message):
            _check_scheduler(saved, factory)


def test_a_task_with_one_class_is_refused_in_one_line() -> None:
    # A folder with one usable class folder (the others empty or unreadable) would fail
    # inside torchmetrics with a traceback.
    with pytest.raises(ConfigError, match=r"^one class to learn \(owl\); a classifier needs"):
        ClassificationTask(SPEC, ["owl"])
    assert ClassificationTask(SPEC, ["owl", "lark"]).class_names == ["owl", "lark"]
