"""Real-world folders: every kind of bad and odd file, manifests, imbalance, fast decoding."""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY, _draw, make_image_folder
from helpers.data import datamodule
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vision_tl.core.errors import ConfigError
from vision_tl.data import Preprocess, load_rgb, scan_root
from vision_tl.data.augment import resize_op
from vision_tl.data.decode import decode, pil_open
from vision_tl.data.resized import resized_copies
from vision_tl.data.scan import ImageScanner, read_bad_files
from vision_tl.training.build import build_data
from vision_tl.training.train import run_training


@pytest.mark.unit
def test_any_handle_opens_as_pillow_would_open_it() -> None:
    """JPEG bytes go to the JPEG plugin alone, but a stream that cannot seek, or a handle
    not at its start (Pillow reads from the start), is opened as Pillow opens it."""

    class Unseekable(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data, self.at = data, 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray) -> int:
            n = min(len(buffer), len(self.data) - self.at)
            buffer[:n] = self.data[self.at : self.at + n]
            self.at += n
            return n

    jpeg, png = io.BytesIO(), io.BytesIO()
    _draw(0, 1, 16).save(jpeg, "JPEG")
    _draw(1, 2, 16).save(png, "PNG")
    assert pil_open(io.BytesIO(jpeg.getvalue())).format == "JPEG"
    assert pil_open(Unseekable(jpeg.getvalue())).format == "JPEG"
    both = io.BytesIO(png.getvalue() + jpeg.getvalue())
    both.seek(len(png.getvalue()))
    assert pil_open(both).format == Image.open(io.BytesIO(both.getvalue())).format == "PNG"


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels in a few bytes: a decompression bomb."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(tag + data))
        return struct.pack(">I", len(data)) + tag + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def make_messy_folder(root: Path) -> tuple[set[str], dict[str, str]]:
    """train/val class folders holding every kind of odd-but-usable and unusable file.

    Returns the usable image paths and {unusable path: expected words in the reason}.
    """
    make_image_folder(root, classes=("cat", "dog"), per_class=4, size=32)
    cat = root / "train" / "cat"
    good = {str(p) for p in root.rglob("*.png")}

    def keep(path: Path) -> None:
        good.add(str(path))

    noisy = _draw(0, seed=99, size=64)
    odd = {
        "upper.JPG": lambda p: p.write_bytes(_jpeg_bytes(noisy)),
        "photo.jpeg": lambda p: noisy.save(p, format="JPEG"),
        "bitmap.bmp": lambda p: noisy.save(p),
        "web.webp": lambda p: noisy.save(p),
        "scan.tif": lambda p: noisy.save(p),
        "cmyk.jpg": lambda p: noisy.convert("CMYK").save(p),
        "deep.png": lambda p: Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(p),
        "palette.png": lambda p: noisy.convert("P").save(p, transparency=0),
        "gray_alpha.png": lambda p: noisy.convert("LA").save(p),
        "rgba.png": lambda p: noisy.convert("RGBA").save(p),
        "png_named.jpg": lambda p: noisy.save(p, format="PNG"),
    }
    for name, write in odd.items():
        write(cat / name)
        keep(cat / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    Image.new("RGB", (48, 24), (200, 30, 30)).save(cat / "rotated.jpg", exif=exif)
    keep(cat / "rotated.jpg")
    (cat / "nested" / "deeper").mkdir(parents=True)
    noisy.save(cat / "nested" / "deeper" / "inner.png")
    keep(cat / "nested" / "deeper" / "inner.png")

    bad = {
        str(cat / "truncated.jpg"): "truncated",
        str(cat / "header_cut.jpg"): "truncated",  # Pillow: "Truncated File Read"
        str(cat / "empty.png"): "empty file",
        str(cat / "notes.jpg"): "not an image",
        str(cat / "bomb.png"): "too large",
        str(cat / "garbage.png"): "not an image",
        str(cat / "phone.heic"): "unsupported format",
        str(root / "train" / "loose.png"): "not inside a class folder",
        str(root / "train" / "bird"): "empty class folder",
        str(root / "val" / "dog" / "cut.png"): "truncated",
    }
    full = _jpeg_bytes(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    )
    (cat / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (cat / "header_cut.jpg").write_bytes(full[:100])
    (cat / "empty.png").touch()
    (cat / "notes.jpg").write_text("<html>404 not found</html>")
    (cat / "bomb.png").write_bytes(_png_header(10_000, 10_000))
    (cat / "garbage.png").write_bytes(os.urandom(2000))
    (cat / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    noisy.save(root / "train" / "loose.png")
    (root / "train" / "bird").mkdir()
    buffer = io.BytesIO()
    noisy.save(buffer, format="PNG")
    (root / "val" / "dog" / "cut.png").write_bytes(buffer.getvalue()[:300])

    # Never images, never reported: macOS / Windows litter, hidden files, notes.
    (cat / ".DS_Store").write_bytes(os.urandom(64))
    (cat / "._cat_0.png").write_bytes(os.urandom(64))
    (cat / "Thumbs.db").write_bytes(os.urandom(64))
    noisy.save(cat / ".hidden.png")
    (cat / "readme.txt").write_text("photos from the field trip")
    (root / "train" / "__MACOSX").mkdir()
    (root / "train" / "__MACOSX" / "._x.png").write_bytes(b"x")
    return good, bad


def test_scan_sorts_every_kind_of_file_and_caches_verdicts(tmp_path: Path) -> None:
    good, bad = make_messy_folder(tmp_path / "data")
    scanner = ImageScanner(tmp_path / "scan.json")
    split = scan_root(tmp_path / "data", scanner=scanner)
    used = {p for samples in split.samples.values() for p, _ in samples}
    assert used == good
    assert split.class_names == ["cat", "dog"], "the empty class folder is not a class"
    reasons = {b.path: b.reason for b in split.bad}
    assert set(reasons) == set(bad)
    for path, words in bad.items():
        assert words in reasons[path], (path, reasons[path])
    assert "10000x10000" in reasons[str(tmp_path / "data" / "train" / "cat" / "bomb.png")]
    assert any(p.endswith(".DS_Store") for p in split.ignored)
    assert split.scan.notes["CMYK"] == 1 and split.scan.notes["EXIF-rotated"] == 1
    assert split.scan.notes["16-bit"] == 1 and split.scan.notes["palette+transparency"] == 1
    assert split.scan.notes["PNG content named .jpg"] == 1

    again = scan_root(tmp_path / "data", scanner=scanner)
    assert again.samples == split.samples and again.scan.cached == len(good) + 8
    rotated = load_rgb(tmp_path / "data" / "train" / "cat" / "rotated.jpg")
    assert rotated.size == (24, 48), "EXIF orientation is applied"


@pytest.mark.integration
def test_training_on_a_messy_folder_uses_every_good_image_and_lists_every_bad_one(
    compose_train, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "data"
    good, bad = make_messy_folder(root)
    # A file that passes the check, then breaks before training with the same size and
    # mtime (the scan cache still vouches for it): it must be skipped mid-epoch.
    build_data({"root": str(root), "num_workers": 0})
    victim = root / "train" / "dog" / "dog_1.png"
    stat = victim.stat()
    victim.write_bytes(os.urandom(stat.st_size))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    run_dir = tmp_path / "run"
    overrides = [*TINY, f"data.root={root}", "trainer.max_epochs=1", "data.batch_size=4"]
    with caplog.at_level(logging.INFO):
        metrics = run_training(compose_train([*overrides, "finetune=full"], run_dir))
    assert metrics["num_classes"] == 2 and metrics["epochs"] == 1

    split = pd.read_csv(run_dir / "split.csv")
    assert set(split.path) == good and len(split) == len(good)
    assert set(split.label) == {"cat", "dog"}
    listed = {b.path: b.reason for b in read_bad_files(run_dir / "bad_files.csv")}
    assert set(listed) == set(bad) | {str(victim)}
    assert all(listed[p] for p in listed)
    assert "failed during training" in listed[str(victim)]
    assert "10 unusable files skipped" in caplog.text and "3 truncated file" in caplog.text

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "data/class_counts" in events.Tags()["images"]
    assert "data/class_counts/text_summary" in events.Tags()["tensors"]


def test_bad_files_and_bad_inputs_give_one_line_errors(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_image_folder(root, classes=("a", "b"), per_class=2, size=16)
    (root / "train" / "a" / "broken.jpg").write_text("not a photo")
    with pytest.raises(ConfigError, match=r"^1 unusable files under .*broken\.jpg \(not an image"):
        build_data({"root": str(root), "on_bad_image": "fail", "num_workers": 0})
    with pytest.raises(ConfigError, match=r"^data\.on_bad_image=maybe: one of skip, fail$"):
        build_data({"root": str(root), "on_bad_image": "maybe"})

    manifest = tmp_path / "labels.csv"
    manifest.write_text("file,class\na.png,cat\n")
    with pytest.raises(ConfigError, match=r"needs columns path,label .*found: file, class"):
        build_data({"root": str(root), "manifest": str(manifest)})
    with pytest.raises(ConfigError, match=r"data.manifest=.*missing\.csv: an existing file"):
        build_data({"manifest": str(tmp_path / "missing.csv")})
    (tmp_path / "junk" / "x").mkdir(parents=True)
    (tmp_path / "junk" / "x" / "a.jpg").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no usable images in class subfolders .*empty file"):
        scan_root(tmp_path / "junk")


def test_manifest_labels_and_splits(tmp_path: Path) -> None:
    images = make_image_folder(tmp_path / "pool", classes=("x",), per_class=6, splits=(), size=16)
    rows = [f"x/x_{i}.png,{'cat' if i % 2 else 'dog'}" for i in range(6)]
    manifest = tmp_path / "pool" / "train.csv"
    manifest.write_text("path,label\n" + "\n".join([*rows, "x/gone.png,cat"]) + "\n")
    catalog = build_data({"manifest": str(manifest), "val_fraction": 0.34}).catalog
    frame = catalog.to_frame()
    assert catalog.class_names == ["cat", "dog"] and len(frame) == 6
    assert frame.split.value_counts().to_dict() == {"train": 4, "val": 2}
    assert [b.reason for b in catalog.bad] == ["listed in the manifest but not found"]

    with_split = tmp_path / "split.csv"
    with_split.write_text(
        "path,label,split\n"
        + "\n".join(f"{r},{'val' if i < 2 else 'train'}" for i, r in enumerate(rows))
    )
    catalog = build_data({"root": str(images), "manifest": str(with_split)}).catalog
    assert catalog.to_frame().split.value_counts().to_dict() == {"train": 4, "val": 2}


def test_weighted_sampler_balances_classes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    make_image_folder(root, classes=("rare",), per_class=2, splits=("train", "val"), size=16)
    make_image_folder(root, classes=("common",), per_class=18, splits=("train",), size=16)
    make_image_folder(root, classes=("common",), per_class=2, splits=("val",), size=16)
    counts = {}
    for sampler in ("shuffle", "weighted"):
        dm = datamodule(
            preprocess=Preprocess(16, 16),
            root=str(root),
            sampler=sampler,
            batch_size=20,
            num_workers=0,
        )
        torch.manual_seed(0)
        labels = torch.cat([y for _ in range(30) for _, y in dm.train_dataloader()])
        counts[sampler] = torch.bincount(labels, minlength=2).tolist()
    assert counts["shuffle"] == [18 * 30, 2 * 30]
    common, rare = counts["weighted"]
    assert abs(common - rare) < 0.15 * (common + rare), counts


def test_large_jpegs_decode_at_reduced_size(tmp_path: Path) -> None:
    photo = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 1200, 3), np.uint8)).save(photo)
    assert load_rgb(photo).size == (1200, 800)
    assert load_rgb(photo, min_side=256).size == (600, 400), "1/2 scale still covers 256"
    assert load_rgb(photo, min_side=90).size == (150, 100), "1/8 scale at most"
    assert load_rgb(photo, min_side=500).size == (1200, 800)


def test_resize_cache_makes_copies_once(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=3, size=120)
    keys = {"root": str(root), "resize_cache": True, "num_workers": 0, "batch_size": 4}
    dm = datamodule(preprocess=Preprocess(32, 40), **keys)
    copies = dm.reader().files
    assert len(copies) == 12 and all(Image.open(c).size == (40, 40) for c in copies.values())
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 32, 32)
    stamps = {c: os.stat(c).st_mtime_ns for c in copies.values()}
    again = datamodule(preprocess=Preprocess(32, 40), **keys)
    assert again.reader().files == copies
    assert {c: os.stat(c).st_mtime_ns for c in copies.values()} == stamps


def test_resize_cache_copy_is_the_shared_decode_and_resize(tmp_path: Path) -> None:
    """A copy holds what training would compute from the original, up to JPEG quality 95."""
    yy, xx = np.mgrid[0:120, 0:200]
    smooth = np.stack([xx * 255 // 199, yy * 255 // 119, (xx + yy) * 255 // 318], -1)
    photo = tmp_path / "wide.png"
    Image.fromarray(smooth.astype(np.uint8)).save(photo)
    pre = Preprocess(32, 40, "bicubic", background=(0, 0, 0))
    copy = resized_copies([str(photo)], pre, tmp_path / "cache")[str(photo)]
    expected = resize_op(pre)(pre.read(photo)).float()
    got = pre.read(copy).float()
    assert got.shape == expected.shape == (3, 40, 66)
    assert (got - expected).abs().mean() < 1.5
    other = Preprocess(32, 40, "nearest", background=(0, 0, 0))
    assert resized_copies([str(photo)], other, tmp_path / "cache")[str(photo)] != copy


def test_batches_are_normalised_after_transfer_like_the_float_pipeline(tmp_path: Path) -> None:
    import lightning as L
    from torchvision.transforms import v2

    root = tmp_path / "data"
    make_image_folder(root, classes=("a", "b"), per_class=3, size=48)
    for path in root.rglob("*.png"):  # JPEGs take torchvision's decoder
        Image.open(path).save(path.with_suffix(".jpg"), quality=90)
        path.unlink()
    pre = Preprocess(32, 40, "bicubic", (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    dm = datamodule(preprocess=pre, root=str(root), batch_size=6, num_workers=0, augment="none")
    x_uint8, y = next(iter(dm.val_dataloader()))
    assert x_uint8.dtype == torch.uint8
    dm.trainer = L.Trainer(accelerator="cpu", logger=False, precision="64-true")
    x, labels = dm.on_after_batch_transfer((x_uint8, y), 0)
    assert x.dtype == torch.float64, "the precision plugin's input dtype"
    float_pipeline = v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]
    )
    torch.testing.assert_close(x.float(), float_pipeline(x_uint8), atol=1e-5, rtol=0)
    assert torch.equal(labels, y)
    photo = next(root.rglob("*.jpg"))
    assert torch.equal(decode(photo), torch.from_numpy(np.array(load_rgb(photo))).permute(2, 0, 1))
