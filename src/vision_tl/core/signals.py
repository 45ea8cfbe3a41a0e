"""SIGTERM and SIGINT: a command stops where it is safe to, says so in one line, and exits
with 128 + the signal's number (143 for SIGTERM, as SLURM and Kubernetes send before a
kill; 130 for Ctrl+C).

`handle_signals()` is installed around every command (`core.cli.command`). Outside a fit a
signal raises `Interrupted` where the command is: everything it writes is atomic
(`core.io`), so nothing half-written is left. Inside `safe_points()` (a Trainer's fit) the
signal is only recorded; the fit stops at the end of the batch it is in, saves a
checkpoint and raises `Interrupted` then (`training.callbacks.StopOnSignal`). A second
signal does not wait.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Overrides the resume line sets itself.
_RESUME_KEYS = ("ckpt_path", "hydra.run.dir", "hydra.sweep.dir")


class Interrupted(BaseException):
    """A command stopped by a signal. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` takes it for a failure: a sweep records the job as interrupted.

    Whoever knows adds what the one line says: the checkpoint saved (`checkpoint`), the run
    folder (`run_dir`), or the sweep folder and the job (`sweep_dir`, `job`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = int(signum)
        self.checkpoint: str | None = None
        self.run_dir: str | None = None
        self.sweep_dir: str | None = None
        self.job: str | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def status(self) -> int:
        """The exit status a shell reports for a process this signal ended."""
        return 128 + self.signum

    def line(self, command: str, argv: Sequence[str]) -> str:
        """The one line a user reads: what stopped, what was kept, the command that resumes."""
        args = [a for a in argv if a.lstrip("+~").split("=", 1)[0] not in _RESUME_KEYS]
        run = f"python -m vision_tl.{command}"
        if self.sweep_dir is not None:
            again = shlex.join([*args, f"hydra.sweep.dir={self.sweep_dir}"])
            return (
                f"interrupted by {self.name}: job {self.job} recorded as interrupted, the "
                f"summary so far in {os.path.join(self.sweep_dir, 'summary.md')}; resume "
                f"with: {run} {again}"
            )
        if self.checkpoint is not None:
            extra = [f"ckpt_path={self.checkpoint}"]
            extra += [f"hydra.run.dir={self.run_dir}"] if self.run_dir else []
            return (
                f"interrupted by {self.name}: checkpoint saved in {self.checkpoint}; resume "
                f"with: {run} {shlex.join([*args, *extra])}"
            )
        return f"interrupted by {self.name}; to start again: {run} {shlex.join(args)}".rstrip()


class _State:
    def __init__(self) -> None:
        self.received: list[int] = []
        self.deferring = 0
        self.owner: int | None = None


_state = _State()


def _handler(signum: int, frame: FrameType | None) -> None:
    if os.getpid() != _state.owner:  # a forked child (a loader worker): the default action
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    first = not _state.received
    _state.received.append(signum)
    if _state.deferring and first:
        return  # the fit stops at its next safe point
    raise Interrupted(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Within: SIGTERM and SIGINT raise `Interrupted` (inside `safe_points`, at the next
    safe point). Only the main thread can install handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _handler) for signum in SIGNALS}
    _state.owner, _state.received = os.getpid(), []
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _state.owner, _state.received = None, []


@contextlib.contextmanager
def safe_points() -> Iterator[None]:
    """Within: a first signal is recorded, not raised; `stop_if_signalled` acts on it."""
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1


def pending() -> int | None:
    """The first signal received and not yet acted on, or None."""
    return _state.received[0] if _state.received else None


def stop_if_signalled() -> None:
    """Raise `Interrupted` for a signal received within `safe_points`."""
    signum = pending()
    if signum is not None:
        raise Interrupted(signum)


def report(stop: Interrupted, command: str) -> SystemExit:
    """Print `stop`'s one line on stderr; the `SystemExit` to raise (status 128 + signal)."""
    sys.stderr.write(stop.line(command, sys.argv[1:]) + "\n")
    sys.stderr.flush()
    return SystemExit(stop.status)
