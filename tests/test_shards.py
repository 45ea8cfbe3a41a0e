"""LitData shards: `vision_tl.shard` writes a folder's split as streaming datasets, and a
run from them trains on exactly the folder run's images, locally or from S3."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    HYMENOPTERA,
    QUICK_PROBE,
    QUICK_TRAIN,
    SHARED_WEIGHTS,
    TINY,
    _draw,
    make_image_folder,
)
from PIL import Image

from vision_tl.core.errors import ConfigError
from vision_tl.data.decode import ReadLimits, open_image
from vision_tl.data.preprocess import Preprocess
from vision_tl.data.shards import ShardDecode, ShardSettings, encode_file, write_shards
from vision_tl.data.sources import source_name
from vision_tl.data.sources.shards import LocalChunks, ShardSamples, ShardSource
from vision_tl.training.build import build_data, shard_data
from vision_tl.training.train import run_training

HELPERS = Path(__file__).parent / "helpers"


def _shard(data: dict, out: str | Path, **settings) -> dict:
    """Convert as `python -m vision_tl.shard` does (its worker, in this process)."""
    decode = ShardDecode(max_side=settings.pop("max_side", None))
    return shard_data(data, ShardSettings(str(out), workers=1, decode=decode, **settings))


@pytest.mark.unit
def test_shard_samples_hold_labels_not_a_python_object_per_sample() -> None:
    samples = ShardSamples("val", np.array([2, 0, 1], dtype=np.int64))
    assert len(samples) == 3 and samples[1] == ("val/1", 0) and samples[-1] == ("val/2", 1)
    assert list(samples) == [("val/0", 2), ("val/1", 0), ("val/2", 1)]
    assert samples[1:] == [("val/1", 0), ("val/2", 1)]
    with pytest.raises(IndexError):
        samples[3]
    assert source_name({"shards": "s3://b/p", "root": "x"}) == "shards"
    # keys sort in catalog order (the folder's), whatever sorts them: the views' seeds
    keys = [key for key, _ in ShardSamples("train", np.zeros(101, dtype=np.int64))]
    assert keys == sorted(keys) and keys[7] == "train/007" and keys[-1] == "train/100"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"out": ""}, "shard.out is required"),
        ({"out": "x", "parts": 2, "part": 2}, r"shard.part=2: one of 0..1"),
        ({"out": "x", "merge": True}, "shard.parts >= 2"),
    ],
)
def test_shard_settings_that_cannot_work_are_one_line(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ShardSettings(**settings)


@pytest.mark.unit
def test_without_litdata_a_conversion_is_a_one_line_error_after_the_scan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without LitData the scan still runs, and the conversion names the extra to install
    and writes nothing."""
    monkeypatch.setitem(sys.modules, "litdata", None)  # `import litdata` raises ImportError
    data = make_image_folder(tmp_path / "data", per_class=2, size=16)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[scale\]"'):
        _shard({"root": str(data), "num_workers": 0}, tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()


@pytest.mark.unit
def test_plain_jpegs_keep_their_bytes_and_the_rest_decode_as_training_does(
    tmp_path: Path,
) -> None:
    pre, limits = Preprocess(input_size=32, resize_size=36), ReadLimits()
    plain = tmp_path / "plain.jpg"
    _draw(0, 1, 64).save(plain, quality=90)
    assert encode_file(str(plain), ShardDecode(), limits) == plain.read_bytes()
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored upright, as training decodes it
    _draw(1, 2, 64).crop((0, 0, 64, 48)).save(rotated, exif=exif, quality=90)
    stored = encode_file(str(rotated), ShardDecode(), limits)
    assert Image.open(io.BytesIO(stored)).size == (48, 64)
    alpha = tmp_path / "alpha.png"
    _draw(2, 3, 300, mode="RGBA").save(alpha)
    stored = encode_file(str(alpha), ShardDecode(), limits)
    assert torch.equal(pre.read(io.BytesIO(stored)), pre.read(alpha)), "PNG: lossless"
    small = encode_file(str(alpha), ShardDecode(max_side=100), limits)
    assert Image.open(io.BytesIO(small)).size == (100, 100)
    # A multi-picture JPEG opens as MPO through the JPEG plugin too: stored as its first
    # picture, re-encoded, never as the bytes of both.
    mpo = tmp_path / "two.jpg"
    _draw(3, 4, 64).save(mpo, "MPO", save_all=True, append_images=[_draw(4, 5, 64)])
    with open_image(mpo) as image:
        assert image.format == "MPO"
    stored = encode_file(str(mpo), ShardDecode(), limits)
    assert stored != mpo.read_bytes() and Image.open(io.BytesIO(stored)).format == "JPEG"
    assert Image.open(io.BytesIO(stored)).size == (64, 64)


@pytest.mark.unit
def test_the_scan_tells_the_conversion_which_files_keep_their_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scan records, per good file, its size, mtime and the longer side of a plain
    upright JPEG (0 for anything else); the conversion then keeps such a file's bytes
    without reading its header, unless the file changed since."""
    from vision_tl.data import shards
    from vision_tl.data.scan import ImageScanner

    plain, gray, rotated, png = (tmp_path / n for n in ("a.jpg", "g.jpg", "r.jpg", "p.png"))
    _draw(0, 1, 64).crop((0, 0, 64, 40)).save(plain, quality=90)
    _draw(1, 2, 30).convert("L").save(gray, quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    _draw(2, 3, 64).save(rotated, exif=exif, quality=90)
    _draw(3, 4, 32).save(png)
    files = [str(p) for p in (plain, gray, rotated, png)]
    cache = tmp_path / "scan.json"
    report = ImageScanner(cache).scan([*files, str(tmp_path / "missing.jpg")])
    assert report.good == files
    sizes = [[os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]
    assert report.facts.tolist() == [
        [*sizes[0], 64],
        [*sizes[1], 30],
        [*sizes[2], 0],
        [*sizes[3], 0],
    ]
    assert ImageScanner(cache).scan(files).facts.tolist() == report.facts.tolist(), "cached"

    parsed = []

    def spy(*args, **kwargs):
        parsed.append(args[0])
        return open_image(*args, **kwargs)

    monkeypatch.setattr(shards, "open_image", spy)
    decode, limits = ShardDecode(), ReadLimits()
    known = report.facts.tolist()
    assert encode_file(files[0], decode, limits, known[0]) == plain.read_bytes()
    assert encode_file(files[1], decode, limits, known[1]) == gray.read_bytes()
    assert parsed == [], "known plain JPEGs are kept without a second header read"
    assert encode_file(files[0], ShardDecode(max_side=50), limits, known[0]) != plain.read_bytes()
    assert len(parsed) == 1, "larger than max_side: decoded and downsized"
    stored = encode_file(files[2], decode, limits, known[2])
    assert Image.open(io.BytesIO(stored)).size == (64, 64) and len(parsed) == 2
    # Replaced since the scan by a rotated JPEG: the stale facts are not trusted.
    _draw(4, 5, 64).crop((0, 0, 64, 40)).save(plain, exif=exif, quality=90)
    stored = encode_file(files[0], decode, limits, known[0])
    assert Image.open(io.BytesIO(stored)).size == (40, 64) and len(parsed) == 3
    # A verdict cached by an older vision_tl (no side): known as nothing, parsed.
    payload = json.loads(cache.read_text())
    payload["files"] = {p: v[:4] for p, v in payload["files"].items()}
    cache.write_text(json.dumps(payload))
    old = ImageScanner(cache).scan(files[1:])
    assert old.cached == 3 and old.facts[:, 2].tolist() == [0, 0, 0]


@pytest.mark.integration
def test_the_shard_command_writes_what_its_function_writes(tmp_path: Path) -> None:
    """`python -m vision_tl.shard` as a user runs it: `shard.*` and `data.*` reach the
    conversion, and its shards hold the rows `shard_data` writes in this process."""
    from conftest import run_cli

    data = make_image_folder(tmp_path / "data", per_class=4, splits=(), size=48)
    for c, name in enumerate(("cat", "dog", "fox")):  # kept as they are, unlike the PNGs
        _draw(c, 7, 32).save(data / name / "plain.jpg", quality=90)
    out = tmp_path / "cli"
    args = ["vision_tl.shard", f"data.root={data}", f"shard.out={out}", "shard.max_side=40"]
    done = run_cli([*args, "data.seed=3", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["decode"]["max_side"] == 40 and sum(meta["counts"].values()) == 15
    here = tmp_path / "here"
    settings = ShardSettings(str(here), workers=1, decode=ShardDecode(max_side=40), seed=3)
    assert shard_data({"root": str(data), "seed": 3}, settings)["counts"] == meta["counts"]
    for split in ("train", "val"):
        cli, own = (LocalChunks.open(d / split) for d in (out, here))
        images = [bytes(cli[i]["image"]) for i in range(len(cli))]
        assert images == [bytes(own[i]["image"]) for i in range(len(own))]
        assert all(max(Image.open(io.BytesIO(b)).size) <= 40 for b in images)
        assert (out / "index" / f"{split}.csv").read_text().replace(str(out), "") == (
            here / "index" / f"{split}.csv"
        ).read_text().replace(str(here), "")


@pytest.mark.integration
def test_a_run_from_shards_trains_on_the_folder_runs_images(compose_train, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=6, size=32)
    meta = _shard({"root": str(data), "num_workers": 0}, tmp_path / "shards")
    assert meta["counts"] == {"train": 18, "val": 18} and meta["classes"] == ["cat", "dog", "fox"]
    results = {}
    for name, source in (
        ("folder", f"data.root={data}"),
        ("shards", f"data.shards={tmp_path / 'shards'}"),
    ):
        cfg = compose_train([*QUICK_TRAIN, source, "model.pretrained=false"], tmp_path / name)
        results[name] = run_training(cfg)
    assert results["shards"]["best_val_acc"] == results["folder"]["best_val_acc"]
    folder, shards = (tmp_path / n / "checkpoints" / "best.ckpt" for n in ("folder", "shards"))
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in (folder, shards))
    assert all(torch.equal(a[k], b[k]) for k in a), "the same images in the same order"
    split = pd.read_csv(tmp_path / "shards" / "index" / "val.csv")
    assert split["path"].str.startswith("val/").all() and len(split) == 18


@pytest.mark.integration
def test_a_killed_conversion_resumes_and_parts_merge_into_the_same_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written in this process (`_shard`: one worker) or by LitData's worker processes,
    resumed after a kill, or in two parts merged: the same rows, as LitData reads them."""
    from vision_tl.data import shards

    data = {"root": str(make_image_folder(tmp_path / "data", per_class=5, size=32))}
    whole = tmp_path / "whole"
    _shard(data, whole)
    procs = tmp_path / "procs"
    # The machine's LitData staging folder, holding another conversion's chunks.
    staged = tmp_path / "machine_staging" / "chunk-0-0.bin"
    staged.parent.mkdir()
    staged.write_bytes(b"another run's chunk")
    with monkeypatch.context() as patch:
        patch.setenv("DATA_OPTIMIZER_CACHE_FOLDER", str(staged.parent))
        patch.setattr(shards, "IN_PROCESS_S", 0.0)  # however small: worker processes,
        patch.setattr(shards, "ENCODE_BLOCK", 4)  # handed blocks of 4 samples
        shard_data(data, ShardSettings(str(procs), workers=2))
        assert os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] == str(staged.parent)
    assert len(list((procs / "train").glob("chunk-*.bin"))) == 2, "one chunk per worker"
    assert staged.read_bytes() == b"another run's chunk", "staged in a folder of its own"
    # A conversion killed while writing val: train finished, val half-written, no meta.json.
    killed = tmp_path / "killed"
    _shard(data, killed)
    (killed / "meta.json").unlink()
    (killed / "val" / "index.json").unlink()
    (killed / "val" / "chunk-0-0.bin").write_bytes(b"cut short")
    train_chunks = {p.name: p.stat().st_mtime_ns for p in (killed / "train").iterdir()}
    _shard(data, killed)
    assert {p.name: p.stat().st_mtime_ns for p in (killed / "train").iterdir()} == train_chunks
    # Two machines convert a part each, then one merges.
    parts = tmp_path / "parts"
    for part in (0, 1):
        _shard(data, parts, parts=2, part=part)
    assert not (parts / "meta.json").exists()
    _shard(data, parts, parts=2, merge=True)
    pre = Preprocess(input_size=32, resize_size=36)
    places = (whole, killed, parts, procs)
    sources = [ShardSource(str(p), tmp_path / "cache") for p in places]
    catalogs = [s.catalog() for s in sources]
    for split in ("train", "val"):
        expected = list(catalogs[0].samples[split])
        assert all(list(c.samples[split]) == expected for c in catalogs[1:])
        for key, _ in expected:
            first = sources[0].open(key, pre)
            assert all(torch.equal(s.open(key, pre), first) for s in sources[1:]), key
    # A local set is read straight from its chunk files: every row as LitData reads it.
    import litdata

    assert len(list((parts / "train").glob("chunk-*.bin"))) >= 2, "rows in several chunks"
    for source, place in zip(sources, places, strict=True):
        for split in ("train", "val"):
            chunks = source.dataset(split)
            assert isinstance(chunks, LocalChunks)
            theirs = litdata.StreamingDataset(str(place / split), batch_decode=0)
            assert len(chunks) == len(theirs)
            for i in range(len(theirs)):
                row, want = chunks[i], theirs[i]
                assert bytes(row["image"]) == bytes(want["image"])
                assert (row["label"], row["index"]) == (want["label"], want["index"])
    index = json.loads((whole / "train" / "index.json").read_text())
    index["config"]["compression"] = "zstd"
    (whole / "train" / "index.json").write_text(json.dumps(index))
    assert LocalChunks.open(whole / "train") is None, "another layout is left to LitData"


@pytest.mark.slow
def test_two_ranks_read_disjoint_samples_for_two_epochs_from_s3(tmp_path: Path) -> None:
    from helpers.net import free_port
    from helpers.s3 import s3_server
    from test_launch import _assert_one_writer, _ranks, _two_nodes

    data = make_image_folder(tmp_path / "data", per_class=8, size=32)
    with s3_server(tmp_path / "s3") as env:
        _shard({"root": str(data)}, "s3://shards/set")
        run = tmp_path / "run"
        args = [
            *TINY,
            "trainer=ddp",
            "model.backbone.name=timm/test_efficientnet",
            "logger=none",
            "test=false",
            "data.shards=s3://shards/set",
            "+callbacks.samples._target_=spies.SamplesSpy",
            f"hydra.run.dir={run}",
        ]
        cache = tmp_path / "cache"
        commands = _two_nodes("node_rank", args, free_port(), VISION_TL_CACHE=str(cache), **env)
        results = _ranks(commands, cwd=tmp_path)
    assert [r.returncode for r in results] == [0, 0], results[0].stdout[-3000:]
    _assert_one_writer(run)
    assert json.loads((run / "metrics.json").read_text())["world_size"] == 2
    ranks = [json.loads((run / f"samples_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2, "two epochs"
    for epoch in (0, 1):
        first, second = set(ranks[0][epoch]), set(ranks[1][epoch])
        assert not first & second and len(first) == len(second)
        assert first | second == {f"train/{i:02d}" for i in range(24)}
    assert ranks[0][0] != ranks[0][1], "reshuffled each epoch"
    assert list(cache.glob("shards/*/train/**/index.json")), "read from S3 through the cache"


@pytest.mark.slow
def test_hymenoptera_from_shards_equals_the_folder_and_eval_reproduces_it(
    compose_train, tmp_path: Path
) -> None:
    """The Done-when of the shards: probe and fine-tune (lite0 weights) reach the same val
    accuracy from shards as from the folder; eval on the shard run agrees."""
    from conftest import compose_entry

    from vision_tl.inference.eval import run_eval

    shards = tmp_path / "shards"
    _shard({"root": str(HYMENOPTERA)}, shards)
    weights = [
        "model.backbone.name=timm/tf_efficientnet_lite0",
        f"model.backbone.weights_path={SHARED_WEIGHTS}",
        "logger=none",
    ]
    recipes = {
        "probe": QUICK_PROBE,
        "finetune": ["finetune=full", "trainer.max_epochs=1", "data.image_size=128"],
    }
    for recipe, extra in recipes.items():
        accs = {}
        for name, source in (
            ("folder", f"data.root={HYMENOPTERA}"),
            ("shards", f"data.shards={shards}"),
        ):
            cfg = compose_train([*weights, *extra, source], tmp_path / recipe / name)
            accs[name] = run_training(cfg)["best_val_acc"]
        assert accs["shards"] == accs["folder"], (recipe, accs)
    best = tmp_path / "probe" / "shards" / "checkpoints" / "best.ckpt"
    cfg = compose_entry(
        "eval", [f"ckpt_path={best}", f"data.shards={shards}", "split=val"], tmp_path / "eval"
    )
    metrics = run_eval(cfg)
    probe = json.loads((tmp_path / "probe" / "shards" / "metrics.json").read_text())
    assert metrics["acc"] == pytest.approx(probe["best_val_acc"], abs=1e-6)
    assert os.path.getsize(tmp_path / "eval" / "predictions.csv") > 0


@pytest.mark.slow
def test_a_streamed_run_stopped_mid_epoch_resumes_at_its_place_in_the_stream(
    tmp_path: Path,
) -> None:
    """data.stream=true: SIGTERM during epoch 1's first batch saves the loader's place in
    last.ckpt; the resumed run trains on the rest of epoch 1 only, so epoch 1 sees as many
    samples over both attempts as epoch 0 did."""
    from conftest import run_cli

    data = make_image_folder(tmp_path / "data", per_class=16, size=32)
    _shard({"root": str(data)}, tmp_path / "shards")
    run = tmp_path / "run"
    args = [
        "vision_tl.train",
        *TINY,
        "data.num_workers=2",
        "model.backbone.name=timm/test_efficientnet",
        "logger=none",
        "test=false",
        f"data.shards={tmp_path / 'shards'}",
        "data.stream=true",
        "+callbacks.seen._target_=spies.SeenSpy",
        "+callbacks.term._target_=faults.SignalAtEpoch",
        "+callbacks.term.epoch=1",
        f"hydra.run.dir={run}",
    ]
    env = {"PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}
    stopped = run_cli(args, cwd=tmp_path, env={**env, "VISION_TL_TEST_SIGNAL": "TERM"})
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"], "the loader's place"
    resumed = run_cli([*args, f"ckpt_path={last}"], cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    seen = pd.read_json(run / "seen.jsonl", lines=True).groupby("epoch")["n"].sum()
    assert seen[0] == seen[1] > 0, seen.to_dict()
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == [0, 1]


@pytest.mark.integration
def test_a_file_that_breaks_after_the_scan_is_a_logged_skip_when_read(tmp_path: Path) -> None:
    """Stored empty at conversion, then refused with its reason by reads by index and by
    the stream, through the same `on_error` as a bad file; the other samples load."""
    from vision_tl.data.augment import eval_transform
    from vision_tl.data.dataset import ImageListDataset
    from vision_tl.data.sources.shards import StreamItem, key_width

    folder = make_image_folder(tmp_path / "data", per_class=3, size=32)
    built = build_data({"root": str(folder)})
    broken = folder / "train" / "dog" / "dog_1.png"
    broken.write_bytes(b"not an image any more")  # after the scan, before the conversion
    settings = ShardSettings(str(tmp_path / "shards"), workers=1)
    write_shards(built.source, built.catalog, settings, "fingerprint")
    source = ShardSource(str(tmp_path / "shards"), tmp_path / "cache")
    catalog = source.catalog()
    pre = Preprocess(input_size=32, resize_size=36)
    errors: list[tuple[str, str]] = []
    images = ImageListDataset(
        catalog.samples["train"],
        source.reader(pre),
        eval_transform(pre),
        on_error=lambda *e: errors.append(e),
    )
    loaded = [images[i] for i in range(len(images))]
    ((key, reason),) = errors
    assert source.name_of(key) == "train/dog/dog_1.png" and "stored empty" in reason
    assert sum(item is None for item in loaded) == 1
    width = key_width(len(catalog.samples["train"]))
    item = StreamItem(
        "train", width, pre, eval_transform(pre), ReadLimits(), lambda *e: errors.append(e)
    )
    position = int(key.split("/")[1])
    dataset = source.dataset("train")
    stored = next(dataset[i] for i in range(len(dataset)) if dataset[i]["index"] == position)
    assert item(stored) is None and "stored empty" in errors[-1][1]
    assert errors[-1][0] == key, "the stream names the sample as reads by index do"
