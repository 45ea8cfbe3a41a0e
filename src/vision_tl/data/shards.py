"""LitData shards of a catalog: one streaming dataset per split, written by
`python -m vision_tl.shard` and read by the `shards` source (`data.shards=DIR|s3://...`).

A shard set is a folder (local, shared, or an `s3://` prefix):

    meta.json            written last: the commit marker (classes, counts, the source's
                         fingerprint, how images were decoded)
    split.csv            every image and its split, as a folder run writes it
    bad_files.csv        what the scan refused, and why
    index/<split>.csv    row i: the source path, file, label and stored position of the
                         split's i-th image (`.npz`: the labels and positions a run reads)
    <split>/             LitData chunks + index.json of that split, in a seeded shuffled
                         order (every chunk mixes the classes; `position` in the index)

The split is the one a folder run draws (the same scan, `data.val_fraction`, `data.seed`),
so a shard run trains on exactly the folder run's images. A plain upright RGB (or
grayscale) JPEG keeps its bytes and decodes exactly as from the folder; anything else is
decoded as training decodes it (EXIF orientation, alpha on the background, CMYK, 16-bit),
downsized to `max_side` when larger, and stored re-encoded (JPEG for JPEG sources, PNG
for the rest). S3 is reached through boto3's own configuration (`AWS_ENDPOINT_URL` and the
credentials variables for an S3-compatible store).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vision_tl.core.errors import ConfigError
from vision_tl.core.io import read_regular, write_bytes
from vision_tl.core.runtime import available_cpus, environment
from vision_tl.data.decode import ReadLimits, load_rgb, open_image, plain_jpeg
from vision_tl.data.source import SPLITS, Catalog, Source

log = logging.getLogger(__name__)

SHARD_VERSION = 1
META = "meta.json"
# Samples per work item handed to a conversion worker.
ENCODE_BLOCK = 512
# A split whose conversion should take less than this is written in this process:
# LitData's worker processes take 0.1-0.2 s to start and stop on the 2-core CPU, longer
# than 2,000 plain JPEGs take to store here. Estimated from the scan's facts: a JPEG that
# keeps its bytes costs about KEPT_S (read and stored), any other image about ENCODED_S.
IN_PROCESS_S = 0.25
KEPT_S, ENCODED_S = 40e-6, 3e-3


def litdata() -> Any:
    """The `litdata` package, or a one-line error naming the extra that installs it."""
    try:
        import litdata as module
    except ImportError:
        raise ConfigError(
            'shards need LitData: pip install -e ".[scale]" (or pip install litdata)'
        ) from None
    return module


def is_remote(location: str) -> bool:
    return str(location).startswith("s3://")


def join(location: str, *names: str) -> str:
    return "/".join([str(location).rstrip("/"), *names])


class Place:
    """The small files of a shard set, on a local path or under an `s3://` prefix."""

    def __init__(self, location: str | Path) -> None:
        self.location = str(location)

    def _s3(self, name: str) -> tuple[Any, str, str]:
        import boto3

        bucket, _, prefix = self.location[len("s3://") :].partition("/")
        key = "/".join(p for p in (prefix.strip("/"), name) if p)
        return boto3.client("s3"), bucket, key

    def read(self, name: str) -> bytes | None:
        """The file's bytes, or None when it is not there."""
        if not is_remote(self.location):
            path = Path(self.location) / name
            return path.read_bytes() if path.is_file() else None
        client, bucket, key = self._s3(name)
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None
        except client.exceptions.NoSuchBucket:
            raise ConfigError(f"{self.location}: no such bucket") from None

    def write(self, name: str, data: bytes) -> None:
        if not is_remote(self.location):
            path = Path(self.location) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(path, data)
            return
        client, bucket, key = self._s3(name)
        client.put_object(Bucket=bucket, Key=key, Body=data)

    def remove_tree(self, name: str) -> None:
        """Remove a split's unfinished chunks (a conversion killed midway)."""
        if not is_remote(self.location):
            shutil.rmtree(Path(self.location) / name, ignore_errors=True)
            return
        client, bucket, key = self._s3(name)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/")
        for page in pages:
            objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if objects:
                client.delete_objects(Bucket=bucket, Delete={"Objects": objects})


def read_meta(location: str | Path) -> dict[str, Any]:
    """A complete shard set's `meta.json`; a one-line error when there is none."""
    data = Place(location).read(META)
    if data is None:
        raise ConfigError(
            f"data.shards={location}: no {META} there (not a shard set, or its conversion "
            "has not finished: run python -m vision_tl.shard again)"
        )
    meta = json.loads(data)
    if meta.get("version") != SHARD_VERSION:
        raise ConfigError(
            f"data.shards={location}: shard format {meta.get('version')}, this vision_tl reads "
            f"{SHARD_VERSION}: convert again"
        )
    return meta


@dataclass(frozen=True)
class ShardDecode:
    """How images that do not keep their bytes are stored: alpha composited on
    `background`, the longer side cut to `max_side` (None: kept), JPEG at `quality`."""

    background: tuple[int, int, int] = (255, 255, 255)
    max_side: int | None = None
    quality: int = 95


def encode_file(
    path: str, decode: ShardDecode, limits: ReadLimits, known: Sequence[int] = (0, 0, 0)
) -> bytes:
    """The bytes a shard stores for the image at `path` (see the module docstring).
    `known`: the scan's facts of the file (`ScanReport.facts`: size, mtime_ns, the longer
    side of a plain upright JPEG or 0). A plain JPEG that still has the size and mtime it
    was scanned with keeps its bytes without its header being read again."""
    data, info = read_regular(path, limits.max_file_bytes)  # the file is read once
    size, mtime, side = known
    if side and (info.st_size, info.st_mtime_ns) == (size, mtime) and fits(side, decode):
        return data
    with open_image(io.BytesIO(data), limits) as image:
        keep = plain_jpeg(image) and fits(max(image.size), decode)
        source_format = image.format
    if keep:
        return data
    rgb = load_rgb(io.BytesIO(data), decode.background, None, limits)
    if decode.max_side is not None and max(rgb.size) > decode.max_side:
        rgb.thumbnail((decode.max_side, decode.max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if source_format in ("JPEG", "MPO"):
        rgb.save(out, "JPEG", quality=decode.quality)
    else:
        rgb.save(out, "PNG")
    return out.getvalue()


def fits(side: Any, decode: ShardDecode) -> Any:
    """An image of longer side `side` is stored at its size (no `max_side`, or within it);
    element by element for an array of sides."""
    return decode.max_side is None or side <= decode.max_side


@dataclass(frozen=True)
class Encoder:
    """Sample `i` of one split as LitData stores it (picklable for its worker processes):
    the image's bytes, its label and its place in the split. A file that fails now (it
    passed the scan) is stored empty and refused, with its reason, when read."""

    files: Sequence[str]
    labels: Sequence[int]
    decode: ShardDecode
    limits: ReadLimits
    positions: Sequence[int]  # each sample's place in its split's catalog order
    facts: np.ndarray  # each file's `ScanReport.facts` row (zeros: not known)

    def __call__(self, block: tuple[int, int]) -> Iterator[dict[str, Any]]:
        """The samples `block[0]` to `block[1]` (exclusive): LitData hands its workers
        blocks, not single samples, which costs a queue message per block."""
        facts = self.facts[block[0] : block[1]].tolist()
        for index, known in zip(range(*block), facts, strict=True):
            yield self.sample(index, known)

    def estimate_s(self) -> float:
        """About how long encoding every sample takes in one process (`IN_PROCESS_S`)."""
        side = self.facts[:, 2]
        kept = int(np.count_nonzero((side > 0) & fits(side, self.decode)))
        return kept * KEPT_S + (len(self.files) - kept) * ENCODED_S

    def sample(self, index: int, known: Sequence[int] = (0, 0, 0)) -> dict[str, Any]:
        try:
            data = encode_file(self.files[index], self.decode, self.limits, known)
        except Exception as err:  # stored, then reported as a bad sample by the reader
            log.warning("%s: %s", self.files[index], err)
            data = b""
        return {
            "image": data,
            "label": int(self.labels[index]),
            "index": int(self.positions[index]),
        }


def shard_order(n: int, seed: int) -> np.ndarray:
    """The catalog positions in the order a split's shards store them: a seeded shuffle,
    so every chunk mixes the classes (a catalog lists them class by class) and streaming
    in chunk order draws mixed batches."""
    return np.random.default_rng(seed).permutation(n)


@dataclass(frozen=True)
class SplitLayout:
    """One split's files and labels in catalog order, what the scan learned of each file
    (`ScanReport.facts` rows), and the order its shards store them."""

    files: list[str]
    labels: list[int]
    facts: np.ndarray
    order: np.ndarray

    def encoder(self, stored: slice, decode: ShardDecode, limits: ReadLimits) -> Encoder:
        """The encoder of the stored samples `stored` (all, or a machine's part)."""
        rows = self.order[stored]
        order = rows.tolist()
        files, labels = [self.files[i] for i in order], [self.labels[i] for i in order]
        return Encoder(files, labels, decode, limits, order, self.facts[rows])

    def positions(self) -> np.ndarray:
        """Where each catalog image is stored: the order's inverse."""
        position = np.empty(len(self.order), np.int32)
        position[self.order] = np.arange(len(self.order), dtype=np.int32)
        return position


def split_layout(
    source: Source, catalog: Catalog, split: str, seed: int, scanned: Mapping[str, int]
) -> SplitLayout:
    """`split`'s files and labels, in catalog order, their scan facts (`scanned`: a file's
    row in `catalog.scan.facts`) and its stored order; a source without files cannot be
    sharded (a one-line error)."""
    files, labels = [], []
    for key, label in catalog.samples.get(split, []):
        path = source.file(key)
        if path is None:
            raise ConfigError(f"{source.describe()} has no files to shard")
        files.append(path)
        labels.append(label)
    facts = np.zeros((len(files), 3), np.int64)
    found = [(j, scanned[f]) for j, f in enumerate(files) if f in scanned]
    if found and catalog.scan is not None:
        into, rows = np.array(found, np.int64).T
        facts[into] = catalog.scan.facts[rows]
    return SplitLayout(files, labels, facts, shard_order(len(files), seed))


def scanned_rows(catalog: Catalog) -> dict[str, int]:
    """Each file the scan found good, and its row in `catalog.scan.facts` (built once for
    every split: a million paths take a few tenths of a second)."""
    report = catalog.scan
    if report is None or not len(report.facts):
        return {}
    return {path: i for i, path in enumerate(report.good)}


def write_split(
    place: Place,
    split: str,
    encoder: Encoder,
    workers: int,
    chunk_bytes: str,
) -> bool:
    """Convert one split into `<place>/<split>/` with LitData, in the encoder's order: in
    this process when one process is asked for or the work is small (`IN_PROCESS_S`),
    else in `workers` LitData worker processes (and always so into `s3://`, which LitData
    uploads as it goes). False when a finished conversion is there already."""
    ld = litdata()
    if place.read(f"{split}/index.json") is not None:
        log.info("Shards: %s already converted, kept", split)
        return False
    place.remove_tree(split)  # a conversion killed midway starts this split again
    out, n = join(place.location, split), len(encoder.files)
    if not is_remote(out) and (workers <= 1 or encoder.estimate_s() < IN_PROCESS_S):
        Path(out).mkdir(parents=True, exist_ok=True)
        cache = ld.streaming.Cache(out, chunk_bytes=chunk_bytes)  # what each worker writes with
        for index, sample in enumerate(encoder((0, n))):
            cache[index] = sample
        cache.done()
        cache.merge()
        return True
    with own_staging():
        ld.optimize(
            fn=encoder,
            inputs=[(i, min(i + ENCODE_BLOCK, n)) for i in range(0, n, ENCODE_BLOCK)],
            output_dir=out,
            chunk_bytes=chunk_bytes,
            num_workers=max(1, min(workers, -(-n // ENCODE_BLOCK))),
            reorder_files=False,
            keep_data_ordered=True,
            start_method="fork",
            verbose=False,
        )
    return True


@contextlib.contextmanager
def own_staging() -> Iterator[None]:
    """LitData's `optimize` stages chunks (before uploading them to `s3://`) in one folder
    per machine, `DATA_OPTIMIZER_CACHE_FOLDER` (else `<tmp>/chunks`), and empties it when
    it starts: a second conversion on the same machine (another part, another user) would
    delete the first one's chunks. The block stages in a folder of its own."""
    keys = ("DATA_OPTIMIZER_CACHE_FOLDER", "DATA_OPTIMIZER_DATA_CACHE_FOLDER")
    with (
        tempfile.TemporaryDirectory(prefix="vision_tl-shards-") as folder,
        environment({key: os.path.join(folder, key.lower()) for key in keys}),
    ):
        yield


def shard_meta(
    catalog: Catalog, fingerprint: str, decode: ShardDecode, describe: str
) -> dict[str, Any]:
    return {
        "version": SHARD_VERSION,
        "classes": catalog.class_names,
        "counts": {s: len(catalog.samples[s]) for s in SPLITS if catalog.samples.get(s)},
        "class_counts": {s: catalog.class_counts(s) for s in SPLITS if catalog.samples.get(s)},
        "fingerprint": fingerprint,
        "source": describe,
        "decode": asdict(decode),
    }


@dataclass(frozen=True)
class ShardSettings:
    """`shard.*`: where, how many processes, chunk size, decoding of re-encoded images,
    and the part of a conversion split over machines (`part` of `parts`, or `merge`)."""

    out: str
    workers: int = 1
    chunk_bytes: str = "64MB"
    decode: ShardDecode = ShardDecode()
    parts: int = 1
    part: int | None = None
    merge: bool = False
    seed: int = 0  # the order samples are stored in (`shard_order`)

    @classmethod
    def from_config(cls, cfg: Any) -> ShardSettings:
        """From `python -m vision_tl.shard`'s config: `shard.*`, and `data.background` and
        `data.seed` as a training run reads them."""
        node, data = cfg.shard, cfg.data
        return cls(
            out=node.out,
            workers=node.workers or available_cpus(),
            chunk_bytes=node.chunk_bytes,
            decode=ShardDecode(tuple(data.background), node.max_side, node.quality),
            parts=node.parts,
            part=node.part,
            merge=node.merge,
            seed=int(data.seed),
        )

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("shard.out is required: a folder, or s3://BUCKET/PREFIX")
        if self.parts < 1:
            raise ConfigError(f"shard.parts={self.parts}: at least 1")
        if self.part is not None and not 0 <= self.part < self.parts:
            raise ConfigError(f"shard.part={self.part}: one of 0..{self.parts - 1} (shard.parts)")
        if self.merge and self.parts < 2:
            raise ConfigError("shard.merge=true joins shard.parts >= 2 parts")


def _limits(source: Source) -> ReadLimits:
    """The read limits the source applies (`data.max_file_bytes`, `data.max_image_pixels`)."""
    limits = getattr(source, "limits", None)
    return limits if isinstance(limits, ReadLimits) else ReadLimits()


def _share(n: int, part: int, parts: int) -> slice:
    """The contiguous share of `n` stored samples that part `part` of `parts` converts."""
    return slice(n * part // parts, n * (part + 1) // parts)


def write_shards(
    source: Source, catalog: Catalog, settings: ShardSettings, fingerprint: str
) -> dict[str, Any]:
    """Convert `catalog` (as a run would train on it) into shards at `settings.out`: every
    split, or this machine's part of each, or the merge of the parts; the index, split and
    bad-file CSVs, then `meta.json` last. Finished splits (or parts) are kept when the
    command runs again after a kill. Returns what was written (`meta.json`'s content)."""
    import pandas as pd

    root = Place(settings.out)
    done = root.read(META)
    if done is not None:
        log.info("Shards: %s is complete already (%s there)", settings.out, META)
        return json.loads(done)
    splits = [s for s in SPLITS if catalog.samples.get(s)]
    scanned = scanned_rows(catalog)
    layouts = {s: split_layout(source, catalog, s, settings.seed, scanned) for s in splits}
    meta = shard_meta(catalog, fingerprint, settings.decode, source.describe())
    limits = _limits(source)
    if settings.part is not None:  # this machine's share, in parts/<part>/
        place = Place(join(settings.out, "parts", str(settings.part)))
        for split, layout in layouts.items():
            share = _share(len(layout.files), settings.part, settings.parts)
            encoder = layout.encoder(share, settings.decode, limits)
            write_split(place, split, encoder, settings.workers, settings.chunk_bytes)
        part = {**meta, "part": settings.part, "parts": settings.parts}
        place.write("part.json", json.dumps(part, indent=2).encode())
        log.info(
            "Shards: part %d of %d written to %s", settings.part, settings.parts, place.location
        )
        return part
    if settings.merge:
        _merge_parts(root, splits, meta, settings.parts)
    else:
        for split, layout in layouts.items():
            encoder = layout.encoder(slice(None), settings.decode, limits)
            write_split(root, split, encoder, settings.workers, settings.chunk_bytes)
    for split, layout in layouts.items():
        position = layout.positions()
        frame = pd.DataFrame({"path": [source.name_of(k) for k, _ in catalog.samples[split]],
                              "file": layout.files, "label": layout.labels,
                              "position": position})  # fmt: skip
        root.write(f"index/{split}.csv", frame.to_csv(index=False).encode())
        arrays = io.BytesIO()  # what a run reads: two int32 columns, not the paths
        np.savez(arrays, label=np.asarray(layout.labels, np.int32), position=position)
        root.write(f"index/{split}.npz", arrays.getvalue())
    root.write("split.csv", catalog.to_frame().to_csv(index=False).encode())
    bad = pd.DataFrame([(b.path, b.reason) for b in catalog.bad], columns=["path", "reason"])
    root.write("bad_files.csv", bad.to_csv(index=False).encode())
    root.write(META, json.dumps(meta, indent=2).encode())  # last: the set is complete
    log.info("Shards: %s written to %s", meta["counts"], settings.out)
    return meta


def _merge_parts(root: Place, splits: list[str], meta: dict[str, Any], parts: int) -> None:
    """Join `parts` machines' parts (each from the same scan and split) into `root`."""
    merge_datasets = litdata().merge_datasets
    dirs = [join(root.location, "parts", str(p)) for p in range(parts)]
    for part, location in enumerate(dirs):
        data = Place(location).read("part.json")
        if data is None:
            raise ConfigError(f"shard.merge: part {part} is not finished ({location}/part.json)")
        if json.loads(data)["fingerprint"] != meta["fingerprint"]:
            raise ConfigError(f"shard.merge: part {part} was converted from other data")
    for split in splits:
        if root.read(f"{split}/index.json") is not None:
            continue
        root.remove_tree(split)
        merge_datasets([join(d, split) for d in dirs], join(root.location, split))
