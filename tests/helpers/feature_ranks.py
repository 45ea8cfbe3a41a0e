"""One rank of a feature-cache build shared by a job's ranks (tests/test_features.py).

    python feature_ranks.py RANK WORLD PORT IMAGES CACHE OUT

joins a Gloo group of WORLD processes on 127.0.0.1:PORT, builds the cache entry of every
image under IMAGES (3 augmented views, seed 7) into CACHE, the first 4 images' first view
lent by an entry built before it (as a views decision's subset lends its rows), and writes
how many images its backbone ran on and where the entry is to OUT/rank<RANK>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from vision_tl.data.augment import train_transform
from vision_tl.data.dataset import ImageListDataset
from vision_tl.data.features import load_or_build
from vision_tl.data.preprocess import Preprocess

VIEWS, SEED, LENT = 3, 7, 4


class CountingPixels(torch.nn.Module):
    """A backbone whose features are its input, counting the images it sees (per process:
    the cache runs a copy of it)."""

    seen = 0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        CountingPixels.seen += x.shape[0]
        return x.flatten(1)


def build(images_dir: Path, cache: Path) -> tuple[str, int]:
    pre = Preprocess(input_size=16, resize_size=18)
    files = sorted(str(p) for p in images_dir.rglob("*.png"))
    transform = train_transform(pre, "flip_crop")
    images = ImageListDataset([(f, 0) for f in files], pre.read, transform)
    cpu = torch.device("cpu")
    subset = ImageListDataset([(f, 0) for f in files[:LENT]], pre.read, transform)
    lent, _ = load_or_build(
        cache, {"views": 1}, CountingPixels(), subset, pre, 1, cpu, 4, 0, seed=SEED,
        seed_at=range(LENT),
    )  # fmt: skip
    store, _ = load_or_build(
        cache, {"views": VIEWS}, CountingPixels(), images, pre, VIEWS, cpu, 4, 0, seed=SEED,
        reuse=lent,
    )  # fmt: skip
    return str(store.data_file), CountingPixels.seen


def main() -> None:
    rank, world, port = (int(a) for a in sys.argv[1:4])
    images_dir, cache, out = (Path(a) for a in sys.argv[4:7])
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    data_file, seen = build(images_dir, cache)
    (out / f"rank{rank}.json").write_text(json.dumps({"data_file": data_file, "seen": seen}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
