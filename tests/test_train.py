"""End to end: the real `train` config and entry point on tiny generated images."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from conftest import TINY, TINY_ANY_MODEL, make_image_folder, run_cli
from helpers.data import datamodule
from helpers.intervals import accuracies_without_interval
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vision_tl.core.errors import ConfigError
from vision_tl.core.stats import wilson_interval
from vision_tl.models import FUSIONS
from vision_tl.models.backbones import torchvision_cache_path
from vision_tl.training.task import ClassificationTask
from vision_tl.training.train import run_training


def _scalars(run_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.integration
def test_short_run_writes_checkpoints_metrics_and_tensorboard(
    compose_train, image_folder: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_train([*TINY, f"data.root={image_folder}", "trainer.max_epochs=3"], run_dir)
    metrics = run_training(cfg)

    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert 0.0 <= saved["best_val_acc"] <= 1.0 and 0 <= saved["best_epoch"] < 3
    assert saved["num_classes"] == 3 and saved["class_names"] == ["cat", "dog", "fox"]
    assert saved["train_time_s"] > 0 and saved["train_images_per_s"] > 0
    assert 0.0 <= saved["test_acc"] <= 1.0, "the test split must be evaluated"
    assert saved["split_sizes"] == {"train": 24, "val": 24, "test": 24}
    assert accuracies_without_interval(saved) == []
    assert saved["best_val_acc_ci95"] == wilson_interval(saved["best_val_acc"], 24)
    assert saved["test_acc_ci95"] == wilson_interval(saved["test_acc"], 24)
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").read_text().count(str(image_folder)) >= 1

    history = pd.read_csv(run_dir / "history.csv")
    assert list(history.epoch) == [0, 1, 2]
    for row in history.itertuples():  # every epoch's accuracies with their intervals
        assert [row.val_acc_lo, row.val_acc_hi] == wilson_interval(row.val_acc, 24)
        assert [row.train_acc_lo, row.train_acc_hi] == wilson_interval(row.train_acc, 24)

    split = pd.read_csv(run_dir / "split.csv")
    assert list(split.columns) == ["path", "label", "split"]
    assert split.split.value_counts().to_dict() == {"train": 24, "val": 24, "test": 24}

    scalars = _scalars(run_dir)
    for tag in (
        "train/loss_epoch",
        "train/acc",
        "val/loss",
        "val/acc",
        "val/acc_best",
        "val/f1_macro",
        "val/acc_class/cat",
        "lr-AdamW/pg1",
        "test/acc",
    ):
        assert tag in scalars, tag
    assert len(scalars["val/acc"]) == 3
    assert max(scalars["val/acc"]) == pytest.approx(saved["best_val_acc"])
    images = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    images.Reload()
    assert "val/confusion_matrix" in images.Tags()["images"]

    # the checkpoint carries the class map and preprocessing for inference
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert ckpt["vision_tl"]["class_to_idx"] == {"cat": 0, "dog": 1, "fox": 2}
    assert ckpt["vision_tl"]["preprocess"]["input_size"] == 32
    assert ckpt["hyper_parameters"]["load_pretrained"] is False


def _stripes(horizontal: bool, seed: int, size: int) -> Image.Image:
    """Stripes of random colours, period and phase: only their direction tells the class."""
    rng = np.random.default_rng(seed)
    fg = rng.integers(0, 256, 3)
    period = int(rng.integers(8, 13))
    phase = int(rng.integers(0, period))
    ramp = (np.arange(size) + phase) % period < period // 2
    mask = np.repeat(ramp[:, None], size, 1) if horizontal else np.repeat(ramp[None, :], size, 0)
    pixels = np.where(mask[..., None], fg, 255 - fg).astype(np.uint8)  # contrast in any hue
    return Image.fromarray(pixels)


@pytest.mark.slow
def test_learns_where_only_shape_separates_the_classes(compose_train, tmp_path: Path) -> None:
    """Colour says nothing about the class here: a broken resize, crop or layout cannot pass."""
    root = tmp_path / "stripes"
    for s, (split, count) in enumerate((("train", 40), ("val", 20))):
        for c, name in enumerate(("horizontal", "vertical")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                _stripes(c == 0, seed=s * 1000 + c * 100 + i, size=40).save(folder / f"{i}.png")
    overrides = [
        *TINY,
        f"data.root={root}",
        "trainer.max_epochs=4",
        "finetune=full",
        "optimizer.lr=0.003",
        "data.crop_scale=[0.5,1.0]",
        "test=false",
    ]
    metrics = run_training(compose_train(overrides, tmp_path / "run"))
    assert metrics["best_val_acc"] >= 0.9


def test_class_weights_change_the_loss_by_the_expected_factor() -> None:
    weights = [1.0, 4.0]
    task = ClassificationTask(
        {"backbone": {"name": "resnet18"}, "pretrained": False}, ["a", "b"], class_weights=weights
    )
    plain = ClassificationTask({"backbone": {"name": "resnet18"}, "pretrained": False}, ["a", "b"])
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0]])  # right on the first, wrong on the second
    y = torch.tensor([0, 1])
    per_image = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    expected = (1.0 * per_image[0] + 4.0 * per_image[1]) / 5.0  # weighted mean, as torch
    torch.testing.assert_close(task.loss(logits, y), expected)
    torch.testing.assert_close(plain.loss(logits, y), per_image.mean())
    assert task.loss(logits, y) / plain.loss(logits, y) > 1.4, "the rare class weighs more"


def _spied_run(compose_train, data: Path, out: Path, overrides: list[str]) -> tuple[dict, dict]:
    cfg = compose_train(
        [
            *TINY,
            f"data.root={data}",
            "test=false",
            "+callbacks.spy._target_=helpers.spies.RunSpy",
            *overrides,
        ],
        out,
    )
    metrics = run_training(cfg)
    return metrics, json.loads((out / "spy.json").read_text())


@pytest.mark.integration
def test_auto_class_weights_reach_the_loss(compose_train, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=6)
    for extra in list((data / "train" / "b").iterdir())[2:]:
        extra.unlink()  # train: 6 a, 2 b
    _, spy = _spied_run(
        compose_train, data, tmp_path / "run", ["trainer.max_epochs=1", "loss.class_weights=auto"]
    )
    inverse = [1 / 6, 1 / 2]
    scale = 2 / sum(inverse)
    assert spy["class_weights"] == pytest.approx([w * scale for w in inverse])  # [0.5, 1.5]


@pytest.mark.slow
def test_precision_asked_is_the_precision_used(
    compose_train, image_folder: Path, tmp_path: Path
) -> None:
    metrics, spy = _spied_run(
        compose_train,
        image_folder,
        tmp_path / "run",
        ["trainer.max_epochs=1", "trainer.precision=bf16-mixed", "finetune=full"],
    )
    assert spy["precision"] == metrics["precision"] == "bf16-mixed"
    assert spy["autocast"] == ["torch.bfloat16"], "the backbone ran under bf16 autocast"


@pytest.mark.integration
def test_early_stopping_fires(compose_train, image_folder: Path, tmp_path: Path) -> None:
    """A head that cannot move (LR 1e-12 on frozen features) never improves val/acc."""
    metrics = run_training(
        compose_train(
            [
                *TINY,
                f"data.root={image_folder}",
                "test=false",
                "finetune=linear_probe",
                "finetune.search=false",  # the epochs and LR of this config, not a search
                "callbacks=early_stopping",
                "callbacks.early_stopping.patience=1",
                "optimizer.lr=1e-12",
                "scheduler=none",
                "trainer.max_epochs=8",
            ],
            tmp_path / "run",
        )
    )
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert len(history) == 2, "epoch 0 sets the best, epoch 1 fails to beat it: stop"
    assert metrics["epochs"] < 8


@pytest.mark.integration
def test_checkpoint_reloads_offline_without_the_weights_file(
    compose_train, image_folder: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "init.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    overrides = [
        *TINY_ANY_MODEL,  # resnet18, the default, whose weights file this is
        f"data.root={image_folder}",
        "trainer.max_epochs=1",
        "model.pretrained=true",
        f"model.backbone.weights_path={weights}",
    ]
    run_dir = tmp_path / "run"
    run_training(compose_train(overrides, run_dir))
    weights.unlink()  # a reload must not need the original weights (nor the network)

    with pytest.raises(RuntimeError, match="network access"):
        socket.create_connection(("example.com", 80))
    task = ClassificationTask.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    task.eval()
    # the checkpoint's own preprocessing, 32 px
    dm = datamodule(preprocess=task.preprocess, root=str(image_folder), num_workers=0, batch_size=4)
    x = dm.normalize(next(iter(dm.val_dataloader()))[0])
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    twin = ClassificationTask(**{**task.hparams, "load_pretrained": False})
    twin.load_state_dict(state)
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(task(x), twin(x))
    assert task.class_names == ["cat", "dog", "fox"] and task.preprocess.input_size == 32


@pytest.mark.integration
def test_resume_from_last_checkpoint(compose_train, image_folder: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    base = [*TINY, f"data.root={image_folder}", "test=false"]
    run_training(compose_train([*base, "trainer.max_epochs=1"], run_dir))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    with pytest.warns(UserWarning, match="exists and is not empty"):  # resumed in place
        metrics = run_training(
            compose_train([*base, "trainer.max_epochs=3", f"ckpt_path={last}"], run_dir)
        )
    assert metrics["epochs"] == 3
    assert torch.load(last, weights_only=True)["epoch"] == 2
    assert len(_scalars(run_dir)["val/acc"]) == 3  # epoch 0 was not trained again
    # the cosine now spans the 3 epochs: the first run's had ended, at LR 0, with epoch 0
    lrs = pd.read_csv(run_dir / "history.csv").set_index("epoch")["lr"]
    assert lrs[0] == 0.0 and lrs[1] > 0.1 * lrs.max() and lrs[2] == 0.0


@pytest.mark.integration
def test_a_resume_that_cannot_continue_its_run_is_refused_before_training(
    compose_train, image_folder: Path, tmp_path: Path
) -> None:
    base = [*TINY, f"data.root={image_folder}", "test=false", "logger=none"]
    cosine, cycle = tmp_path / "cosine", tmp_path / "cycle"
    run_training(compose_train([*base, "trainer.max_epochs=1"], cosine))
    run_training(compose_train([*base, "trainer.max_epochs=1", "scheduler=onecycle"], cycle))
    four = make_image_folder(tmp_path / "four", classes=("cat", "dog", "fox", "owl"))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint" * 64)
    last = cosine / "checkpoints" / "last.ckpt"
    refused = [  # (checkpoint, overrides, message); each before the run writes a file
        (last, ["scheduler=step"], "used the LambdaLR LR scheduler, this run StepLR"),
        (last, ["model/head=mlp"], "its network is not this run's: model.head"),
        (last, [f"data.root={four}"], r"trained on the classes \['cat', 'dog', 'fox'\]"),
        (garbage, [], "not a PyTorch zip archive"),
    ]
    kept = [last, cosine / "config.yaml", cosine / "split.csv", cosine / "history.csv"]
    before = [p.read_bytes() for p in kept]
    for checkpoint, extra, message in refused:
        overrides = [*base, "trainer.max_epochs=2", *extra, f"ckpt_path={checkpoint}"]
        with pytest.raises(ConfigError, match=message):
            run_training(compose_train(overrides, cosine))
        assert [p.read_bytes() for p in kept] == before  # the run it refused is untouched
    # A OneCycle schedule cannot stretch to more epochs: refused before the first step.
    cycle_last = cycle / "checkpoints" / "last.ckpt"
    saved = cycle_last.read_bytes()
    stretched = [*base, "trainer.max_epochs=2", "scheduler=onecycle", f"ckpt_path={cycle_last}"]
    with pytest.raises(ConfigError, match="its OneCycle schedule ends after"):
        run_training(compose_train(stretched, cycle))
    assert cycle_last.read_bytes() == saved


@pytest.mark.integration
@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_ensemble_fast_dev_run(
    compose_train, image_folder: Path, tmp_path: Path, fusion: str
) -> None:
    overrides = [
        *TINY_ANY_MODEL,
        f"data.root={image_folder}",
        "model=ensemble",
        f"model.fusion={fusion}",
        "model.members=[resnet18,mobilenet_v2]",
        "trainer.fast_dev_run=true",
    ]
    metrics = run_training(compose_train(overrides, tmp_path / "run"))
    assert metrics["num_classes"] == 3 and metrics["best_checkpoint"] is None


@pytest.mark.integration
@pytest.mark.parametrize(
    "overrides",
    [
        # the probe search with another optimiser, an epoch scheduler and a dropout head
        [
            "finetune=linear_probe",
            "finetune.epochs=2",
            "finetune.short_epochs=0",  # the converged recipe, under SGD and a step schedule
            "model/head=mlp",
            "optimizer=sgd",
            "scheduler=step",
        ],
        ["finetune=partial", "optimizer=adam", "scheduler=onecycle", "loss.class_weights=auto"],
        [
            "finetune=gradual",
            "finetune.unfreeze_epoch=1",
            "scheduler=cosine",
            "loss.label_smoothing=0.1",
            "data.augment=trivialaugment",
        ],
        ["scheduler=plateau", "callbacks=early_stopping", "data.augment=randaugment"],
        ["scheduler=none", "model.backbone.name=timm/tf_efficientnet_lite0"],
        ["trainer.precision=bf16-mixed", "model.backbone.name=mobilenet_v3_large"],
    ],
    ids=["probe-sgd-step", "partial-adam-onecycle", "gradual-cosine", "plateau-es", "timm", "bf16"],
)
def test_config_groups_train(compose_train, image_folder: Path, tmp_path: Path, overrides) -> None:
    cfg = compose_train([*TINY, f"data.root={image_folder}", "test=false", *overrides], tmp_path)
    metrics = run_training(cfg)
    assert metrics["epochs"] == 2 and metrics["best_val_acc"] is not None


@pytest.mark.integration
def test_gradual_unfreezes_the_backbone(image_folder: Path) -> None:
    from functools import partial

    import lightning as L

    from vision_tl.training.optim import cosine_with_warmup

    frozen: list[bool] = []
    groups: list[int] = []

    class Probe(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            frozen.append(not any(p.requires_grad for p in pl_module.model.backbone_parameters()))
            groups.append(len(trainer.optimizers[0].param_groups))

    task = ClassificationTask(
        {"backbone": {"name": "resnet18"}, "pretrained": False},
        ["cat", "dog", "fox"],
        finetune={"mode": "gradual", "unfreeze_epoch": 1, "backbone_lr_mult": 0.1},
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        scheduler=partial(cosine_with_warmup, warmup_epochs=0),
    )
    start = task.model.backbone.body.conv1.weight.detach().clone()
    dm = datamodule(
        base=task.preprocess, root=str(image_folder), num_workers=0, batch_size=8, image_size=32
    )
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[Probe()],
    )
    trainer.fit(task, datamodule=dm)
    assert frozen == [True, False, False] and groups == [1, 2, 2]
    lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
    assert lrs[1] == pytest.approx(lrs[0] * 0.1)
    assert not torch.equal(start, task.model.backbone.body.conv1.weight)


@pytest.mark.integration
def test_cli_contract_with_ensemble_and_prefilled_weights_cache(
    image_folder: Path, tmp_path: Path
) -> None:
    """The README line, verbatim, works offline once the weights sit in torch.hub's cache."""
    import os

    for arch in ("resnet50", "mobilenet_v2"):
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        path = Path(torchvision_cache_path(weights.url))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), path)
    run_dir = tmp_path / "cli_run"
    result = run_cli(
        [
            "vision_tl.train",
            f"data.root={image_folder}",
            "model=ensemble",
            "trainer.devices=1",
            "trainer.max_epochs=1",
            f"hydra.run.dir={run_dir}",
            "data.image_size=32",
            "data.num_workers=0",
            "callbacks.rich_progress_bar=null",
        ],
        cwd=tmp_path,
        env={"TORCH_HOME": os.environ["TORCH_HOME"], "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_classes"] == 3 and (run_dir / "checkpoints" / "best.ckpt").is_file()
    assert not (tmp_path / "outputs").exists(), "hydra.run.dir must hold the whole run"


@pytest.mark.slow  # 9 s: moved out of the suite's 10-minute budget
def test_same_seed_same_run(compose_train, image_folder: Path, tmp_path: Path) -> None:
    overrides = [*TINY, f"data.root={image_folder}", "test=false", "seed=7"]
    runs = [run_training(compose_train(overrides, tmp_path / name)) for name in ("a", "b")]
    assert runs[0]["val_loss"] is not None and runs[0]["val_loss"] == runs[1]["val_loss"]
    heads = [
        torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for name in ("a", "b")
    ]
    torch.testing.assert_close(heads[0]["model.head.0.weight"], heads[1]["model.head.0.weight"])


def test_top5_only_with_five_classes() -> None:
    from vision_tl.training.task import _split_metrics

    assert "acc_top5" in _split_metrics(5, "val/")
    assert "acc_top5" not in _split_metrics(4, "val/")
