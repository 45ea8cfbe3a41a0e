"""Sweep jobs that survive interruption: GPU pinning, containment, resume, a closing report.

Each multirun job writes `job_status.json` (its overrides, status, attempts). Re-running
the same sweep command therefore skips jobs that finished, resumes interrupted ones from
their `last.ckpt`, and retries failed ones; a job that fails is recorded and returns NaN,
so the sweeper goes on with the others. A single run in a SLURM batch job is such a job
too, in a run folder named after the SLURM job (`core.config.slurm_job`): the requeued
job resumes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from vision_tl.core.config import slurm_job
from vision_tl.core.errors import ConfigError, error_line, find_user_error
from vision_tl.core.io import read_json
from vision_tl.core.signals import Interrupted
from vision_tl.sweeps.report import write_report
from vision_tl.sweeps.status import read_status, write_status

log = logging.getLogger(__name__)


class DeviceSlots:
    """One lock file per GPU in the sweep dir: a job holds its card until it ends.

    `flock` locks die with their process, so a crashed job never keeps a card busy.
    """

    def __init__(self, lock_dir: Path, count: int) -> None:
        self.lock_dir = Path(lock_dir)
        self.count = count
        self._handle: Any = None

    def acquire(self, timeout: float | None = None, poll: float = 1.0) -> int | None:
        """Take the first free slot, waiting for one; None if `timeout` passes first."""
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        waited = False
        while True:
            for index in range(self.count):
                handle = open(self.lock_dir / f"device{index}.lock", "a+")  # noqa: SIM115
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    handle.close()
                    continue
                self._handle = handle
                handle.seek(0)
                handle.truncate()
                handle.write(f"{socket.gethostname()} {os.getpid()}\n")
                handle.flush()
                return index
            if deadline is not None and time.monotonic() >= deadline:
                return None
            if not waited:
                log.info("All %d GPUs are busy with other jobs: waiting for one", self.count)
                waited = True
            time.sleep(poll)

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


def _wants_one_gpu(cfg: DictConfig) -> bool:
    import torch

    trainer = cfg.trainer
    accelerator = str(trainer.get("accelerator", "auto"))
    devices = trainer.get("devices", 1)
    return (
        accelerator in ("auto", "gpu", "cuda")
        and str(devices) == "1"
        and torch.cuda.is_available()
        and torch.cuda.device_count() > 0
    )


@contextlib.contextmanager
def pinned_gpu(cfg: DictConfig, sweep_dir: Path) -> Iterator[int | None]:
    """Give a one-GPU job a card of its own (`trainer.devices=[i]`) for as long as it runs."""
    if not _wants_one_gpu(cfg):
        yield None
        return
    import torch

    slots = DeviceSlots(sweep_dir / ".gpu_locks", torch.cuda.device_count())
    index = slots.acquire()
    try:
        with open_dict(cfg):
            cfg.trainer.accelerator = "gpu"
            cfg.trainer.devices = [index]
        log.info("This job runs on GPU %d", index)
        yield index
    finally:
        slots.release()


def _parallel_jobs(hydra_cfg: DictConfig) -> int:
    """How many jobs a launcher runs at once on this machine (1 for the basic launcher)."""
    n_jobs = hydra_cfg.launcher.get("n_jobs") if "launcher" in hydra_cfg else None
    if not isinstance(n_jobs, int) or n_jobs == 1:
        return 1
    cpus = os.cpu_count() or 1
    return cpus if n_jobs < 0 else min(n_jobs, cpus)


@contextlib.contextmanager
def isolated_job(parallel_jobs: int) -> Iterator[None]:
    """Leave the process as the job found it: environment, threads, process group.

    Lightning's DDP launcher sets MASTER_PORT, LOCAL_RANK and WORLD_SIZE in the parent's
    environment and keeps its process group; a second job in the same process would then
    join the first job's (dead) group and hang.
    """
    import torch

    environment = dict(os.environ)
    threads = torch.get_num_threads()
    if parallel_jobs > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // parallel_jobs))
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environment)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _root_cause(err: BaseException) -> BaseException:
    """The innermost exception: what went wrong, not the wrapper Hydra's instantiate adds."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def _is_multirun_job() -> bool:
    if not HydraConfig.initialized():
        return False
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return HydraConfig.get().mode == RunMode.MULTIRUN and rank_zero_only.rank == 0


def _is_slurm_run() -> bool:
    """A single run in the run folder a SLURM batch job gets by default
    (`core.config.run_name`: `slurm-<job>-<digest of the overrides>`), which the requeued
    job finds again. A run folder the user names (`hydra.run.dir=`) is an ordinary run."""
    job = slurm_job()
    if not HydraConfig.initialized() or job is None:
        return False
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    name = Path(HydraConfig.get().runtime.output_dir).name
    return name.startswith(f"slurm-{job}-") and rank_zero_only.rank == 0


def run_job(cfg: DictConfig, work: Callable[[DictConfig], dict[str, Any]]) -> dict[str, Any]:
    """Run `work(cfg)` (a training run); inside a multirun, make it skippable, resumable
    and contained: a failure is recorded and returned, never raised. A single run in a
    SLURM batch job is skippable and resumable the same way (a requeued job resumes from
    its `last.ckpt`), and its failures are raised as usual. On SIGTERM or SIGINT the job
    is recorded as interrupted (a sweep also writes its summary so far) and the
    `Interrupted` goes on up, so the command ends with one line and status 128 + signal."""
    multirun = _is_multirun_job()
    if not multirun and not _is_slurm_run():
        with isolated_job(parallel_jobs=1):
            return work(cfg)

    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    previous = read_status(job_dir)
    if previous and previous.get("overrides") != overrides:
        where = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        message = (
            f"{job_dir} holds a job with other overrides ({previous.get('overrides')}); "
            f"use a new {where}"
        )
        if not multirun:
            raise ConfigError(message)
        log.error("Job %s not run: %s", job_dir.name, message)
        return {"status": "failed", "error": message}
    metrics_file = job_dir / "metrics.json"
    finished = read_json(metrics_file)
    if previous and previous.get("status") in ("done", "pruned") and finished is not None:
        log.info("Job %s finished in an earlier run: skipping it", job_dir.name)
        return {**finished, "skipped": True}

    last = job_dir / "checkpoints" / "last.ckpt"
    if previous and last.exists() and cfg.get("ckpt_path") is None:
        with open_dict(cfg):
            cfg.ckpt_path = str(last)
        log.info("Job %s was %s: resuming from %s", job_dir.name, previous.get("status"), last)

    attempt = int((previous or {}).get("attempts", 0)) + 1
    write_status(
        job_dir,
        status="running",
        overrides=overrides,
        attempts=attempt,
        host=socket.gethostname(),
        pid=os.getpid(),
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        error=None,
    )
    sweep_dir = Path(str(hydra_cfg.sweep.dir))
    try:
        if multirun:
            with isolated_job(_parallel_jobs(hydra_cfg)), pinned_gpu(cfg, sweep_dir):
                metrics = work(cfg)
        else:
            with isolated_job(parallel_jobs=1):
                metrics = work(cfg)
    except Exception as err:
        user_error = find_user_error(err)
        root = _root_cause(err)
        message = str(user_error) if user_error else f"{type(root).__name__}: {root}"
        write_status(job_dir, status="failed", error=message.splitlines()[0] if message else "")
        if not multirun:
            raise
        if user_error:
            log.error("Job %s failed: %s", job_dir.name, message)
        else:
            log.exception("Job %s failed", job_dir.name)
        return {"status": "failed", "error": message}
    except Interrupted as stop:
        write_status(job_dir, status="interrupted")
        if multirun:
            stop.sweep_dir, stop.job = str(sweep_dir), job_dir.name
            _report_so_far(sweep_dir, cfg.get("optimized_metric"))
        raise
    except BaseException:
        write_status(job_dir, status="interrupted")
        raise
    metric = metrics.get(cfg.get("optimized_metric") or "best_val_acc")
    pruned = metrics.get("pruned_epoch")
    if pruned is not None:  # an Optuna trial its pruner stopped: finished, not failed
        write_status(job_dir, status="pruned", metric=metric, pruned_epoch=pruned)
    else:
        write_status(job_dir, status="done", metric=metric)
    return metrics


def _report_so_far(sweep_dir: Path, metric: str | None) -> None:
    """The summary of an interrupted sweep (Hydra's end-of-sweep callback never runs)."""
    try:
        write_report(sweep_dir, metric=metric)
    except Exception as err:  # the interruption is what the user must hear about
        log.warning("Could not write the sweep report for %s: %s", sweep_dir, error_line(err))


class SweepReportCallback(Callback):
    """Hydra callback: when a multirun ends, write its summary table and plots."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            summary = write_report(sweep_dir, metric=config.get("optimized_metric"))
        except Exception:
            log.exception("Could not write the sweep report for %s", sweep_dir)
            return
        counts = summary["status"].value_counts().to_dict() if len(summary) else {}
        log.info(
            "Sweep finished: %s. Summary: %s",
            ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no jobs",
            sweep_dir / "summary.md",
        )
