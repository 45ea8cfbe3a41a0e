"""Third-party noise, filtered in one place: a command prints vision_tl's lines,
Lightning's useful ones, once each, and the warnings a user can act on.

`quiet_third_party()` runs at the start of every command (`core.cli.run_command`).
`WARNING_FILTERS` also reach pytest (`tests/conftest.py`), so the suite shows the
warnings a user would see, and no others. Each filter says why it is there.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

from vision_tl.core.io import printable

# Warnings ignored: (regex matched at the start of the message, category).
WARNING_FILTERS: tuple[tuple[str, type[Warning]], ...] = (
    # Lightning, at the start of a fit: frozen backbones are in eval mode on purpose (their
    # BatchNorm statistics must not move).
    (r"Found \d+ module\(s\) in eval mode at the start of training", UserWarning),
    # Lightning's rule of thumb on loader workers: vision_tl sizes them itself
    # (data.num_workers, default min(8, CPU cores)) and reads cached features with none.
    (r"The '\w+' does not have many workers", UserWarning),
    # Lightning, on a dataset of fewer batches than trainer.log_every_n_steps: nothing is
    # lost, each epoch's train loss and accuracy are logged (TensorBoard, history.csv).
    (r"The number of training batches \(\d+\) is smaller than the logging interval", UserWarning),
    # Lightning 2.6's own utilities/_pytree.py builds torch's deprecated LeafSpec at every
    # fit and validation; nothing vision_tl or a user calls.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # Pillow, on opening an image above its own pixel limit (a DecompressionBombWarning,
    # a RuntimeWarning): vision_tl checks every image against data.max_image_pixels
    # before decoding it, and lists the ones it refuses with the reason.
    (r"Image size \(\d+ pixels\) exceeds limit", RuntimeWarning),
    # Optuna (its ExperimentalWarning is a plain Warning) on the heartbeat API the Optuna sweeper
    # uses on purpose (sweeps/optuna_sweeper.py), stable since Optuna 2.8; and its reminder
    # that heartbeats were made for Study.optimize: the sweeper beats for its own trials.
    (r"\S+ is experimental \(supported from v", Warning),
    (r"Argument ``(heartbeat_interval|grace_period)`` is an experimental feature", Warning),
    (r"Heartbeat of storage is supposed to be used with Study\.optimize", UserWarning),
)

# Lines Lightning logs that are dropped (a fragment of the message each).
LIGHTNING_LINES_DROPPED = (
    # An advertisement for Lightning's cloud logger, at every Trainer's start.
    "litlogger",
    # vision_tl puts its own summary (training/summary.py) in Lightning's place on purpose.
    "Skipping setting a default `ModelSummary` callback",
)


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in LIGHTNING_LINES_DROPPED)


class _PrintableLines(logging.Filter):
    """A line naming a file whose name is not UTF-8 (surrogate escapes from `os.walk`)
    would make a UTF-8 log stream raise inside the handler; it is written with those
    bytes as `\\xNN` (`core.io.printable`) instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: the handler reports it as it always has
            return True
        shown = printable(message)
        if shown is not message:
            record.msg, record.args = shown, None
        return True


def quiet_third_party() -> None:
    """Apply the filters above, and print each Lightning line once (safe to call again;
    a command that imports Lightning calls it after the import)."""
    for message, category in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category)
    # Lightning's `lightning` logger prints each line itself ("INFO: ...") and passes it on
    # to the root logger, where Hydra's handler prints it again and writes the job's log
    # file. Lightning's handlers go: each line is printed once, and logged to the file.
    # Importing Lightning adds that handler, so this runs once it is imported (`predict`
    # and `serve` never import it: ~2.5 s of their start-up with torchmetrics). Without
    # a root handler (logging turned off with hydra/job_logging), Lightning's stay.
    if "lightning" in sys.modules and logging.getLogger().handlers:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _PrintableLines) for f in handler.filters):
            handler.addFilter(_PrintableLines())
    # LitData (shards) logs its cache budget at INFO each time a split's dataset opens; its
    # warnings stay.
    logging.getLogger("litdata").setLevel(logging.WARNING)
    # Lightning's rank-zero messages (rank_zero_info) come from this logger.
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLines) for f in rank_zero.filters):
        rank_zero.addFilter(_DropLines())


def ini_filterwarnings() -> list[str]:
    """`WARNING_FILTERS` as pytest `filterwarnings` lines, after the rule Python follows
    outside pytest (which shows every DeprecationWarning): one shows where vision_tl's code
    or a test's raised it or called the deprecated API, not from inside a library."""
    return [
        "ignore::DeprecationWarning",
        "default::DeprecationWarning:(vision_tl|test_|conftest|helpers)",
        *(f"ignore:{message}:{category.__name__}" for message, category in WARNING_FILTERS),
    ]


@contextlib.contextmanager
def torchscript_deprecation_ignored() -> Iterator[None]:
    """Inside: torch's deprecation of the torch.jit API is ignored. format=torchscript is
    a format users ask for (loadable from C++ and plain torch), and torch.jit is the only
    way to write and read it; OpenVINO's converter traces with it (`core.engines`, which
    falls back to `torch.export` when tracing goes). A `TracerWarning` still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated")
        yield


@contextlib.contextmanager
def nncf_quiet() -> Iterator[None]:
    """Inside: NNCF logs warnings only (its INFO lines and progress bars, one per
    statistics pass, drown the run log)."""
    with quiet_loggers("nncf"):
        yield


@contextlib.contextmanager
def onnx_export_quiet() -> Iterator[None]:
    """Inside: onnx_ir and onnxscript log warnings only; their INFO lines (one per
    optimisation pass of an ONNX export) drown the run log."""
    with quiet_loggers("onnx_ir", "onnxscript"):
        yield


@contextlib.contextmanager
def root_level_kept() -> Iterator[None]:
    """Inside: a converter may change the root logger's level (OpenVINO's PyTorch frontend
    leaves it at ERROR after a failed conversion, which silenced every later line of the
    run); it is put back on the way out."""
    level = logging.root.level
    try:
        yield
    finally:
        logging.root.setLevel(level)


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Inside: the loggers `names` log warnings only."""
    chatty = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in chatty]
    for logger in chatty:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(chatty, levels, strict=True):
            logger.setLevel(level)
