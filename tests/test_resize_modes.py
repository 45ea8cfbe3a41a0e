"""data.resize_mode=crop|squash|pad: squash and pad keep the whole of a 1.58:1 card inside
the input, the same way in training, eval, predict and export, and the checkpoint carries
the mode; the documents preset never mirrors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, compose_entry
from helpers.data import datamodule
from PIL import Image

from vision_tl.core.errors import ConfigError
from vision_tl.data import Preprocess
from vision_tl.data.augment import eval_transform, train_transform
from vision_tl.inference.checkpoint import load_checkpoint
from vision_tl.inference.export import run_export
from vision_tl.inference.predict import run_predict
from vision_tl.inference.predictor import ViewTransform
from vision_tl.training.train import run_training

RED, BLUE, GREEN, YELLOW, GREY = (230, 20, 20), (20, 20, 230), (20, 200, 20), (230, 230, 20), 128
WIDTH, HEIGHT, EDGE = 158, 100, 8  # an ID card's 1.58:1


def card() -> Image.Image:
    """A grey card whose four edges are coloured bands: red left, blue right, green top,
    yellow bottom (the corners belong to the left and right bands)."""
    pixels = np.full((HEIGHT, WIDTH, 3), GREY, np.uint8)
    pixels[:EDGE] = GREEN
    pixels[-EDGE:] = YELLOW
    pixels[:, :EDGE] = RED
    pixels[:, -EDGE:] = BLUE
    return Image.fromarray(pixels)


def card_folder(root: Path, per_class: int = 4) -> Path:
    for split in ("train", "val"):
        for name, turn in (("card", 0), ("flipped", 180)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                card().rotate(turn).save(folder / f"{name}_{i}.png")
    return root


def near(pixel: torch.Tensor, colour: tuple[int, int, int]) -> bool:
    return bool((pixel.int() - torch.tensor(colour)).abs().max() <= 40)


def assert_whole_card(view: torch.Tensor, mode: str) -> None:
    """(3, S, S) uint8: all four coloured edges are inside the input."""
    size = view.shape[-1]
    middle = size // 2
    assert near(view[:, middle, 0], RED) and near(view[:, middle, size - 1], BLUE), mode
    rows = [r for r in range(size) if not near(view[:, r, middle], (255, 255, 255))]
    top, bottom = rows[0], rows[-1]
    assert near(view[:, top, middle], GREEN) and near(view[:, bottom, middle], YELLOW), mode
    if mode == "pad":  # the card is centred, with background above and below
        height = round(size * HEIGHT / WIDTH)
        assert abs((bottom - top + 1) - height) <= 1 and abs(top - (size - height) // 2) <= 1
    else:
        assert (top, bottom) == (0, size - 1)


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


@pytest.mark.unit
@pytest.mark.parametrize("mode", ["squash", "pad"])
def test_whole_card_modes_keep_every_edge(mode: str) -> None:
    pre = Preprocess(input_size=64, resize_size=73, resize_mode=mode)
    assert_whole_card(eval_transform(pre)(as_tensor(card())), mode)
    # the training path without augmentation is the same view
    assert torch.equal(
        train_transform(pre, "none")(as_tensor(card())), eval_transform(pre)(as_tensor(card()))
    )


@pytest.mark.unit
def test_crop_cuts_the_card_and_bad_modes_are_refused() -> None:
    view = eval_transform(Preprocess(input_size=64, resize_size=64))(as_tensor(card()))
    assert not near(view[:, 32, 0], RED), "the centre crop loses the card's sides"
    with pytest.raises(ConfigError, match=r"data\.resize_mode=fit: one of crop, squash, pad"):
        Preprocess(resize_mode="fit")
    with pytest.raises(ConfigError, match=r"tta\.crops=5 cuts corners"):
        ViewTransform(Preprocess(resize_mode="pad"), crops=5)


@pytest.mark.unit
def test_documents_preset_never_mirrors() -> None:
    pre = Preprocess(input_size=64, resize_size=73, resize_mode="pad")
    transform = train_transform(pre, "documents")
    torch.manual_seed(0)
    columns = torch.arange(64.0)[None, :].expand(64, 64)
    for _ in range(20):
        r, g, b = transform(as_tensor(card())).int()
        red = (r > 150) & (g < 90) & (b < 90)
        blue = (b > 150) & (r < 90) & (g < 90)
        assert red.any() and blue.any(), "the whole card, both sides"
        assert columns[red].mean() + 30 < columns[blue].mean(), "red stays on the left"


@pytest.mark.slow  # out of the suite for its 10-minute budget; run with -m slow
def test_pad_mode_through_training_eval_predict_and_onnx_export(tmp_path: Path) -> None:
    root = card_folder(tmp_path / "data")
    data = datamodule(root=str(root), image_size=48, resize_mode="pad", num_workers=0)
    images, _ = next(iter(data.val_dataloader()))
    for view in images:
        assert_whole_card(view if view[0, 24, 0] > 128 else view.flip(1, 2), "pad")

    quiet = ["logger=none", "callbacks.learning_rate_monitor=null", "trainer.max_epochs=1"]
    train = [*TINY, *quiet, f"data.root={root}", "data.image_size=48", "data.resize_mode=pad"]
    train.append("data.augment=documents")
    run_training(compose_entry("train", train, tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    loaded = load_checkpoint(ckpt)
    assert loaded.preprocess.resize_mode == "pad", "the checkpoint carries the mode"

    # predict: exactly the model on the padded whole card
    single = tmp_path / "one"
    single.mkdir()
    card().save(single / "card.png")
    frame = run_predict(
        compose_entry(
            "predict", [f"ckpt_path={ckpt}", f"input={single}", "num_workers=0"], tmp_path / "p"
        )
    )
    view = ViewTransform(loaded.preprocess)(as_tensor(card()))
    assert_whole_card(view[0], "pad")
    mean = torch.tensor(loaded.preprocess.mean)[:, None, None]
    std = torch.tensor(loaded.preprocess.std)[:, None, None]
    with torch.no_grad():
        logits = loaded.model((view.float() / 255 - mean) / std)
    probs = (logits / loaded.temperature).softmax(1)[0]
    assert frame.iloc[0]["prob_card"] == pytest.approx(float(probs[0]), abs=1e-4)

    card_json = run_export(
        compose_entry("export", [f"ckpt_path={ckpt}", "format=onnx"], tmp_path / "onnx")
    )
    assert card_json["max_abs_diff"] < 1e-4
    written = json.loads((tmp_path / "onnx" / "model.json").read_text())
    assert written["resize_mode"] == "pad"
    assert "pad to input_size x input_size with background" in written["input"]["recipe"]
