"""Shards against the folder they were made from, at 10k, 100k and 1M samples (issue 31).

For each size: a folder of tiny JPEGs (hard links to one 32x32 image per class: the same
number of paths, files and decodes as a real folder, without 1M inodes), then

- `scan_s`: one cold pre-flight scan (empty verdict cache), and `shard_s`: the whole
  `vision_tl.shard` conversion (its own cold scan included), side by side, each the mean
  of `--rounds` rounds of four runs in the order scan, shard, shard, scan;
- start-up to the first training batch in a fresh process (imports included), from the
  folder (verdicts cached: a rerun) and from the shards, with the process's peak RSS,
  loader workers included;
- loader throughput over the first `--batches` batches, the same decode and transforms.
  The folder's paths are hard links to a few files the page cache always holds, so the
  shards' chunk files are read once before they are timed: both sides read from memory
  (`--cold` skips it; a cold 1M set read at 0.68-0.84x the hot folder).

`--ab N` times reads by index against the folder at a size already built under --work
(its shards and the folder's scan cache), in two rounds of alternating order.

    python bench/shards.py --sizes 10000 100000 1000000 --work /tmp/shard_bench
    python bench/shards.py --sizes --ab 1000000 --batches 200
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import emit

CLASSES = 10
# Both sides load alike: the same workers, batch and 32 px transforms.
LOADING = {"num_workers": 2, "batch_size": 64, "image_size": 32}

FIRST_BATCH = r"""
import json, os, sys, time, threading, builtins
start = time.time()
LATENCY = float(sys.argv[3]) / 1000
if LATENCY:  # every open of an image or chunk file waits, as a remote file system would
    _open, _os_open = builtins.open, os.open
    def slow(path):
        if str(path).endswith((".jpg", ".bin")):
            time.sleep(LATENCY)
    def patched_open(file, *a, **k):
        slow(file); return _open(file, *a, **k)
    def patched_os_open(path, *a, **k):
        slow(path); return _os_open(path, *a, **k)
    builtins.open, os.open = patched_open, patched_os_open
import psutil
from vision_tl.training.build import build_data
from vision_tl.data.preprocess import Preprocess
peak = 0
def sample():
    global peak
    me = psutil.Process()
    while True:
        try:
            rss = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(True))
        except psutil.Error:
            continue
        peak = max(peak, rss)
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
keys = json.loads(sys.argv[1])
data = build_data(keys)
dm = data.datamodule(Preprocess(input_size=32, resize_size=36))
loader = dm.train_dataloader()
it = iter(loader)
next(it)
first = time.time() - start
t = time.time(); n = 0
for _ in range(int(sys.argv[2])):
    x, y = next(it); n += len(y)
rate = n / (time.time() - t)
time.sleep(0.2)
print(json.dumps({"first_batch_s": round(first, 2), "images_per_s": round(rate, 1),
                  "peak_rss_mb": round(peak / 2**20, 1)}))
"""


def make_folder(root: Path, n: int) -> Path:
    """`n` paths in `CLASSES` class folders, hard links to one JPEG per class (a new copy
    every 60,000 links: ext4 allows 65,000 links to a file)."""
    from PIL import Image

    if (root / "done").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    for c in range(CLASSES):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        source = folder / "img0.jpg"
        Image.new("RGB", (32, 32), (25 * c, 255 - 25 * c, 128)).save(source, quality=90)
        for i in range(1, n // CLASSES):
            if i % 60_000 == 0:
                shutil.copy(folder / "img0.jpg", folder / f"img{i}.jpg")
                source = folder / f"img{i}.jpg"
                continue
            os.link(source, folder / f"img{i}.jpg")
    (root / "done").write_text("")
    return root


def first_batch(keys: dict, batches: int, latency_ms: float = 0.0) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", FIRST_BATCH, json.dumps(keys), str(batches), str(latency_ms)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm(out: Path, cold: bool = False) -> None:
    """Read every chunk file of the shards at `out` once (unless `cold`): see the docstring."""
    if cold:
        return
    for chunk in sorted(out.glob("*/*.bin")):
        with open(chunk, "rb") as handle:
            while handle.read(1 << 24):
                pass


def alternate(args: argparse.Namespace, n: int) -> dict:
    """Reads by index from the shards against the folder loader at `n` samples, in the
    order shards, folder, folder, shards."""
    caches = args.work / f"cache_{n}"
    sides = {
        "folder": {"root": str(args.work / f"folder_{n}"), "cache": str(caches / "scan")},
        "shards": {"shards": str(args.work / f"shards_{n}"), "cache": str(caches / "read")},
    }
    warm(args.work / f"shards_{n}", args.cold)
    runs: dict[str, list[dict]] = {"folder": [], "shards": []}
    for side in ("shards", "folder", "folder", "shards"):
        runs[side].append(first_batch({**sides[side], **LOADING}, args.batches))
    rates = {side: [r["images_per_s"] for r in rows] for side, rows in runs.items()}
    row = {
        "samples": n,
        "ab": runs,
        "throughput_ratio": round(sum(rates["shards"]) / sum(rates["folder"]), 3),
    }
    print(json.dumps(row), flush=True)
    return row


def shards_only(args: argparse.Namespace, n: int) -> dict:
    """Shards of `n` samples written from the folder's listing (a seeded val split, no
    scan), then start-up, memory and throughput from them."""
    from vision_tl.core.runtime import available_cpus
    from vision_tl.data.shards import ShardSettings, write_shards
    from vision_tl.data.source import Catalog
    from vision_tl.data.sources import FolderSource

    folder = make_folder(args.work / f"folder_{n}", n)
    out = args.work / f"shards_{n}"
    start = time.perf_counter()
    if not (out / "meta.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        names = [f"class{c}" for c in range(CLASSES)]
        train = [
            (str(folder / name / f"img{i}.jpg"), c)
            for c, name in enumerate(names)
            for i in range(n // CLASSES)
        ]
        catalog = Catalog(names, {"train": train}).with_val(0.2, 42)
        settings = ShardSettings(str(out), workers=available_cpus())
        write_shards(FolderSource(folder), catalog, settings, "bench")
    convert_s = time.perf_counter() - start
    keys = {"shards": str(out), "cache": str(args.work / f"cache_{n}" / "read"), **LOADING}
    warm(out, args.cold)
    row = {
        "samples": n,
        "convert_s_without_scan": round(convert_s, 2),
        "shards": first_batch(keys, args.batches),
        "stream": first_batch({**keys, "stream": True}, args.batches),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/shard_bench"))
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument(
        "--rounds", type=int, default=1, help="scan/shard rounds (each: scan, shard, shard, scan)"
    )
    parser.add_argument("--latency-ms", type=float, default=5.0)
    parser.add_argument(
        "--shards-only",
        type=int,
        nargs="*",
        default=[],
        help="sizes measured from shards alone: written from the folder's listing without "
        "the scan (a 1M scan takes 15 minutes here), no folder run beside them",
    )
    parser.add_argument("--ab", type=int, nargs="*", default=[], help="see the docstring")
    parser.add_argument("--cold", action="store_true", help="time the shards cold")
    args = parser.parse_args()
    from vision_tl.core.cli import freeze_startup
    from vision_tl.core.runtime import available_cpus
    from vision_tl.data.shards import ShardSettings
    from vision_tl.training.build import build_data, shard_data

    freeze_startup()  # as every command does before its work: both sides alike
    results = []
    for n in args.sizes:
        folder = make_folder(args.work / f"folder_{n}", n)
        caches = args.work / f"cache_{n}"
        out = args.work / f"shards_{n}"

        def scan(cache: str, folder: Path = folder, caches: Path = caches) -> float:
            shutil.rmtree(caches / cache, ignore_errors=True)
            start = time.perf_counter()
            build_data({"root": str(folder), "cache": str(caches / cache)})
            return time.perf_counter() - start

        def shard(folder: Path = folder, caches: Path = caches, out: Path = out) -> float:
            shutil.rmtree(caches / "shard", ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            settings = ShardSettings(str(out), workers=available_cpus())
            start = time.perf_counter()
            # what `vision_tl.shard` runs: the scan, the fingerprint, the conversion
            shard_data({"root": str(folder), "cache": str(caches / "shard")}, settings)
            return time.perf_counter() - start

        # scan, shard, shard, scan, ...: a slow spell of this shared machine hits both alike
        scans, shards = [], []
        for _ in range(args.rounds):
            scans.append(scan("scan"))
            shards.extend([shard(), shard()])
            scans.append(scan("scan"))
        scan_s, shard_s = sum(scans) / len(scans), sum(shards) / len(shards)
        folder_keys = {"root": str(folder), "cache": str(caches / "scan"), **LOADING}
        folder_run = first_batch(folder_keys, args.batches)
        shard_keys = {"shards": str(out), "cache": str(caches / "read"), **LOADING}
        warm(out, args.cold)
        shard_run = first_batch(shard_keys, args.batches)
        stream_run = first_batch({**shard_keys, "stream": True}, args.batches)
        slow_folder = first_batch(folder_keys, args.batches // 4, args.latency_ms)
        slow_stream = first_batch(
            {**shard_keys, "stream": True}, args.batches // 4, args.latency_ms
        )
        row = {
            "samples": n,
            "scan_s": round(scan_s, 2),
            "shard_s": round(shard_s, 2),
            "scan_runs_s": [round(x, 2) for x in scans],
            "shard_runs_s": [round(x, 2) for x in shards],
            "shard_over_scan": round(shard_s / scan_s, 3),
            "folder": folder_run,
            "shards": shard_run,
            "stream": stream_run,
            "throughput_ratio": round(shard_run["images_per_s"] / folder_run["images_per_s"], 3),
            "stream_throughput_ratio": round(
                stream_run["images_per_s"] / folder_run["images_per_s"], 3
            ),
            f"latency_{args.latency_ms:g}ms": {
                "folder_images_per_s": slow_folder["images_per_s"],
                "stream_images_per_s": slow_stream["images_per_s"],
                "ratio": round(slow_stream["images_per_s"] / slow_folder["images_per_s"], 3),
            },
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    for n in args.shards_only:
        results.append(shards_only(args, n))
    summary: dict = {"rows": results, "ab": [alternate(args, n) for n in args.ab]}
    if results:
        base = results[0]["shards"]["peak_rss_mb"]
        summary["shard_rss_growth"] = {
            r["samples"]: round(r["shards"]["peak_rss_mb"] / base - 1, 4) for r in results
        }
    emit("shards", summary)


if __name__ == "__main__":
    main()
