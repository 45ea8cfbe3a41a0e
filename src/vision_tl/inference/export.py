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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from vision_tl.core.errors import ConfigError
from vision_tl.core.io import write_json
from vision_tl.core.logs import onnx_export_quiet, torchscript_deprecation_ignored
from vision_tl.core.validate import did_you_mean
from vision_tl.data.preprocess import AnyPreprocess, EnsemblePreprocess, Preprocess, per_member
from vision_tl.inference.checkpoint import LoadedModel, load_checkpoint

log = logging.getLogger(__name__)

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}
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


class PerMemberInputs(nn.Module):
    """The ensemble with one positional input per member, as exporters trace it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(list(inputs))


def exportable(model: nn.Module, pre: AnyPreprocess) -> nn.Module:
    return PerMemberInputs(model).eval() if isinstance(pre, EnsemblePreprocess) else model


def export_onnx(
    model: nn.Module,
    x: torch.Tensor | tuple[torch.Tensor, ...],
    path: Path,
    opset: int | None = None,
    names: list[str] | None = None,
) -> int:
    """Export with the dynamo exporter, batch axis dynamic (one batch size for every
    input), weights inside the file.

    Returns the opset the file declares.
    """
    import onnx

    inputs = x if isinstance(x, tuple) else (x,)
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} for _ in inputs)
    if isinstance(model, PerMemberInputs):  # one `*inputs` argument holds every input
        dynamic = (dynamic,)
    with onnx_export_quiet():
        torch.onnx.export(
            model,
            inputs,
            path,
            input_names=names or [INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_shapes=dynamic,
            external_data=False,
            verbose=False,
        )
    graph = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))


def export_torchscript(
    model: nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...], path: Path
) -> None:
    """Trace to TorchScript (deprecated upstream, but loadable from C++ and plain torch)."""
    with torchscript_deprecation_ignored():
        traced = torch.jit.trace(model, x)
        torch.jit.save(traced, str(path))


def run_file(
    path: Path, fmt: str, x: torch.Tensor | tuple[torch.Tensor, ...], names: list[str] | None = None
) -> np.ndarray:
    """Logits of the exported file, through onnxruntime or `torch.jit.load`."""
    inputs = x if isinstance(x, tuple) else (x,)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {n: t.numpy() for n, t in zip(names or [INPUT_NAME], inputs, strict=True)}
        return session.run([OUTPUT_NAME], feed)[0]
    with torchscript_deprecation_ignored():
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(*inputs).numpy()


def max_abs_difference(model: nn.Module, path: Path, fmt: str, pre: AnyPreprocess) -> float:
    """Largest |exported - PyTorch| logit on a batch of another size than the traced one."""
    x = example_inputs(pre, batch=3, seed=1)
    with torch.no_grad():
        expected = exportable(model, pre)(*x).numpy()
    return float(np.abs(run_file(path, fmt, x, input_names(pre)) - expected).max())


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
        "checkpoint": str(loaded.path),
    }


def run_export(cfg: DictConfig) -> dict[str, Any]:
    """Write the model file and `model.json` into the run dir; check the file's outputs."""
    fmt = str(cfg.format)
    if fmt not in FORMATS:
        raise ConfigError(
            f"format={fmt}: one of {', '.join(FORMATS)}{did_you_mean(fmt, list(FORMATS))}"
        )
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_checkpoint(cfg.get("ckpt_path"))
    pre = loaded.preprocess
    model = loaded.model.cpu().eval()
    path = out / FORMATS[fmt]
    x = example_inputs(pre)
    opset = None
    if fmt == "onnx":
        opset = export_onnx(exportable(model, pre), x, path, cfg.get("opset"), input_names(pre))
    else:
        export_torchscript(exportable(model, pre), x, path)
    card = model_card(loaded, fmt, path.name, opset)
    if cfg.get("verify", True):
        diff = max_abs_difference(model, path, fmt, pre)
        card["max_abs_diff"] = diff
        if diff > float(cfg.tolerance):
            log.warning("exported logits differ from PyTorch by up to %.2e", diff)
    write_json(out / "model.json", card)
    log.info("Wrote %s and %s", path, out / "model.json")
    return card
