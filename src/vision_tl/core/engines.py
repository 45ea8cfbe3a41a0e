"""Inference engines: who runs a frozen network's forward pass over a batch of images.

`torch` is PyTorch eager (BatchNorms folded in fp32, channels_last, bf16 autocast where the
CPU runs it natively); `openvino` converts the module once (by tracing, see
`openvino_model`), keeps the converted model on disk keyed by the weights it computes with,
and compiles it for the CPU in bf16 or f32; `onnxruntime` runs it from ONNX (float32 only
on a CPU). `auto` is OpenVINO on a CPU where it is installed (on the 2-core CPU this
project measures on it ran EfficientNet-Lite0 2-4x faster than eager PyTorch and ONNX
Runtime, in every precision), else PyTorch. Adding an engine is one registered class.

The engines live in `core` because the feature cache (`data`), `eval`, `predict` and the
server all use them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from vision_tl.core.config import cache_dir
from vision_tl.core.errors import ConfigError, error_line
from vision_tl.core.logs import (
    onnx_export_quiet,
    root_level_kept,
    torchscript_deprecation_ignored,
)
from vision_tl.core.registry import Registry
from vision_tl.core.runtime import (
    available_cpus,
    backbone_precision,
    native_bf16,
    one_thread,
    resolve_precision,
)
from vision_tl.core.validate import Allowed

log = logging.getLogger(__name__)

AUTO = "auto"
# What `auto` means on this machine, when set (see `resolve_engine`).
SITE_ENGINE = "VISION_TL_ENGINE"


class Runner(Protocol):
    """A compiled forward pass: float32 NCHW batches in (one per model input), float32
    outputs out, on the CPU; `precision` is what it computes in."""

    engine: str
    precision: str

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor: ...


def cores_for(runner: Runner) -> contextlib.AbstractContextManager[None]:
    """A block where `runner` computes: torch's own ops in it (normalising, a head,
    softmax) on one thread when another engine runs the network, since torch's idle threads
    spin after each op on the cores that engine needs (lite0 under OpenVINO on 2 cores:
    1.6-2x the images/s at batch 1, 1.14x at batch 8)."""
    return one_thread() if runner.engine != "torch" else contextlib.nullcontext()


class Engine:
    """One way to run a module: `compile` a torch module, or `load` an exported file."""

    name: ClassVar[str]
    # The import that must succeed (None: always available).
    package: ClassVar[str | None] = None
    # Images per batch that ran fastest on a CPU (measured, see docs/benchmarks.md).
    cpu_batch: ClassVar[int] = 8
    # Exported files this engine runs, by suffix.
    suffixes: ClassVar[tuple[str, ...]] = ()
    # What it computes in (a request for another runs in fp32).
    precisions: ClassVar[tuple[str, ...]] = ("bf16", "fp32")

    @classmethod
    def installed(cls) -> bool:
        return cls.package is None or importlib.util.find_spec(cls.package) is not None

    def compile(
        self,
        module: nn.Module,
        examples: tuple[torch.Tensor, ...],
        precision: str,
        device: torch.device,
    ) -> Runner:
        raise NotImplementedError

    def load(self, path: Path, precision: str) -> Runner:
        raise ConfigError(f"inference.engine={self.name} cannot run {path.name}")


ENGINES: Registry[type[Engine]] = Registry("inference engine")


def engine_choices() -> tuple[str, ...]:
    """What `inference.engine` and `data.feature_engine` accept."""
    return (AUTO, *ENGINES.names())


# The rule of `inference.engine` and `data.feature_engine` (in their packages' tables).
ENGINE_RULE = Allowed(
    lambda v: str(v) in engine_choices(), lambda: "one of " + ", ".join(engine_choices())
)


def resolve_engine(name: str, device: torch.device) -> Engine:
    """The engine `name` stands for on `device`: `auto` is the site's `$VISION_TL_ENGINE`
    when set (a machine where conversion does not pay, such as a CI runner that predicts
    a few images per process), else OpenVINO on a CPU where it is installed, else
    PyTorch; a named engine must be installed, and only PyTorch runs on a GPU."""
    if name == AUTO and os.environ.get(SITE_ENGINE, AUTO) in ENGINES.names():
        name = os.environ[SITE_ENGINE]
        if device.type != "cpu":
            return ENGINES.get("torch")()
    if name == AUTO:
        if device.type == "cpu" and ENGINES.get("openvino").installed():
            return ENGINES.get("openvino")()
        return ENGINES.get("torch")()
    engine = ENGINES.get(str(name))
    if not engine.installed():
        raise ConfigError(
            f"inference.engine={name}: the {engine.package} package is not installed "
            f"(pip install {engine.package}, or inference.engine=torch)"
        )
    if device.type != "cpu" and engine.name != "torch":
        raise ConfigError(f"inference.engine={name} runs on the CPU only (device={device})")
    return engine()


def engine_for_file(path: Path, name: str) -> Engine:
    """The engine that runs an exported file: `name` when it can, else (`auto`) the first
    installed one that reads the file's suffix, OpenVINO first."""
    if name != AUTO:
        engine = resolve_engine(name, torch.device("cpu"))
        if path.suffix not in engine.suffixes:
            raise ConfigError(f"inference.engine={name} cannot run {path.name}")
        return engine
    order = ["openvino", *(n for n in ENGINES.names() if n != "openvino")]
    for candidate in order:
        engine = ENGINES.get(candidate)
        if path.suffix in engine.suffixes and engine.installed():
            return engine()
    raise ConfigError(f"{path}: no installed engine runs {path.suffix} files")


def compute_threads() -> int:
    """Threads an engine computes with: every core this process may use. Decoding runs in
    loader processes beside it; the OS shares the cores, and on 2 cores this measured
    faster than giving the model one core and decoding the other."""
    return available_cpus()


def _tensors_digest(named: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors: each one's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for key, value in sorted(named.items()):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:{tensor.dtype}:{tuple(value.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of every tensor in `module.state_dict()`: the weights' true identity,
    whatever file, tag or random seed they came from."""
    return _tensors_digest(module.state_dict())


class _Touched(torch.overrides.TorchFunctionMode):
    """The ids of every tensor a forward pass hands to a torch function or operator."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[int] = set()

    def _note(self, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            self.ids.add(id(value))
        elif isinstance(value, list | tuple):
            for item in value:
                self._note(item)
        elif isinstance(value, dict):
            for item in value.values():
                self._note(item)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self._note(args)
        self._note(kwargs)
        return func(*args, **kwargs)


def used_weights_digest(module: nn.Module, examples: tuple[torch.Tensor, ...]) -> str:
    """SHA-256 of the parameters and buffers that `module` computes with on `examples`:
    what a conversion of it holds. A classifier's head, which its `features` pass never
    reads, leaves the key of its backbone's conversion unchanged (a probe's head differs
    with every seed and class count; the converted backbone does not)."""
    touched = _Touched()
    with torch.no_grad(), touched:
        module(*examples)
    named = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    return _tensors_digest({k: v for k, v in named.items() if id(v) in touched.ids})


class Forward(nn.Module):
    """`model`'s `method` (`forward`, `features`) as a module with one positional input
    per model input, as exporters trace it (an ensemble with per-member preprocessing
    takes a list of batches)."""

    def __init__(self, model: nn.Module, method: str = "forward") -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        x: Any = inputs[0] if len(inputs) == 1 else list(inputs)
        return getattr(self.model, self.method)(x)


def dynamic_batch(examples: tuple[torch.Tensor, ...]) -> tuple[tuple[dict[int, Any], ...]]:
    """`torch.export` dynamic shapes of a `Forward`: one batch axis shared by every input
    (its `*inputs` argument holds them all)."""
    batch = torch.export.Dim("batch")
    return (tuple({0: batch} for _ in examples),)


def export_onnx(
    module: Forward,
    examples: tuple[torch.Tensor, ...],
    path: Path,
    opset: int | None = None,
    names: list[str] | None = None,
    output: str = "logits",
) -> int:
    """Export with the dynamo exporter, batch axis dynamic (one batch size for every
    input), weights inside the file. Returns the opset the file declares."""
    import onnx

    with onnx_export_quiet():
        torch.onnx.export(
            module,
            examples,
            path,
            input_names=names or [f"input{i}" for i in range(len(examples))],
            output_names=[output],
            opset_version=opset,
            dynamic_shapes=dynamic_batch(examples),
            external_data=False,
            verbose=False,
        )
    graph = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))


def to_numpy(inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """Contiguous float32 arrays (a channels_last tensor is copied to NCHW order)."""
    return [np.ascontiguousarray(t.detach().cpu().float().numpy()) for t in inputs]


# --------------------------------------------------------------------------- torch


class TorchRunner:
    """Eager PyTorch: `module` in `precision` (bf16: autocast), channels_last."""

    engine = "torch"

    def __init__(self, module: nn.Module, precision: str, device: torch.device) -> None:
        self.module = module.to(device, memory_format=torch.channels_last).eval()
        self.precision, self.device = precision, device

    @torch.inference_mode()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        x = [t.to(self.device, non_blocking=True) for t in inputs]
        x = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in x]
        with backbone_precision(self.precision, self.device):
            return self.module(*x).float()


@ENGINES.register("torch")
class TorchEngine(Engine):
    """PyTorch eager: always available, the one a GPU uses; runs TorchScript files."""

    name = "torch"
    suffixes = (".pt",)

    def compile(
        self,
        module: nn.Module,
        examples: tuple[torch.Tensor, ...],
        precision: str,
        device: torch.device,
    ) -> Runner:
        return TorchRunner(module, resolve_precision(precision, device), device)

    def load(self, path: Path, precision: str) -> Runner:
        with torchscript_deprecation_ignored():
            module = torch.jit.load(str(path), map_location="cpu")
        return TorchRunner(module, "fp32", torch.device("cpu"))


# --------------------------------------------------------------------------- openvino


def file_precision(precision: str) -> str:
    """An exported file's precision as its card gives it: `int8` (a quantized file: its
    other layers in f32) or a float precision (`auto`: bf16 where native)."""
    return "int8" if precision == "int8" else resolve_precision(precision, torch.device("cpu"))


class OpenVINORunner:
    """A model compiled by OpenVINO for the CPU; one infer request, inputs shared."""

    engine = "openvino"

    def __init__(self, model: Any, precision: str) -> None:
        import openvino as ov

        hint = "bf16" if precision == "bf16" else "f32"
        config = {
            "INFERENCE_PRECISION_HINT": hint,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": compute_threads(),
        }
        self.compiled = ov.Core().compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.precision = precision

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        result = self.request.infer(to_numpy(inputs), share_inputs=True)
        return torch.from_numpy(np.array(result.to_tuple()[0], dtype=np.float32))


def openvino_model(module: nn.Module, examples: tuple[torch.Tensor, ...]) -> Any:
    """`module` (a `Forward`) as an OpenVINO model with a dynamic batch axis: traced by
    OpenVINO's converter (EfficientNet-Lite0 in 3.4-4.2 s on the AVX2 CPU, against 11 s
    through `torch.export`, whose decompositions re-trace the graph symbolically), and
    through `torch.export` where tracing fails (deprecated in torch, and gone some day)."""
    import openvino as ov

    shapes = [ov.PartialShape([-1, *t.shape[1:]]) for t in examples]
    try:
        # A failed conversion leaves the root logger at ERROR (`root_level_kept`).
        with torch.no_grad(), torchscript_deprecation_ignored(), root_level_kept():
            return ov.convert_model(module, example_input=examples, input=shapes)
    except Exception as err:
        log.debug("tracing %s failed (%s); converting through torch.export", module, err)
    with torch.no_grad():
        program = torch.export.export(module, examples, dynamic_shapes=dynamic_batch(examples))
    return ov.convert_model(program)


def converted_cache(module: nn.Module, examples: tuple[torch.Tensor, ...]) -> Path:
    """Where `module`'s converted OpenVINO model is kept: keyed by the weights it computes
    with, the input shapes and the versions that made it."""
    import openvino as ov

    shapes = [tuple(t.shape[1:]) for t in examples]
    weights = used_weights_digest(module, examples)
    key = f"{weights}:{type(module).__name__}:{shapes}:{ov.__version__}"
    key += f":{torch.__version__}:{getattr(module, 'method', '')}"
    name = hashlib.sha256(key.encode()).hexdigest()[:32]
    return cache_dir() / "engines" / "openvino" / name / "model.xml"


def cached_openvino_model(module: nn.Module, examples: tuple[torch.Tensor, ...]) -> Any:
    """The converted model from the cache, or converted now and written there atomically
    (a folder renamed into place; a failed write only costs the next run a conversion)."""
    import openvino as ov

    path = converted_cache(module, examples)
    if path.is_file():
        with contextlib.suppress(RuntimeError):
            return ov.Core().read_model(str(path))
    model = openvino_model(module, examples)
    with contextlib.suppress(OSError):
        path.parent.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent.parent))
        try:
            ov.save_model(model, str(tmp / path.name), compress_to_fp16=False)
            os.rename(tmp, path.parent)
        except OSError:
            pass  # another process wrote it first, or the disk is read-only
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return model


@ENGINES.register("openvino")
class OpenVINOEngine(Engine):
    """OpenVINO on the CPU: bf16 where the CPU has it natively (AVX512-BF16, AMX)."""

    name = "openvino"
    package = "openvino"
    suffixes = (".xml", ".onnx")

    def __init__(self) -> None:
        # bf16 only where the CPU computes it: elsewhere OpenVINO quietly runs f32, and the
        # cache key and metrics must say what ran.
        self.precisions = ("bf16", "fp32") if native_bf16(torch.device("cpu")) else ("fp32",)

    def compile(
        self,
        module: nn.Module,
        examples: tuple[torch.Tensor, ...],
        precision: str,
        device: torch.device,
    ) -> Runner:
        precision = resolve_precision(precision, device)
        return OpenVINORunner(cached_openvino_model(module, examples), precision)

    def load(self, path: Path, precision: str) -> Runner:
        import openvino as ov

        return OpenVINORunner(ov.Core().read_model(str(path)), file_precision(precision))


# --------------------------------------------------------------------------- onnxruntime


class OnnxRuntimeRunner:
    """An ONNX Runtime CPU session (float32: its CPU provider has no bf16 kernels)."""

    engine = "onnxruntime"
    precision = "fp32"

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = compute_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        feed = dict(zip(self.names, to_numpy(inputs), strict=True))
        return torch.from_numpy(self.session.run(None, feed)[0].astype(np.float32))


@ENGINES.register("onnxruntime")
class OnnxRuntimeEngine(Engine):
    """ONNX Runtime on the CPU, from an ONNX export of the module."""

    name = "onnxruntime"
    package = "onnxruntime"
    suffixes = (".onnx",)
    precisions = ("fp32",)

    def compile(
        self,
        module: nn.Module,
        examples: tuple[torch.Tensor, ...],
        precision: str,
        device: torch.device,
    ) -> Runner:
        folder = Path(tempfile.mkdtemp(prefix="vision_tl-ort-"))
        try:
            path = folder / "model.onnx"
            export_onnx(module, examples, path)
            return OnnxRuntimeRunner(path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def load(self, path: Path, precision: str) -> Runner:
        runner = OnnxRuntimeRunner(path)
        runner.precision = "int8" if precision == "int8" else "fp32"
        return runner


class LazyRunner:
    """Compiles on the first batch (its shapes are the example the converters trace), so
    no engine is built for an empty input and no caller needs to know the input sizes."""

    def __init__(
        self,
        engine: Engine,
        module: nn.Module,
        precision: str,
        device: torch.device,
        fallback: bool = False,
    ) -> None:
        self.chosen, self.module, self.device = engine, module, device
        self.requested = resolve_precision(precision, device)
        self.engine = engine.name
        self.precision = self.requested if self.requested in engine.precisions else "fp32"
        self.fallback = fallback  # `auto` chose the engine: a network it cannot convert runs eager
        self.runner: Runner | None = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.runner is None:
            # A batch of 2 keeps the batch axis free (an exporter specialises a size of 1).
            examples = tuple(t[:1].detach().float().cpu().expand(2, *t.shape[1:]) for t in inputs)
            examples = tuple(t.contiguous() for t in examples)
            try:
                with root_level_kept():
                    self.runner = self.chosen.compile(
                        self.module, examples, self.precision, self.device
                    )
            except Exception as err:
                if not self.fallback or self.chosen.name == "torch":
                    raise
                log.warning(
                    "inference.engine=auto: %s cannot run this network (%s); running it on "
                    "torch (eager PyTorch)",
                    self.chosen.name,
                    error_line(err),
                )
                self.chosen = ENGINES.get("torch")()
                self.engine = self.chosen.name
                self.runner = self.chosen.compile(
                    self.module, examples, self.requested, self.device
                )
            self.precision = self.runner.precision
            self.module = None  # the runner holds what it needs
        return self.runner(*inputs)


def compile_forward(
    module: nn.Module,
    engine: str,
    precision: str,
    device: torch.device,
    method: str = "forward",
) -> LazyRunner:
    """`module.<method>` run by `engine` (`auto` or a registered name), compiled on its
    first batch; `module` is an inference copy the caller prepared (BatchNorms folded as
    its precision wants). An unknown or missing engine fails here, before any work."""
    chosen = resolve_engine(engine, device)
    fallback = engine == AUTO
    return LazyRunner(chosen, Forward(module, method).eval(), precision, device, fallback)
