"""Feature cache for frozen backbones: same features, reused across runs, invalidated on change."""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from conftest import TINY_ANY_MODEL, _draw

from vision_tl.core.errors import ConfigError
from vision_tl.core.runtime import feature_batch_size
from vision_tl.data import ImageDataModule
from vision_tl.data.augment import normalize_batch, train_transform
from vision_tl.data.dataset import ImageListDataset
from vision_tl.data.features import (
    CachedFeatures,
    FeatureSpec,
    build_features,
    load_or_build,
    view_seed,
)
from vision_tl.data.samplers import ViewSampler
from vision_tl.models import FUSIONS, build_model
from vision_tl.models.backbones import Backbone
from vision_tl.training.build import build_data, preprocess_overrides
from vision_tl.training.callbacks import FeatureCache
from vision_tl.training.task import ClassificationTask
from vision_tl.training.train import run_training

CLASSES = ["cat", "dog", "fox"]


def _task(finetune: str = "linear_probe", backbone: str = "resnet18") -> ClassificationTask:
    # The cache, not the probe search (tests/test_probe.py), is under test here.
    policy = {"mode": finetune, **({"search": False} if finetune == "linear_probe" else {})}
    return ClassificationTask(
        {"backbone": {"name": backbone}, "pretrained": False},
        CLASSES,
        finetune=policy,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
    )


def prepare_features(
    built: tuple[ImageDataModule, FeatureSpec], task: ClassificationTask, fast_dev_run: bool = False
) -> CachedFeatures | None:
    """Run the `FeatureCache` callback's fit setup with what it reads from a Trainer."""
    dm, spec = built
    device = SimpleNamespace(root_device=torch.device("cpu"))
    trainer = SimpleNamespace(datamodule=dm, fast_dev_run=fast_dev_run, strategy=device)
    dm.use_features(None)
    task.feature_inputs = False
    stage = task.finetune.plan()[-1]
    callback = FeatureCache.plan(spec, task.finetune, stage, dm.augment, fast_dev_run)
    if callback is not None:  # decided before any Trainer exists
        callback.setup(trainer, task, "fit")
    assert task.feature_inputs == (dm.features is not None), "the task is told explicitly"
    return dm.features


def _datamodule(
    root: Path, task: ClassificationTask, **kwargs
) -> tuple[ImageDataModule, FeatureSpec]:
    """The DataModule and feature spec of `data.*` keys, built as `build_run` builds them."""
    kwargs.setdefault("feature_precision", "fp32")  # exact comparisons with the backbone
    kwargs.setdefault("feature_engine", "torch")  # and spies on its Python code
    keys = {"root": str(root), "num_workers": 0, "batch_size": 8, "image_size": 32, **kwargs}
    data = build_data(keys)
    pre = task.model.preprocess.resolve(preprocess_overrides(keys, data.source))
    return data.datamodule(pre), data.feature_spec


@pytest.mark.integration
def test_cached_features_equal_the_backbone_on_images(image_folder: Path) -> None:
    task = _task()
    dm, spec = _datamodule(image_folder, task, augment="none")
    cached = prepare_features((dm, spec), task)
    assert cached is not None and cached.hits == {"eval": False}
    for split in ("train", "val", "test"):
        dataset, views = cached.dataset(split, train=split == "train")
        features = torch.stack([dataset[i][0] for i in range(len(dataset))])
        images = dm.image_dataset(split, train=False)
        x = dm.normalize(torch.stack([images[i][0] for i in range(len(images))]))
        task.model.eval()
        with torch.no_grad():
            expected = task.model.features(x)
        assert views == 1 and features.shape == (24, 512)
        torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
        assert [dataset[i][1] for i in range(24)] == [label for _, label in images.samples]
    assert prepare_features((dm, spec), task).hits == {"eval": True}


@pytest.mark.integration
@pytest.mark.parametrize(("requested", "expected"), [(None, 8), (5, 5)])
def test_feature_cache_batches_are_small_on_a_cpu_unless_asked(
    image_folder: Path, requested: int | None, expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU the cache runs the backbone 8 images at a time (about twice the images/s
    of 32 on small CPUs), not at the training batch; `data.feature_batch_size` overrides."""
    task = _task()
    dm, spec = _datamodule(
        image_folder, task, augment="none", feature_batch_size=requested, batch_size=16
    )
    sizes: list[int] = []
    features = task.model.features
    monkeypatch.setattr(task.model, "features", lambda x: sizes.append(len(x)) or features(x))
    assert prepare_features((dm, spec), task) is not None
    assert sum(sizes) == 72 and max(sizes) == expected and sizes.count(expected) == 72 // expected
    assert feature_batch_size(None, torch.device("cuda"), 16) == 32
    assert feature_batch_size(None, torch.device("cuda"), 64) == 64
    with pytest.raises(ConfigError, match=r"data\.feature_batch_size=0"):
        _datamodule(image_folder, task, feature_batch_size=0)


@pytest.mark.parametrize("fusion", FUSIONS.names())
def test_ensemble_heads_run_on_concatenated_member_features(fusion: str) -> None:
    spec = {"members": ["resnet18", "mobilenet_v2"], "fusion": fusion, "pretrained": False}
    model = build_model(spec, num_classes=3, pretrained=False).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.features(x)
        assert features.shape == (2, 512 + 1280)
        torch.testing.assert_close(model.classify_features(features), model(x))


@pytest.mark.integration
def test_augmented_views_and_clear_bypasses(
    image_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    task = _task()
    dm, spec = _datamodule(image_folder, task, augment="flip_crop", feature_views=3)
    cached = prepare_features((dm, spec), task)
    train, views = cached.dataset("train", train=True)
    assert views == 3 and cached.train_store.views == 3 and len(train) == 24
    assert cached.dataset("val", train=False)[1] == 1
    drawn = list(ViewSampler(range(24), 24, views))
    assert sorted(i % 24 for i in drawn) == list(range(24)) and max(drawn) < 72
    first, second = train[5][0], train[24 + 5][0]
    assert not torch.equal(first, second), "each view is a different augmentation"
    batch = [70, 5, 29, 0, 53, 5]  # the DataLoader's batched read: any views, any order
    for (row, label), k in zip(train.__getitems__(batch), batch, strict=True):
        assert torch.equal(row, train[k][0]) and label == train[k][1]
    reseeded = prepare_features(
        _datamodule(image_folder, task, augment="flip_crop", feature_views=3, seed=43), task
    )
    assert reseeded.hits == {"eval": True, "train": False}, "another seed draws other views"
    assert not torch.equal(reseeded.dataset("train", train=True)[0][5][0], first)
    assert prepare_features((dm, spec), task).hits == {"eval": True, "train": True}

    with caplog.at_level(logging.INFO, logger="vision_tl.training.callbacks"):
        no_views = _datamodule(image_folder, task, feature_views=0)
        assert prepare_features(no_views, task) is None
        assert prepare_features((dm, spec), _task("partial")) is None
        assert prepare_features((dm, spec), task, fast_dev_run=True) is None
    assert "bypassed: data.augment=flip_crop with data.feature_views=0" in caplog.text
    assert "bypassed: finetune=partial trains the last backbone stages" in caplog.text
    assert "bypassed: trainer.fast_dev_run" in caplog.text
    strict = _datamodule(image_folder, task, feature_cache="on")
    with pytest.raises(ConfigError, match="feature_cache=on cannot be used: finetune=full"):
        prepare_features(strict, _task("full"))


class _Pixels(torch.nn.Module):
    """A backbone whose features are its normalised input: a row shows which crop it saw."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class _CountingReads(ImageListDataset):
    reads = 0

    def read(self, index: int) -> torch.Tensor:
        self.reads += 1
        return super().read(index)


def test_each_augmented_view_depends_on_its_image_and_view_only(
    image_folder: Path, tmp_path: Path
) -> None:
    pre = _task().model.preprocess.resolve({"image_size": 16})
    transform = train_transform(pre, "flip_crop")
    files = sorted(str(p) for p in (image_folder / "train").rglob("*.png"))
    n, cpu = len(files), torch.device("cpu")
    rows = {}
    for batch, workers in ((1, 0), (5, 2)):
        images = _CountingReads([(f, 0) for f in files], pre.read, transform)
        store, _ = load_or_build(
            tmp_path / f"b{batch}",
            {"views": 3},
            _Pixels(),
            images,
            pre,
            3,
            cpu,
            batch,
            workers,
            seed=7,
        )
        rows[batch] = np.fromfile(store.data_file, dtype=np.float32).reshape(3, n, -1)
        if workers == 0:
            assert images.reads == n, "one decode per image serves all its views"
    np.testing.assert_array_equal(rows[1], rows[5], "not the batch size or the worker count")
    assert not np.array_equal(rows[1][0], rows[1][1]), "the views differ"
    for view, i in ((0, 0), (2, 7), (1, n - 1)):
        torch.manual_seed(view_seed(7, view, i))
        crop = transform(pre.read(files[i]))
        expected = normalize_batch(crop.unsqueeze(0), pre).flatten()
        np.testing.assert_allclose(rows[1][view, i], expected.numpy(), rtol=1e-6)


@pytest.mark.slow  # 18 s: moved out of the suite's 10-minute budget
def test_linear_probe_reuses_the_cache_and_a_change_invalidates_it(
    compose_train,
    image_folder: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    forward = Backbone.forward
    monkeypatch.setattr(Backbone, "forward", lambda self, x: calls.append(1) or forward(self, x))
    # The plain probe in fp32: the cached run must train exactly like the uncached one.
    # resnet18: the test swaps in a weights file of its own further on.
    base = [
        *TINY_ANY_MODEL,
        f"data.root={image_folder}",
        "finetune=linear_probe",
        "finetune.search=false",
        "data.feature_precision=fp32",
        "data.augment=none",
    ]

    def run(name: str, *extra: str) -> tuple[dict, str]:
        caplog.clear()
        calls.clear()
        with caplog.at_level(logging.INFO, logger="vision_tl.data.features"):
            metrics = run_training(compose_train([*base, *extra], tmp_path / name))
        verdict = [r.message for r in caplog.records if "the backbone does not run" in r.message]
        return metrics, (verdict[0].split()[2] if verdict else "bypassed")

    uncached, verdict = run("uncached", "data.feature_cache=off")
    assert verdict == "bypassed" and len(calls) > 0
    first, verdict = run("first")
    assert verdict == "built"
    # Same features, same batches: the cached probe trains exactly like the uncached one.
    assert first["val_loss"] == pytest.approx(uncached["val_loss"], rel=1e-4)
    heads = [
        torch.load(tmp_path / n / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for n in ("uncached", "first")
    ]
    torch.testing.assert_close(heads[0]["model.head.0.weight"], heads[1]["model.head.0.weight"])

    second, verdict = run("second")
    assert verdict == "reusing" and calls == [], "a cache hit never runs the backbone"
    assert second["val_loss"] == pytest.approx(first["val_loss"], rel=1e-6)

    # The checkpoint holds the whole network: on images it scores what training logged.
    task = ClassificationTask.load_from_checkpoint(
        tmp_path / "second" / "checkpoints" / "last.ckpt"
    )
    assert any(k.startswith("model.backbone.") for k in task.state_dict())
    dm = _datamodule(image_folder, task, augment="none")[0]
    images = dm.image_dataset("val", train=False)
    x = dm.normalize(torch.stack([images[i][0] for i in range(len(images))]))
    y = torch.tensor([label for _, label in images.samples])
    with torch.no_grad():
        accuracy = (task.eval()(x).argmax(1) == y).float().mean().item()
    assert accuracy == pytest.approx(second["val_acc"])

    _draw(0, seed=4242, size=40).save(image_folder / "train" / "cat" / "new.png")
    assert run("more_files")[1] == "built"
    assert run("more_files_again")[1] == "reusing"
    weights = tmp_path / "other.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    changed = ["model.pretrained=true", f"model.backbone.weights_path={weights}"]
    assert run("other_weights", *changed)[1] == "built"
    assert run("other_backbone", "model.backbone.name=mobilenet_v2")[1] == "built"


@pytest.mark.slow  # 6 s: views and ensembles each have tests in the suite
def test_ensemble_probe_with_augmented_views_trains_from_the_cache(
    compose_train, image_folder: Path, tmp_path: Path
) -> None:
    overrides = [
        *TINY_ANY_MODEL,
        f"data.root={image_folder}",
        "model=ensemble",
        "model.members=[resnet18,mobilenet_v2]",
        "model.fusion=logits",
        "finetune=linear_probe",
        "finetune.search=false",
        "data.feature_views=2",
        "trainer.max_epochs=1",
        "+callbacks.spy._target_=helpers.spies.RunSpy",
    ]
    metrics = run_training(compose_train(overrides, tmp_path / "run"))
    assert metrics["epochs"] == 1 and 0.0 <= metrics["test_acc"] <= 1.0
    spy = json.loads((tmp_path / "run" / "spy.json").read_text())
    assert spy["feature_inputs"] and spy["backbone_calls"] == 0, "no member ran during training"

    bypassed = [*overrides, "data.feature_cache=off"]
    run_training(compose_train(bypassed, tmp_path / "off"))
    spy = json.loads((tmp_path / "off" / "spy.json").read_text())
    assert spy["backbone_calls"] > 0, "the spy sees the members when they do run"


@pytest.mark.integration
def test_a_views_subset_gives_the_rows_the_whole_split_would_and_lends_them(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Views drawn for a subset first, a view at a time, are the whole split's rows for
    those images, and each later entry copies them instead of running the backbone on
    them again: it computes only the views it lacks."""
    task = _task()
    keys = {"augment": "flip_crop", "feature_views": 3, "cache": str(tmp_path / "a")}
    dm, spec = _datamodule(image_folder, task, **keys)
    train = sorted(k for k, _ in dm.catalog.samples["train"])
    subset = train[3:9]
    cpu = torch.device("cpu")
    counted: list[int] = []
    features = task.model.features
    monkeypatch.setattr(task.model, "features", lambda x: counted.append(len(x)) or features(x))
    first = build_features(spec, dm, task.model, cpu, views=subset, subset_views=1)
    assert first.train_store.files == subset and first.train_store.views == 1
    counted.clear()
    second = build_features(
        spec, dm, task.model, cpu, views=subset, reuse=first.train_store, subset_views=2
    )
    assert second.train_store.views == 2 and sum(counted) == len(subset), "one more view"
    counted.clear()
    whole = build_features(spec, dm, task.model, cpu, views="all", reuse=second.train_store)
    rest = len(train) - len(subset)
    assert sum(counted) == 3 * rest + len(subset), "the subset's two views are copied"
    subset_rows = np.fromfile(second.train_store.data_file, np.float32).reshape(2, 6, -1)
    whole_rows = np.fromfile(whole.train_store.data_file, np.float32).reshape(3, len(train), -1)
    np.testing.assert_array_equal(whole_rows[:2, 3:9], subset_rows)
    fresh_dm, fresh_spec = _datamodule(image_folder, task, **{**keys, "cache": str(tmp_path / "b")})
    fresh = build_features(fresh_spec, fresh_dm, task.model, cpu)
    rows = np.fromfile(whole.train_store.data_file, np.float32)
    # The same crops; the backbone's float sums differ in the last bits with the batch mates.
    expected = np.fromfile(fresh.train_store.data_file, np.float32)
    np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-5)
    assert whole.train_store.directory.name == fresh.train_store.directory.name, "one entry"


@pytest.mark.integration
def test_an_image_failing_last_leaves_its_rows_in_place_and_the_entry_readable(
    image_folder: Path,
) -> None:
    """A file that passed the scan but fails during extraction, listed last: it is reported,
    the entry still holds a row for every listed image, and its split reads without it."""
    task = _task()
    dm, spec = _datamodule(image_folder, task, augment="none")
    last = dm.catalog.all_keys()[-1]
    Path(last).write_bytes(b"\x89PNG\r\n\x1a\n broken after the scan")
    cached = build_features(spec, dm, task.model, torch.device("cpu"))
    store = cached.eval_store
    assert set(store.failed) == {last}
    assert store.data_file.stat().st_size == len(store.files) * store.dim * 4
    split = next(n for n, samples in dm.catalog.samples.items() if last in dict(samples))
    x, y = cached.tensors(split, train=False)
    assert x.shape == (1, len(dm.catalog.samples[split]) - 1, store.dim) and len(y) == x.shape[1]


@pytest.mark.integration
def test_two_ranks_share_an_extraction_and_write_the_rows_of_one_process(
    image_folder: Path, tmp_path: Path
) -> None:
    """Each rank runs the backbone on its share only (the images seen add up to one
    process's), and the assembled entry is byte for byte the one-process entry."""
    import subprocess
    import sys

    from helpers.feature_ranks import VIEWS, build
    from helpers.net import free_port

    files = sorted((image_folder / "train").rglob("*.png"))
    single, seen = build(image_folder / "train", tmp_path / "one")
    assert seen == len(files) * VIEWS
    script = Path(__file__).parent / "helpers" / "feature_ranks.py"
    args = [str(free_port()), str(image_folder / "train"), str(tmp_path / "two"), str(tmp_path)]
    ranks = [
        subprocess.Popen([sys.executable, str(script), str(rank), "2", *args], text=True)
        for rank in (0, 1)
    ]
    try:
        assert [p.wait(timeout=120) for p in ranks] == [0, 0]
    finally:
        for process in ranks:
            process.kill()
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["data_file"] == reports[1]["data_file"]
    shares = [r["seen"] for r in reports]
    assert sum(shares) == len(files) * VIEWS and min(shares) > 0, shares
    two = Path(reports[0]["data_file"])
    assert two.read_bytes() == Path(single).read_bytes()
    assert sorted(p.name for p in two.parent.iterdir()) == ["features.f32", "meta.json"]


@pytest.mark.unit
def test_the_search_holds_a_bounded_stratified_share_of_a_large_split() -> None:
    from types import SimpleNamespace

    from vision_tl.data.features import CachedFeatures
    from vision_tl.training.probe import _capped

    train = [(f"img{i:05d}", 0 if i < 9000 else 1) for i in range(10000)]
    stores = SimpleNamespace(views=4)
    features = CachedFeatures(stores, stores, {"train": train, "val": train[:5]})
    capped = _capped(features, max_rows=5000, folds=3)
    kept = capped.samples["train"]
    assert len(kept) * 5 <= 5000 + 2 * 3  # rounding per class
    assert sum(label for _, label in kept) / len(kept) == pytest.approx(0.1, abs=0.01)
    assert set(kept) <= set(train) and capped.samples["val"] == train[:5]
    assert _capped(features, max_rows=50000, folds=3) is features
