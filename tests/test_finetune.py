"""Freezing really freezes (weights and BatchNorm statistics)."""

from __future__ import annotations

import copy
import itertools
import json
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from omegaconf import OmegaConf
from torch import nn

from vision_tl.core.config import config_dir
from vision_tl.core.errors import ConfigError
from vision_tl.models import available_backbones
from vision_tl.training.finetune import LinearProbe, build_finetune
from vision_tl.training.optim import cosine_with_warmup
from vision_tl.training.probe import _linear_layer, _train_heads, l2_penalty, zero_logit_layers
from vision_tl.training.task import ClassificationTask
from vision_tl.training.train import run_training

SPEC = {"backbone": {"name": "resnet18"}, "pretrained": False}


def _task(finetune: dict, lr: float = 0.1) -> ClassificationTask:
    return ClassificationTask(
        SPEC, ["a", "b", "c"], finetune=finetune, optimizer=partial(torch.optim.SGD, lr=lr)
    )


def _train_steps(
    task: ClassificationTask, optimizer: torch.optim.Optimizer, steps: int = 3
) -> None:
    task.train()
    for _ in range(steps):
        x, y = torch.randn(4, 3, 32, 32) * 3 + 1, torch.randint(0, 3, (4,))
        optimizer.zero_grad()
        F.cross_entropy(task(x), y).backward()
        optimizer.step()


def _bn_stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


def test_linear_probe_freezes_weights_and_batchnorm_statistics() -> None:
    task = _task({"mode": "linear_probe"})
    backbone = task.model.backbone
    before = copy.deepcopy(backbone.state_dict())
    head_before = copy.deepcopy(task.model.head.state_dict())
    optimizer = task.configure_optimizers()
    optimised = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in task.model.head.parameters()}

    _train_steps(task, optimizer)
    assert all(not m.training for m in backbone.modules()), "frozen backbone must stay in eval"
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, before[key], msg=key)
    assert any(not torch.equal(v, head_before[k]) for k, v in task.model.head.state_dict().items())


def test_full_finetune_updates_batchnorm_and_uses_lr_multiplier() -> None:
    task = _task({"mode": "full", "backbone_lr_mult": 0.1}, lr=0.5)
    stats = _bn_stats(task.model.backbone)
    optimizer = task.configure_optimizers()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.5, 0.05])
    _train_steps(task, optimizer, steps=1)
    after = _bn_stats(task.model.backbone)
    assert any(not torch.equal(stats[k], after[k]) for k in stats)


def test_partial_trains_only_the_last_stages() -> None:
    task = _task({"mode": "partial", "trainable_stages": 1})
    body = task.model.backbone.body
    assert all(p.requires_grad for p in body.layer4.parameters())
    frozen = [body.conv1, body.bn1, body.layer1, body.layer2, body.layer3]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    layer3_stats = _bn_stats(body.layer3)
    layer4_stats = _bn_stats(body.layer4)
    optimizer = task.configure_optimizers()
    _train_steps(task, optimizer)
    assert body.layer4.training and not body.layer3.training
    for k, v in _bn_stats(body.layer3).items():
        torch.testing.assert_close(v, layer3_stats[k])
    assert any(not torch.equal(v, layer4_stats[k]) for k, v in _bn_stats(body.layer4).items())


def test_ensemble_linear_probe_freezes_every_member() -> None:
    spec = {"members": ["resnet18", "mobilenet_v2"], "pretrained": False}
    task = ClassificationTask(spec, ["a", "b"], finetune={"mode": "linear_probe"})
    for member in task.model.members:
        assert not any(p.requires_grad for p in member.parameters())
    assert all(p.requires_grad for p in task.model.head_parameters())


PROBE_GROUPS = ("linear_probe", "lp_ft")


def _probe_heads(
    optimizer: partial,
    settings: list[tuple[float, float]],
    stack: bool = True,
    epochs: int | None = None,
    batch_size: int | None = None,
    views: int = 1,
    **task_options,
) -> list[nn.Module]:
    """The search's heads for `settings` (lr, l2), trained on random features with the
    probe's own epochs and batch size (unless given), from the zero start the probe gives
    them."""
    policy = build_finetune({"mode": "linear_probe"})
    task = ClassificationTask(
        SPEC,
        ["a", "b", "c"],
        finetune={"mode": "linear_probe"},
        optimizer=optimizer,
        scheduler=partial(cosine_with_warmup, warmup_epochs=1),
        **task_options,
    )
    zero_logit_layers(task.model)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(views, 96, task.model.backbone.num_features, generator=generator)
    labels = torch.randint(0, 3, (96,), generator=generator)
    torch.manual_seed(0)
    with torch.enable_grad():
        return _train_heads(
            task,
            features,
            labels,
            settings,
            epochs or policy.epochs,
            batch_size or policy.batch_size,
            "shuffle",
            stack=stack,
        )


@pytest.mark.integration
@pytest.mark.parametrize(
    ("optimizer", "task_options"),
    [
        (partial(torch.optim.AdamW), {}),
        (partial(torch.optim.SGD, momentum=0.9, nesterov=True), {"label_smoothing": 0.1}),
        (partial(torch.optim.Adam), {"class_weights": [1.0, 3.0, 0.5]}),
    ],
    ids=["adamw", "sgd-smoothing", "adam-class-weights"],
)
def test_the_search_s_stacked_linear_heads_train_as_each_would_alone(
    optimizer: partial, task_options: dict
) -> None:
    """The search trains its plain linear heads as one stacked layer (one matmul and one
    loss per step): each head must end where it ends trained on its own, under the run's
    optimizer, schedule and loss, with two LRs and several penalties side by side."""
    settings = [(1e-2, 1e-3), (1e-3, 1.0), (1e-2, 0.3), (1e-3, 0.0)]
    options = {"epochs": 8, "batch_size": 32, "views": 2, **task_options}
    stacked = _probe_heads(optimizer, settings, stack=True, **options)
    alone = _probe_heads(optimizer, settings, stack=False, **options)
    for a, b in zip(stacked, alone, strict=True):
        layer_a, layer_b = _linear_layer(a), _linear_layer(b)
        assert layer_a is not None and layer_a.weight.abs().max() > 1e-3
        assert torch.allclose(layer_a.weight, layer_b.weight, atol=1e-5, rtol=1e-4)
        assert torch.allclose(layer_a.bias, layer_b.bias, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(_linear_layer(stacked[0]).weight, _linear_layer(stacked[2]).weight)
    mlp = ClassificationTask({**SPEC, "head": {"name": "mlp"}}, ["a", "b"]).model
    dropout = ClassificationTask({**SPEC, "head": {"name": "linear", "dropout": 0.2}}, ["a", "b"])
    assert _linear_layer(dropout.model) is None
    assert _linear_layer(mlp) is None


def test_every_searched_l2_penalty_regularises_the_default_probe_head() -> None:
    """The probe's default grid must be a real search: with the default AdamW and cosine
    schedule, at every searched LR and the probe's own epochs and batch size, each larger
    L2 penalty gives a smaller head, and the largest at most half the least penalised. A
    grid too weak to act (heads within 1% of each other) fails. Both the shipped
    `conf/finetune` groups and the dataclass default are held to it."""
    shipped = [OmegaConf.load(config_dir() / "finetune" / f"{n}.yaml") for n in PROBE_GROUPS]
    assert all(list(c.l2s) == list(LinearProbe.l2s) for c in shipped)
    assert all(list(c.lrs) == list(LinearProbe.lrs) for c in shipped)
    policy = build_finetune({"mode": "linear_probe"})
    settings = [(lr, l2) for lr in policy.lrs for l2 in policy.l2s]
    heads = _probe_heads(partial(torch.optim.AdamW), settings)
    norms = {
        s: float(h.head[-1].weight.detach().norm()) for s, h in zip(settings, heads, strict=True)
    }
    for lr in policy.lrs:
        by_l2 = [norms[(lr, l2)] for l2 in sorted(policy.l2s)]
        assert all(a >= b for a, b in itertools.pairwise(by_l2)), (lr, by_l2)
        assert by_l2[0] > 1.01 * by_l2[1] or by_l2[1] > 1.01 * by_l2[2], (lr, by_l2)
        assert by_l2[-1] <= 0.5 * by_l2[0], (lr, by_l2)


@pytest.mark.parametrize(
    ("augmented", "rounds", "wins"),
    [
        ({2: 0.79}, [2], False),  # behind the eval view: no more views
        ({2: 0.85}, [2], True),  # ahead by more than a standard error (0.04 here)
        ({2: 0.81, 3: 0.81}, [2, 3], False),  # ahead, then no better with a third view
        ({2: 0.81, 3: 0.83, 4: 0.82}, [2, 3, 4], False),  # improving to the last view
        ({2: 0.81, 3: 0.85}, [2, 3], True),  # the third view makes the lead
    ],
)
def test_the_views_decision_adds_views_while_they_improve_and_stops_at_a_win(
    monkeypatch: pytest.MonkeyPatch, augmented: dict[int, float], rounds: list[int], wins: bool
) -> None:
    """The subset gets two views first and one more a round while the views' held-out
    accuracy improves and has not yet beaten the eval view's (0.80 on 100 images) by a
    standard error; the eval view's accuracy is searched once."""
    from types import SimpleNamespace

    from vision_tl.training import probe

    searched: list[tuple[str, int]] = []

    def search(task, features, grid, batch_size, sampler, option, announce):
        assert grid.short is None and not announce
        count = features.train_store.views
        searched.append((option, count))
        acc = 0.80 if option == "eval" else augmented[count]
        return SimpleNamespace(search_s=0.5, candidates=[{"holdout_acc": acc}])

    asked: list[int] = []

    def subset_with(count: int) -> SimpleNamespace:
        asked.append(count)
        return SimpleNamespace(
            samples={"train": [("x", 0)] * 100}, train_store=SimpleNamespace(views=count)
        )

    monkeypatch.setattr(probe, "search_probe", search)
    grid = probe.ProbeGrid([1e-3], [0.1], 10, 3, probe.ShortRecipe(), views_subset=100)
    decision, last = probe.decide_views(None, grid, 8, "shuffle", 4, subset_with)
    assert asked == rounds and [r["views"] for r in decision["rounds"]] == rounds
    assert last.train_store.views == rounds[-1]
    assert decision["views"] is wins and decision["margin_needed"] == pytest.approx(0.04)
    assert searched == [("eval", 2)] + [("augmented", k) for k in rounds]
    assert decision["search_s"] == pytest.approx(0.5 * (1 + len(rounds)))


@pytest.mark.integration
def test_the_probe_penalty_is_the_loss_s_not_the_optimizer_s_decay() -> None:
    """The probe's L2 penalty is in the loss and the optimizer's own weight decay is off:
    AdamW configured with a large decoupled decay trains exactly the heads AdamW without
    one does, and the penalty gives each head the logistic-regression gradient l2 x W
    (biases unpenalised)."""
    settings = [(1e-2, 0.0), (1e-2, 0.1)]
    plain = _probe_heads(partial(torch.optim.AdamW, weight_decay=0.0), settings)
    decayed = _probe_heads(partial(torch.optim.AdamW, weight_decay=5.0), settings)
    for a, b in zip(plain, decayed, strict=True):
        assert torch.equal(a.head[-1].weight, b.head[-1].weight)
    assert plain[1].head[-1].weight.norm() < plain[0].head[-1].weight.norm()

    heads = [nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)) for _ in range(2)]
    weights = [[h[0].weight, h[2].weight] for h in heads]
    penalty = l2_penalty(weights, [0.5, 2.0])
    expected = sum(
        0.5 * s * (w.pow(2).sum()) for s, ws in zip([0.5, 2.0], weights, strict=True) for w in ws
    )
    assert torch.allclose(penalty, expected)
    penalty.backward()
    assert torch.allclose(heads[1][2].weight.grad, 2.0 * heads[1][2].weight)
    assert heads[0][0].bias.grad is None
    assert l2_penalty(weights, [0.0, 0.0]) == 0.0


def test_bad_finetune_values() -> None:
    with pytest.raises(ConfigError, match="unknown finetune mode 'lora'; available: full"):
        build_finetune({"mode": "lora"})
    # a policy built in code obeys the config's own finetune.* rules (training/rules.py)
    with pytest.raises(ConfigError, match=r"^finetune\.trainable_stages=-1: an integer >= 0$"):
        build_finetune({"mode": "partial", "trainable_stages": -1})
    with pytest.raises(ConfigError, match=r"^finetune\.lrs=\[\]: a non-empty list of numbers"):
        build_finetune({"mode": "linear_probe", "lrs": []})
    with pytest.raises(ConfigError, match=r"^finetune\.batchnorm=live: one of frozen, train$"):
        build_finetune({"mode": "lp_ft", "batchnorm": "live"})
    with pytest.raises(ConfigError, match="finetune=full has no option unfreeze_epoch"):
        build_finetune({"mode": "full", "unfreeze_epoch": 2})


# Every registered backbone (resnet18/50, mobilenet_v2/v3_large, efficientnet_b0/v2_s,
# convnext_tiny, regnet_y_400mf, vit_b_16, vgg16, ...) and a timm convnext and vit, each at
# the smallest input it accepts (its fixed input size, else 32 px).
PARTIAL_NETWORKS = [*available_backbones(), "timm/convnext_atto", "timm/test_vit"]


@pytest.mark.integration  # builds every full-size network
@pytest.mark.parametrize("name", PARTIAL_NETWORKS)
def test_partial_one_stage_trains_exactly_the_last_stage(name: str) -> None:
    spec = {"backbone": {"name": name}, "head": {"name": "linear"}, "pretrained": False}
    task = ClassificationTask(spec, ["a", "b"], finetune={"mode": "partial", "trainable_stages": 1})
    backbone = task.model.backbone
    last = {id(p) for p in backbone.stages[-1].parameters()}
    trainable = {id(p) for p in backbone.parameters() if p.requires_grad}
    assert last and trainable == last, f"{name}: only the last stage may train"
    assert all(p.requires_grad for p in task.model.head.parameters())

    task.train()  # frozen stages stay in eval mode (BatchNorm statistics, Dropout)
    frozen_modules = [m for s in backbone.stages[:-1] for part in s.parts for m in part.modules()]
    assert frozen_modules and not any(m.training for m in frozen_modules)
    assert all(m.training for part in backbone.stages[-1].parts for m in part.modules())

    size = backbone.fixed_input_size or 32
    F.cross_entropy(task(torch.randn(2, 3, size, size)), torch.tensor([0, 1])).backward()
    for p in backbone.parameters():
        assert (p.grad is not None) == (id(p) in last)


def test_partial_with_more_stages_than_the_backbone_has_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"trainable_stages=99: resnet18 has 5 stages \(conv1"):
        _task({"mode": "partial", "trainable_stages": 99})


def test_a_fixed_size_network_rejects_another_input_size() -> None:
    """A ViT's position embeddings fix its input: a one-line error, not a shape mismatch."""
    spec = {"backbone": {"name": "timm/test_vit"}, "pretrained": False}
    assert ClassificationTask(spec, ["a", "b"]).preprocess.input_size == 160
    with pytest.raises(ConfigError, match=r"data.image_size=64: timm/test_vit takes only 160 px"):
        ClassificationTask(spec, ["a", "b"], preprocess_overrides={"image_size": 64})


@pytest.mark.parametrize("batchnorm", ["frozen", "train"])
def test_lp_ft_fine_tune_phase_trains_everything_and_batchnorm_as_asked(batchnorm: str) -> None:
    task = _task({"mode": "lp_ft", "batchnorm": batchnorm})
    backbone = task.model.backbone
    assert not any(p.requires_grad for p in backbone.parameters()), "the probe phase first"
    task.finetune.start_finetune(task.model)
    task.train()
    assert all(p.requires_grad for p in backbone.parameters())
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.training is (batchnorm == "train") for m in norms)
    assert all(m.weight.requires_grad for m in norms), "affine weights train either way"


@pytest.mark.slow  # out of the suite for its 10-minute budget; run with -m slow
def test_lp_ft_starts_from_the_linear_probe_run_then_trains_everything(
    compose_train, image_folder: Path, tmp_path: Path
) -> None:
    """LP-FT's first stage is exactly the `finetune=linear_probe` run (the same head, bit for
    bit, and val accuracy); the fine-tune starts from that head (scoring the probe's val
    accuracy), at lr_scale x LR, with every backbone tensor trainable, and the backbone's
    BatchNorm statistics stay at their pretrained values (batchnorm=frozen)."""
    common = [
        *TINY,
        f"data.root={image_folder}",
        "test=false",
        "logger=none",
        "finetune.epochs=30",
        "finetune.folds=2",
        "finetune.lrs=[0.01]",
        "finetune.l2s=[0,0.01]",
        "optimizer.lr=0.02",
        "data.feature_precision=fp32",
        "trainer.max_epochs=1",
        "+callbacks.spy._target_=helpers.spies.RunSpy",
    ]
    alone = run_training(compose_train([*common, "finetune=linear_probe"], tmp_path / "probe"))
    run_dir = tmp_path / "run"
    lp_ft = ["finetune=lp_ft", "finetune.lr_scale=0.1"]
    metrics = run_training(compose_train([*common, *lp_ft], run_dir))
    probe = metrics["probe"]
    assert probe["probe_run"] == str(run_dir / "probe")
    stage = json.loads((run_dir / "probe" / "metrics.json").read_text())
    assert stage["probe"]["lr"] == alone["probe"]["lr"] == 0.01
    assert stage["best_val_acc"] == probe["probe_val_acc"] == alone["best_val_acc"] >= 0.8
    heads = [
        torch.load(Path(m["best_checkpoint"]), weights_only=True)["state_dict"]
        for m in (stage, alone)
    ]
    assert heads[0].keys() == heads[1].keys()
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])

    spy = json.loads((run_dir / "spy.json").read_text())
    assert spy["start"]["val_acc"] == pytest.approx(probe["probe_val_acc"], abs=1e-6)
    assert spy["start"]["group_lrs"] == pytest.approx([0.002, 0.002])
    assert spy["start"]["backbone_trainable"] == spy["start"]["backbone_tensors"] > 0
    assert spy["backbone_calls"] > 0 and not spy["feature_inputs"], "phase 2 reads images"
    assert spy["backbone_weights_moved"]
    assert not spy["bn_stats_moved"]
    # The probe start competes for best.ckpt: the fine-tune keeps it unless an epoch beats it,
    # so LP-FT never reports less than the linear_probe run.
    epochs_val = pd.read_csv(run_dir / "history.csv")["val_acc"]
    beaten = bool((epochs_val > probe["probe_val_acc"] + 1e-9).any())
    assert (metrics["best_epoch"] >= 0) is beaten
    assert metrics["best_val_acc"] == pytest.approx(max(probe["probe_val_acc"], epochs_val.max()))
    assert metrics["best_val_acc"] >= alone["best_val_acc"]


def test_lr_finder_is_skipped_where_the_policy_chooses_its_own_lr() -> None:
    from vision_tl.training.recipes import lr_find_skip_reason

    assert "lp_ft" in lr_find_skip_reason(_task({"mode": "lp_ft"}), False, False)
    assert "cross-validation" in lr_find_skip_reason(_task({"mode": "linear_probe"}), False, False)
    assert lr_find_skip_reason(_task({"mode": "full"}), False, False) is None
