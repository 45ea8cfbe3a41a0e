"""`run_export(cfg)`: a model file plus `model.json`, the worker of `python -m vision_tl.export`:
inference then needs nothing from vision_tl.

The file maps a normalised NCHW float32 RGB batch to logits; `model.json` says how to
make that batch (class names, sizes, interpolation, mean, std) and what comes out. An
ensemble whose members need different preprocessing takes one such batch per member
(inputs `input0`, `input1`, ...; the same images, each prepared as its entry in
`model.json`'s `inputs` says), so every member sees exactly what it saw in training.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from vision_tl.core.engines import (
    ENGINES,
    Forward,
    Runner,
    engine_for_file,
    export_onnx,
    openvino_model,
    to_numpy,
)
from vision_tl.core.errors import ConfigError
from vision_tl.core.io import write_json
from vision_tl.core.logs import nncf_quiet, torchscript_deprecation_ignored
from vision_tl.core.validate import did_you_mean
from vision_tl.data.augment import as_batches, map_inputs, normalize_batch
from vision_tl.data.preprocess import AnyPreprocess, EnsemblePreprocess, Preprocess, per_member
from vision_tl.inference.checkpoint import LoadedModel, load_checkpoint
from vision_tl.inference.predictor import ImageFiles, ViewTransform, collate_views, collect_inputs

log = logging.getLogger(__name__)

FORMATS = {
    "onnx": "model.onnx",
    "torchscript": "model.pt",
    "openvino": "model.xml",
    "onnx_int8": "model.int8.onnx",
}
# What each format needs to run (model.json's `runtime`): the engine (auto: OpenVINO where
# installed, else ONNX Runtime), the precision it computes in, the packages.
RUNTIMES: dict[str, dict[str, Any]] = {
    "onnx": {"engine": "auto", "precision": "fp32", "packages": ["onnxruntime or openvino"]},
    "torchscript": {"engine": "torch", "precision": "fp32", "packages": ["torch"]},
    "openvino": {
        "engine": "openvino",
        "precision": "auto",
        "packages": ["openvino>=2025.1"],
        "note": "auto: bf16 where the CPU has it natively (AVX512-BF16, AMX), else f32",
    },
    "onnx_int8": {
        "engine": "auto",
        "precision": "int8",
        "packages": ["openvino or onnxruntime"],
        "note": "QDQ INT8 (NNCF post-training quantization); fast on CPUs with VNNI",
    },
}
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def example_input(input_size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A batch of normalised-looking random images (a batch of 2 keeps the batch axis free)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, input_size, input_size, generator=generator)


def input_names(pre: AnyPreprocess) -> list[str]:
    """`input`, or `input0`, `input1`, ... for an ensemble with per-member preprocessing."""
    if isinstance(pre, EnsemblePreprocess):
        return [f"{INPUT_NAME}{i}" for i in range(len(pre.members))]
    return [INPUT_NAME]


def example_inputs(pre: AnyPreprocess, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One example batch per model input, each at its input's size."""
    sizes = [p.input_size for p in per_member(pre, len(input_names(pre)))]
    return tuple(example_input(size, batch, seed + i) for i, size in enumerate(sizes))


def exportable(model: nn.Module, pre: AnyPreprocess) -> Forward:
    """The model with one positional input per model input, as exporters trace it."""
    return Forward(model).eval()


def export_torchscript(model: nn.Module, x: tuple[torch.Tensor, ...], path: Path) -> None:
    """Trace to TorchScript (deprecated upstream, but loadable from C++ and plain torch)."""
    with torchscript_deprecation_ignored():
        traced = torch.jit.trace(model, x)
        torch.jit.save(traced, str(path))


def export_openvino(model: Forward, x: tuple[torch.Tensor, ...], path: Path) -> None:
    """OpenVINO IR (`model.xml` + `model.bin`, float32 weights: the runtime picks bf16
    where the CPU has it)."""
    import openvino as ov

    ov.save_model(openvino_model(model, x), str(path), compress_to_fp16=False)


def image_batches(
    files: Sequence[Path], pre: AnyPreprocess, batch_size: int = 8
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Normalised eval-transform batches of `files` (one tensor per model input), decoded
    as `predict` decodes them; unreadable files are skipped."""
    images = ImageFiles(files, pre, ViewTransform(pre))
    loader = DataLoader(images, batch_size=batch_size, collate_fn=collate_views)
    for views, _, _ in loader:
        if views is not None:
            flat = map_inputs(lambda t: t.flatten(0, 1), views)
            yield as_batches(normalize_batch(flat, pre))


def quantize_onnx(source: Path, target: Path, batches: list[tuple[torch.Tensor, ...]]) -> None:
    """Post-training INT8 quantization (NNCF, QDQ nodes) of an ONNX file, calibrated on
    `batches`: weights per channel, activations from the calibration statistics."""
    import nncf
    import onnx

    model = onnx.load(str(source))
    names = [i.name for i in model.graph.input]
    feeds = [dict(zip(names, to_numpy(b), strict=True)) for b in batches]
    with nncf_quiet():
        quantized = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds))
    onnx.save(quantized, str(target))


def max_abs_difference(model: nn.Module, runner: Runner, pre: AnyPreprocess) -> float:
    """Largest |exported - PyTorch| logit on a batch of another size than the traced one."""
    x = example_inputs(pre, batch=3, seed=1)
    with torch.no_grad():
        expected = exportable(model, pre)(*x)
    return float((runner(*x) - expected).abs().max())


def labelled(files: Sequence[Path], names: Sequence[str], classes: Sequence[str]) -> list[int]:
    """Each file's class from its folder's name (`val/ants/1.jpg` is `ants`); -1 when the
    folder is not a class."""
    place = {c: i for i, c in enumerate(classes)}
    return [place.get(Path(n).parent.name, -1) for n in names]


def agreement(
    model: nn.Module,
    runner: Runner,
    pre: AnyPreprocess,
    files: Sequence[Path],
    labels: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Top-1 agreement of the exported model with PyTorch (float32) on real images, and
    each one's accuracy where the images' labels are known."""
    reference = Forward(model).eval()
    ours, theirs = [], []
    for x in image_batches(files, pre):
        with torch.no_grad():
            theirs.append(reference(*x).argmax(1))
        ours.append(runner(*x).argmax(1))
    a, b = torch.cat(ours), torch.cat(theirs)
    report: dict[str, Any] = {
        "images": len(a),
        "top1_agreement": round(float((a == b).float().mean()), 4),
    }
    if labels is not None and len(labels) == len(a) and min(labels, default=-1) >= 0:
        target = torch.tensor(list(labels))
        report["acc_exported"] = round(float((a == target).float().mean()), 4)
        report["acc_pytorch_fp32"] = round(float((b == target).float().mean()), 4)
    return report


RECIPES = {  # by `Preprocess.resize_mode`
    "crop": "resize the shorter side to resize_size (interpolation, antialias), centre-crop "
    "input_size",
    "squash": "resize the whole image to input_size x input_size (interpolation, antialias)",
    "pad": "resize the longer side to input_size (interpolation, antialias), pad to "
    "input_size x input_size with background, the image centred",
}
NORMALISE = ", scale to [0, 1], subtract mean, divide by std"


def _input_card(name: str, pre: Preprocess) -> dict[str, Any]:
    return {
        "name": name,
        "shape": ["batch", 3, pre.input_size, pre.input_size],
        "dtype": "float32",
        "layout": "NCHW, RGB",
        "recipe": RECIPES[pre.resize_mode] + NORMALISE,
    }


def model_card(loaded: LoadedModel, fmt: str, file: str, opset: int | None) -> dict[str, Any]:
    """What an inference program needs besides the model file: one `input` and the
    preprocessing at the top level, or for an ensemble with per-member preprocessing an
    `inputs` list, each entry with its member and its own preprocessing."""
    pre = loaded.preprocess
    if isinstance(pre, EnsemblePreprocess):
        members = [b.name for b in loaded.model.backbones()]
        names = input_names(pre)
        inputs = {
            "inputs": [
                {**_input_card(n, p), "member": m, **p.to_dict()}
                for n, p, m in zip(names, pre.members, members, strict=True)
            ],
            "note": "feed every input the same images (same order), each prepared by its "
            "own entry; the batch size is shared",
        }
    else:
        inputs = {**pre.to_dict(), "input": _input_card(INPUT_NAME, pre)}
    return {
        "format": fmt,
        "file": file,
        "opset": opset,
        "class_names": loaded.class_names,
        "num_classes": len(loaded.class_names),
        **inputs,
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(loaded.class_names)]},
        "softmax": "not applied: divide the logits by temperature, then apply softmax over "
        "the class axis for calibrated probabilities",
        "temperature": loaded.temperature,
        # Fitted on val after training: predict applies them to this file's logits.
        "open_set": loaded.open_set.card() if loaded.open_set is not None else None,
        "operating_point": loaded.operating_point.as_dict() if loaded.operating_point else None,
        "runtime": RUNTIMES[fmt],
        "checkpoint": str(loaded.path),
    }


def calibration_files(cfg: DictConfig) -> list[Path]:
    """`calibration.input`'s images (training images: a folder, file or CSV as predict's
    `input`), `calibration.size` of them drawn with a fixed seed."""
    source = (cfg.get("calibration") or {}).get("input")
    if not source:
        raise ConfigError(
            "format=onnx_int8 needs calibration.input=DIR: a few hundred training images"
        )
    files = collect_inputs(source).files
    size = int((cfg.get("calibration") or {}).get("size") or 300)
    return sorted(random.Random(0).sample(files, min(size, len(files))))


def write_model(
    fmt: str, model: nn.Module, pre: AnyPreprocess, path: Path, cfg: DictConfig
) -> int | None:
    """Write `model` in `fmt` at `path`; returns the ONNX opset (None for other formats)."""
    x, names = example_inputs(pre), input_names(pre)
    if fmt == "torchscript":
        export_torchscript(exportable(model, pre), x, path)
        return None
    if fmt == "openvino":
        export_openvino(exportable(model, pre), x, path)
        return None
    if fmt == "onnx":
        return export_onnx(exportable(model, pre), x, path, cfg.get("opset"), names, OUTPUT_NAME)
    files = calibration_files(cfg)
    fp32 = path.with_name("model.fp32.tmp.onnx")
    try:
        opset = export_onnx(exportable(model, pre), x, fp32, cfg.get("opset"), names, OUTPUT_NAME)
        batches = list(image_batches(files, pre))
        if not batches:
            raise ConfigError(f"calibration.input: none of the {len(files)} images could be read")
        log.info("Quantizing to INT8, calibrated on %d images", sum(len(b[0]) for b in batches))
        quantize_onnx(fp32, path, batches)
    finally:
        fp32.unlink(missing_ok=True)
    return opset


def verify(card: dict[str, Any], loaded: LoadedModel, runner: Runner, cfg: DictConfig) -> None:
    """The parity report in `card`: max_abs_diff to PyTorch (float formats), and on real
    images (`verify_input`, else the calibration images) top-1 agreement and, for a
    folder whose subfolders are class names, each one's accuracy."""
    fmt, model, pre = card["format"], loaded.model, loaded.preprocess
    if fmt != "onnx_int8":
        diff = max_abs_difference(model, runner, pre)
        card["max_abs_diff"] = diff
        if diff > float(cfg.tolerance):
            log.warning("exported logits differ from PyTorch by up to %.2e", diff)
    source = cfg.get("verify_input")
    if source:
        inputs = collect_inputs(source)
        labels = labelled(inputs.files, inputs.names, loaded.class_names)
        card["parity"] = agreement(model, runner, pre, inputs.files, labels)
    elif fmt == "onnx_int8":
        card["parity"] = agreement(model, runner, pre, calibration_files(cfg))
    if "parity" in card:
        log.info("Parity with PyTorch (float32): %s", card["parity"])


def run_export(cfg: DictConfig) -> dict[str, Any]:
    """Write the model file and `model.json` into the run dir; check the file's outputs."""
    fmt = str(cfg.format)
    if fmt not in FORMATS:
        raise ConfigError(
            f"format={fmt}: one of {', '.join(FORMATS)}{did_you_mean(fmt, list(FORMATS))}"
        )
    needs = RUNTIMES[fmt]["engine"]
    if needs != "auto" and not ENGINES.get(needs).installed():
        raise ConfigError(f"format={fmt} needs the {needs} package (pip install {needs})")
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_checkpoint(cfg.get("ckpt_path"))
    model = loaded.model.cpu().eval()
    path = out / FORMATS[fmt]
    opset = write_model(fmt, model, loaded.preprocess, path, cfg)
    card = model_card(loaded, fmt, path.name, opset)
    if cfg.get("verify", True):
        engine = engine_for_file(path, card["runtime"]["engine"])
        precision = "fp32" if fmt != "onnx_int8" else card["runtime"]["precision"]
        verify(card, loaded, engine.load(path, precision), cfg)
    write_json(out / "model.json", card)
    log.info("Wrote %s and %s", path, out / "model.json")
    return card
