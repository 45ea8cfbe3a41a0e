"""Image folders, splits, RGB decoding, preprocessing from the backbone, built-in data."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image

from vision_tl.core.errors import ConfigError
from vision_tl.data import (
    AUGMENTATIONS,
    DATASETS,
    Preprocess,
    eval_transform,
    load_rgb,
    normalize_batch,
    scan_root,
    stratified_split,
    train_transform,
)
from vision_tl.data.builtin import shapes
from vision_tl.data.decode import decode
from vision_tl.models import build_backbone
from vision_tl.training.build import build_data, preprocess_overrides


def test_split_is_deterministic_and_stratified(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "flat", classes=("a", "b"), per_class=10, splits=())
    first = scan_root(root, val_fraction=0.3, seed=1)
    again = scan_root(root, val_fraction=0.3, seed=1)
    other = scan_root(root, val_fraction=0.3, seed=2)
    assert first.samples == again.samples
    assert first.samples["val"] != other.samples["val"]
    assert first.class_counts("val") == [3, 3] and first.class_counts("train") == [7, 7]
    train, val = (set(p for p, _ in first.samples[s]) for s in ("train", "val"))
    assert not train & val and len(train | val) == 20


def test_split_keeps_a_training_image_per_class() -> None:
    train, val = stratified_split({"one": ["x.png"], "two": ["a.png", "b.png"]}, 0.5, seed=0)
    assert train == {"one": ["x.png"], "two": train["two"]} and len(val["two"]) == 1
    assert val["one"] == []
    with pytest.raises(ConfigError, match="val_fraction"):
        stratified_split({"a": ["x"]}, 1.5, seed=0)


def test_train_val_test_layout(image_folder: Path) -> None:
    split = scan_root(image_folder)
    assert split.class_names == ["cat", "dog", "fox"]
    assert {s: len(v) for s, v in split.samples.items()} == {"train": 24, "val": 24, "test": 24}
    frame = split.to_frame()
    assert list(frame.columns) == ["path", "label", "split"] and len(frame) == 72
    assert set(frame.label) == {"cat", "dog", "fox"}


def test_train_only_layout_is_split(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", splits=("train",), per_class=5)
    split = scan_root(root, val_fraction=0.2, seed=0)
    assert split.class_counts("val") == [1, 1, 1] and split.class_counts("train") == [4, 4, 4]


def test_bad_roots_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        scan_root(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no images"):
        scan_root(tmp_path / "empty")
    root = make_image_folder(tmp_path / "d", classes=("a", "b"), per_class=2)
    make_image_folder(tmp_path / "d", classes=("zebra",), per_class=1, splits=("val",))
    with pytest.raises(ConfigError, match=r"\['zebra'\] appear in val/ but not in train/"):
        scan_root(root)


def test_rgb_conversion_of_odd_modes(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.new("L", (4, 4), 77).save(gray)
    assert load_rgb(gray).getpixel((0, 0)) == (77, 77, 77)

    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(rgba)  # fully transparent
    assert load_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert load_rgb(rgba, background=(0, 0, 0)).getpixel((0, 0)) == (0, 0, 0)

    palette = tmp_path / "palette.png"
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    p.info["transparency"] = 0
    p.save(palette, transparency=0)
    assert load_rgb(palette).getpixel((0, 0)) == (200, 0, 0)

    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    assert load_rgb(deep).getpixel((0, 0)) == (255, 255, 255)

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(cmyk)
    r, g, b = load_rgb(cmyk).getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60


def test_preprocess_comes_from_the_weights() -> None:
    tv = build_backbone("resnet50", weights=None).preprocess  # metadata of DEFAULT weights
    assert (tv.input_size, tv.resize_size, tv.interpolation) == (224, 232, "bilinear")
    assert tv.mean == (0.485, 0.456, 0.406)
    eff = build_backbone("efficientnet_b0", weights=None).preprocess
    assert (eff.resize_size, eff.interpolation) == (256, "bicubic")
    lite = build_backbone("timm/tf_efficientnet_lite0", weights=None).preprocess
    assert lite == Preprocess(224, 256, "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_image_size_override_keeps_crop_ratio_rounded_as_timm_does() -> None:
    pre = Preprocess(224, 256).resolve({"image_size": 200})
    assert (pre.input_size, pre.resize_size) == (200, 228), "floor(200 / 0.875), as timm"
    assert Preprocess(224, 256).resolve({"image_size": 200, "resize_size": 200}).resize_size == 200
    assert Preprocess(224, 256).resolve({"image_size": 224}).resize_size == 256
    lite1 = build_backbone("timm/tf_efficientnet_lite1", weights=None).preprocess
    assert (lite1.input_size, lite1.resize_size) == (240, 272), "floor(240 / 0.882)"
    assert lite1.resolve({"image_size": 240}) == lite1, "the same rule on both paths"


def test_transforms_apply_size_and_normalisation() -> None:
    pre = Preprocess(24, 32, "bicubic", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    image = torch.tensor([255, 128, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 48, 64)
    out = eval_transform(pre)(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8
    expected = (torch.tensor([255, 128, 0]) / 255 - 0.5) / 0.25
    torch.testing.assert_close(normalize_batch(out[None], pre)[0, :, 12, 12], expected)
    with pytest.raises(
        ConfigError, match="unknown augment 'mixup'; available: documents, flip_crop"
    ):
        train_transform(pre, "mixup")


@pytest.mark.parametrize("preset", AUGMENTATIONS.names())
def test_every_augmentation_preset_makes_uint8_crops(preset: str) -> None:
    pre = Preprocess(24, 32, "bicubic")
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    outs = [train_transform(pre, preset)(image) for _ in range(4)]
    assert all(o.shape == (3, 24, 24) and o.dtype == torch.uint8 for o in outs)
    varies = any(not torch.equal(outs[0], o) for o in outs[1:])
    assert varies == AUGMENTATIONS.get(preset).random, "random presets differ per call"


def test_datamodule_batches_follow_the_model_preprocess(image_folder: Path) -> None:
    keys = {"root": str(image_folder), "batch_size": 4, "num_workers": 0, "image_size": 20}
    data = build_data(keys)
    lite = build_backbone("timm/tf_efficientnet_lite0", weights=None).preprocess
    pre = lite.resolve(preprocess_overrides(keys, data.source))
    assert pre.input_size == 20 and pre.interpolation == "bicubic" and pre.mean == (0.5,) * 3
    dm = data.datamodule(pre)
    assert dm.preprocess is pre, "the datamodule keeps the resolved object as it is"
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 20, 20) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert dm.has_test and next(iter(dm.test_dataloader()))[0].shape[-1] == 20


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.png")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.integration
def test_builtin_shapes_dataset_is_deterministic_and_generated_once(
    tmp_path: Path, session_cache: Path
) -> None:
    first = DATASETS.get("shapes").materialize(session_cache)  # generated once per session
    shapes(tmp_path / "again")
    assert _digest(first) == _digest(tmp_path / "again")
    split = scan_root(first)
    assert len(split.class_names) == 4 and set(split.samples) == {"train", "val", "test"}
    assert Image.open(split.samples["train"][0][0]).size == (64, 64)
    marker = first / ".complete"
    stamp = marker.stat().st_mtime_ns
    assert DATASETS.get("shapes").materialize(session_cache) == first
    assert marker.stat().st_mtime_ns == stamp


def _corner_marked(width: int, height: int) -> np.ndarray:
    """A grey image with a red block in its top-left corner: every rotation looks different."""
    pixels = np.full((height, width, 3), 90, np.uint8)
    pixels[: height // 4, : width // 4] = (250, 0, 0)
    return pixels


# EXIF orientation -> the turn a viewer applies (np.rot90 counts anticlockwise quarter turns).
QUARTER_TURNS = {3: 2, 6: -1, 8: 1}


@pytest.mark.parametrize("orientation", sorted(QUARTER_TURNS))
def test_exif_orientation_turns_an_asymmetric_image_the_right_way(
    tmp_path: Path, orientation: int
) -> None:
    stored = _corner_marked(40, 24)
    path = tmp_path / f"rotated{orientation}.jpg"
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=95)
    upright = np.rot90(stored, QUARTER_TURNS[orientation]).astype(int)
    for decoded in (decode(path).permute(1, 2, 0).numpy(), np.asarray(load_rgb(path))):
        assert decoded.shape == upright.shape, "width and height follow the orientation"
        error = np.abs(decoded.astype(int) - upright).mean()  # JPEG blurs the block's edge
        assert error < 6, "the red corner sits where a viewer shows it"


def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    levels = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16).repeat(4, 0)
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode.startswith("I")
    expected = np.array([0, 64, 128, 255])
    assert decode(path)[0, 0].tolist() == expected.tolist()
    assert [load_rgb(path).getpixel((x, 0))[0] for x in range(4)] == expected.tolist()


def test_palette_transparency_is_composited_on_the_background(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    indices = np.zeros((4, 4), np.uint8)
    indices[:, 2:] = 1  # left half: palette entry 0 (transparent); right half: red
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 255, 0, 200, 0, 0] + [0] * 762)  # entry 0 is green when opaque
    image.save(path, transparency=0)
    background = (10, 20, 30)
    as_pil = np.array(load_rgb(path, background=background))
    for decoded in (decode(path, background), torch.from_numpy(as_pil).permute(2, 0, 1)):
        assert decoded[:, 0, 0].tolist() == list(background), "transparent pixels show through"
        assert decoded[:, 0, 3].tolist() == [200, 0, 0]


def test_train_crops_are_random_regions_not_the_centre() -> None:
    pre = Preprocess(16, 18, "bilinear")
    ramp = torch.arange(64 * 64, dtype=torch.float32).view(1, 64, 64) / (64 * 64) * 255
    image = ramp.to(torch.uint8).expand(3, 64, 64).contiguous()
    centre = eval_transform(pre)(image)
    torch.manual_seed(0)
    crops = [train_transform(pre, "flip_crop", (0.2, 0.5))(image) for _ in range(8)]
    means = {round(c.float().mean().item()) for c in crops}
    assert len(means) >= 6, "each draw takes another region of the ramp"
    assert all(not torch.equal(c, centre) for c in crops)
