"""Every use of a private attribute of torch, Lightning, Hydra or OmegaConf, in one place.

Each function below serves one need that no public API serves (the comment in it says why),
and checks that the private name is still there: on a version that dropped or renamed it,
the call fails with one line naming the library and its version instead of an
AttributeError deep inside a run. `tests/test_shims.py` runs each against the installed
libraries, and scans the rest of vision_tl for private names.

Third-party imports stay inside the functions: `core` is imported by every command, and
the command line is checked before torch or Lightning load.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import argparse

    from torch.optim.lr_scheduler import LRScheduler

RankCommand = Callable[[int], tuple[Sequence[str], str]]


class ShimError(RuntimeError):
    """A private attribute vision_tl relies on is missing from the installed library."""


def _gone(distribution: str, what: str) -> ShimError:
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown)"
    return ShimError(
        f"{distribution} {version} has no {what}, which vision_tl relies on: "
        "install the versions pyproject.toml pins, or update vision_tl/core/shims.py"
    )


def hydra_args_parser() -> argparse.ArgumentParser:
    """The argument parser `@hydra.main` reads `sys.argv` with (overrides, -m, --cfg, ...)."""
    # No public API: hydra.main builds its parser with the internal `get_args_parser` and
    # exposes neither the parser nor the parsed arguments. Re-declaring Hydra's flags here
    # would drift from the parser Hydra actually uses.
    try:
        from hydra._internal.utils import get_args_parser
    except (ImportError, AttributeError):
        raise _gone("hydra-core", "hydra._internal.utils.get_args_parser") from None
    return get_args_parser()


def set_last_lr(scheduler: LRScheduler, lrs: Sequence[float]) -> None:
    """Make `scheduler.get_last_lr()` return `lrs`, the LRs just written into its optimizer
    outside `scheduler.step()` (a schedule re-planned on resume, a param group added)."""
    # No public API: torch schedulers store what get_last_lr() returns in `_last_lr`, and
    # only step() (which would also advance the schedule) or load_state_dict() (keyed by
    # the same private name) write it.
    if not hasattr(scheduler, "_last_lr"):
        raise _gone("torch", f"{type(scheduler).__name__}._last_lr (read by get_last_lr())")
    scheduler._last_lr = list(lrs)


def replace_hydra_subprocess_cmd(command: RankCommand) -> None:
    """Make Lightning's subprocess launchers (Trainer's and Fabric's) start DDP ranks under
    Hydra with `command(local_rank) -> (argv, cwd)` instead of Lightning's own."""
    # No public API: the launchers call the module-level function `_hydra_subprocess_cmd`,
    # looked up by name at launch time, whenever Hydra is initialised; neither the DDP
    # strategy nor the launcher takes a command or a launcher of one's own.
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

    for module in (fabric_launcher, trainer_launcher):
        if not callable(getattr(module, "_hydra_subprocess_cmd", None)):
            raise _gone("lightning", f"{module.__name__}._hydra_subprocess_cmd")
        module._hydra_subprocess_cmd = command


def onednn_bf16_supported() -> bool:
    """Whether oneDNN (mkldnn) runs bfloat16 kernels on this CPU."""
    # No public API: torch.backends.mkldnn.is_available() says oneDNN is built in, not
    # whether it has bf16 kernels for this CPU (its ISA check, which ONEDNN_MAX_CPU_ISA can
    # lower); torch exposes that only as the private op below.
    import torch

    check: Any = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if check is None:
        raise _gone("torch", "torch.ops.mkldnn._is_mkldnn_bf16_supported")
    return bool(check())


def stop_fit_as_on_sigterm(trainer: Any) -> None:
    """Make a running fit stop where Lightning stops it on SIGTERM: after the batch it is
    in (or at its epoch's end, or after a validation batch), raising `SIGTERMException`."""
    # No public API: Lightning stops a fit at those points, each one it can resume from
    # exactly, only when its signal connector has seen SIGTERM (`Trainer.received_sigterm`
    # is read-only). `Trainer.should_stop` ends the epoch early and then the fit as if the
    # epoch had finished, so a resumed run would skip the rest of it. SIGINT (Ctrl+C)
    # must stop at the same points as SIGTERM.
    connector = getattr(trainer, "_signal_connector", None)
    if connector is None or not hasattr(connector, "received_sigterm"):
        raise _gone("lightning", "Trainer._signal_connector.received_sigterm")
    connector.received_sigterm = True


def end_process_now(code: int = 0) -> NoReturn:
    """`os._exit`: end the process without the interpreter's teardown (module finalizers of
    torch and OpenVINO, 0.7-1.9 s on the 2-core CPU). Only for a command whose files are
    written and closed and whose log is flushed: nothing else runs after it."""
    os._exit(code)
