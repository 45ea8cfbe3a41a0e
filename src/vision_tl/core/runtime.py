"""Facts about the machine a command runs on: usable CPU cores, the torch device to use,
whether bfloat16 runs natively."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from vision_tl.core.errors import ConfigError
from vision_tl.core.shims import onednn_bf16_supported


def inference_copy(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The copy frozen inference runs in `precision` (the feature cache, `eval`, `predict`):
    the model's own `inference_copy()` where it has one, else an eval-mode deep copy.
    `model` is left as it is.

    A `Classifier` folds its BatchNorms into their convolutions in fp32 only: there the
    result is the same to ~1e-6 and EfficientNet-Lite0 runs 1.4x faster on a CPU. In bf16
    the folded weights and biases are rounded once more, and on EfficientNet-Lite0 the
    features moved 1.4x further from fp32's (6.6% against 4.8% mean relative error), so
    bf16 runs the network as trained."""
    return folded_copy(model, fold=precision == "fp32")


def folded_copy(model: torch.nn.Module, fold: bool) -> torch.nn.Module:
    """`model.inference_copy(fold=fold)` where the model has one, else an eval-mode copy."""
    make = getattr(model, "inference_copy", None)
    return make(fold=fold) if callable(make) else copy.deepcopy(model).eval()


def available_cpus() -> int:
    """CPU cores this process may use (a container's cpuset, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """The process environment with `values` set for the block (for a library that reads
    its settings from variables, and the processes it starts), as it was after."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch's own ops on one thread for the block. Small ops (a head on features, the
    normalising around another engine's call) run faster so, a busy CPU does not stall
    them, and torch's idle threads do not spin on the cores another engine computes on."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` is the GPU when there is one; anything else must be a torch device name."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name} is not a torch device (auto, cpu, cuda, cuda:1)") from err


PRECISIONS = ("auto", "bf16", "fp32")  # data.feature_precision, eval/predict precision


@functools.cache
def _cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX in the CPU flags (Linux), and oneDNN built with bf16 kernels:
    elsewhere bf16 is emulated and slower than float32."""
    if not (torch.backends.mkldnn.is_available() and onednn_bf16_supported()):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 convolutions run natively (faster than float32) on `device`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_has_bf16()


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: `bf16` where it runs natively on `device`, else `fp32`; `bf16` and `fp32`
    as given."""
    if name not in PRECISIONS:
        raise ConfigError(f"precision={name} is not one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name


# Measured on the 2-core CPU this project's CI runs on, the backbone alone, steady-state
# images/s at batch 8 vs 32: EfficientNet-Lite0 150 vs 85 in bf16 and 60-88 vs 38 in
# fp32; lite2 and ResNet50 gain 5-60 %. Small batches keep a CPU's working set in cache;
# a GPU wants large ones.
CPU_FEATURE_BATCH = 8


def feature_batch_size(requested: int | None, device: torch.device, train_batch: int) -> int:
    """The batch for frozen-backbone inference over a whole set (the feature cache):
    `requested` when given, else 8 on a CPU and max(32, the training batch) elsewhere."""
    if requested is not None:
        return int(requested)
    return CPU_FEATURE_BATCH if device.type == "cpu" else max(32, train_batch)


@contextlib.contextmanager
def backbone_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Run a frozen backbone's forward pass in `precision` (`bf16`: autocast)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield
