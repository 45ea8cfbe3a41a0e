"""The careful user's linear probe, as a whole process: the baseline `probe_scale.py` times.

    .venv/bin/python bench/careful_probe.py SPLIT_CSV --seed 42 [--workers 2] [--folds 5]

What a careful practitioner writes today, in about twenty lines of real work: timm's
EfficientNet-Lite0 with the shared weights and its own eval transform (`resolve_data_config`
+ `create_transform`: resize, centre crop, normalise), PIL decoding, a DataLoader with
workers, `inference_mode`, fp32; the eval-transform features of every image computed once;
then a linear head with AdamW (lr 1e-3, weight decay 0.01), batch 32, a constant LR. Its
number of epochs (up to 30) is chosen by 5-fold cross-validation on the training split
(mean held-out accuracy per epoch), and the head retrained on the whole training split
for that many epochs reports the val accuracy. For reference it also reports the best
val accuracy of any of the 30 epochs (picked on val: an optimistic figure).

SPLIT_CSV has columns path,label,split (vision_tl's split.csv), so both sides train and
validate on exactly the same images. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

START = time.perf_counter()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from sklearn.model_selection import StratifiedKFold  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

WEIGHTS = (
    Path(__file__).resolve().parents[2] / "shared/weights/tf_efficientnet_lite0.in1k.safetensors"
)
MAX_EPOCHS = 30


class Images(Dataset):
    def __init__(self, paths: list[str], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB"))


@torch.inference_mode()
def extract(paths: list[str], workers: int, weights: str) -> torch.Tensor:
    model = timm.create_model("tf_efficientnet_lite0", num_classes=0, pretrained=False)
    state = {k: v for k, v in load_file(weights).items() if not k.startswith("classifier")}
    model.load_state_dict(state)
    model.eval()
    config = timm.data.resolve_data_config({}, model=model)
    config.update(mean=(0.5,) * 3, std=(0.5,) * 3)  # these weights' own values
    transform = timm.data.create_transform(**config)
    loader = DataLoader(Images(paths, transform), batch_size=32, num_workers=workers)
    return torch.cat([model(x) for x in loader])


def train_head(x, y, epochs, classes, seed, evaluate=None) -> list[float]:
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    scores = []
    for _ in range(epochs):
        for batch in torch.randperm(len(y)).split(32):
            loss = F.cross_entropy(head(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if evaluate is not None:
            with torch.no_grad():
                scores.append(evaluate(head))
    return scores


def accuracy(x, y):
    return lambda head: float((head(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("split_csv")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--weights", default=str(WEIGHTS))
    args = parser.parse_args()
    split = pd.read_csv(args.split_csv)
    split = split[split["split"].isin(["train", "val"])].reset_index(drop=True)
    classes = sorted(split["label"].unique())
    labels = torch.tensor(split["label"].map({c: i for i, c in enumerate(classes)}).to_numpy())
    started = time.perf_counter()
    features = extract(split["path"].tolist(), args.workers, args.weights)
    extract_s = time.perf_counter() - started
    train = torch.tensor((split["split"] == "train").to_numpy())
    x, y = features[train], labels[train]
    x_val, y_val = features[~train], labels[~train]

    folds = StratifiedKFold(args.folds, shuffle=True, random_state=args.seed)
    curves = [
        train_head(x[fit], y[fit], MAX_EPOCHS, len(classes), args.seed, accuracy(x[held], y[held]))
        for fit, held in folds.split(np.zeros(len(y)), y.numpy())
    ]
    mean = np.mean(curves, axis=0)
    epochs = int(np.argmax(mean)) + 1
    val = train_head(x, y, MAX_EPOCHS, len(classes), args.seed, accuracy(x_val, y_val))
    print(
        json.dumps(
            {
                "val_acc": val[epochs - 1],  # the CV-chosen epoch of the same run
                "cv_epochs": epochs,
                "cv_holdout_acc": round(float(mean[epochs - 1]), 6),
                "best_epoch_on_val_acc": max(val),
                "images": len(split),
                "extract_s": round(extract_s, 2),
                "extract_images_per_s": round(len(split) / extract_s, 2),
                "process_s_after_imports": round(time.perf_counter() - START, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
