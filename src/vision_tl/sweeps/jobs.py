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
from vision_tl.core.launch import (
    Launch,
    adopt,
    all_agree,
    from_rank_zero,
    handed_over,
    join,
    launch_from_trainer,
    local_handoff,
)
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
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _is_slurm_run() -> bool:
    """A single run in the run folder a SLURM batch job gets by default
    (`core.config.run_name`: `slurm-<job>-<digest of the overrides>`), which the requeued
    job finds again. A run folder the user names (`hydra.run.dir=`) is an ordinary run."""
    job = slurm_job()
    if not HydraConfig.initialized() or job is None:
        return False
    name = Path(HydraConfig.get().runtime.output_dir).name
    return name.startswith(f"slurm-{job}-")


# The name under which rank 0 hands its job decision to the local ranks Lightning starts.
DECISION = "job decision"


def _handed_decision(launch: Launch) -> dict[str, Any] | None:
    """What rank 0 decided for this job, when Lightning started this process as one of
    its local ranks (`core.launch.local_handoff`)."""
    if launch.launcher != "lightning" or launch.main:
        return None
    return handed_over(DECISION)


def _decide(cfg: DictConfig, job_dir: Path, overrides: list[str], multirun: bool) -> dict[str, Any]:
    """Skip, resume or start the job in `job_dir`, from its files alone (`job_status.json`,
    `metrics.json`, `checkpoints/last.ckpt`): made on rank 0 and sent to every rank, so all
    of them make the same one."""
    previous = read_status(job_dir)
    decision: dict[str, Any] = {"error": None, "skip": None, "ckpt_path": None}
    decision["attempt"] = int((previous or {}).get("attempts", 0)) + 1
    decision["previous"] = (previous or {}).get("status")
    if previous and previous.get("overrides") != overrides:
        where = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        decision["error"] = (
            f"{job_dir} holds a job with other overrides ({previous.get('overrides')}); "
            f"use a new {where}"
        )
        return decision
    finished = read_json(job_dir / "metrics.json")
    if previous and previous.get("status") in ("done", "pruned") and finished is not None:
        decision["skip"] = finished
        return decision
    last = job_dir / "checkpoints" / "last.ckpt"
    if previous and last.exists() and cfg.get("ckpt_path") is None:
        decision["ckpt_path"] = str(last)
    return decision


def run_job(cfg: DictConfig, work: Callable[[DictConfig], dict[str, Any]]) -> dict[str, Any]:
    """Run `work(cfg)` (a training run); inside a multirun, make it skippable, resumable
    and contained: a failure is recorded and returned, never raised. A single run in a
    SLURM batch job, and a run of several processes that its launcher started (torchrun,
    srun, `NODE_RANK`), are skippable and resumable the same way (a requeued or rerun job
    resumes from its `last.ckpt`), and their failures are raised as usual. Every rank
    makes rank 0's decision; only rank 0 writes the job's files. On SIGTERM or SIGINT the
    job is recorded as interrupted (a sweep also writes its summary so far) and the
    `Interrupted` goes on up, so the command ends with one line and status 128 + signal."""
    launch = launch_from_trainer(cfg.trainer)
    adopt(launch)
    multirun = _is_multirun_job()
    handed = _handed_decision(launch)
    if not (multirun or launch.external or handed is not None or _is_slurm_run()):
        with isolated_job(parallel_jobs=1), local_handoff(launch):
            return work(cfg)
    hydra_cfg = HydraConfig.get()
    with isolated_job(_parallel_jobs(hydra_cfg) if multirun else 1), local_handoff(launch):
        if join(launch, str(cfg.trainer.get("accelerator", "auto"))):
            log.info("Process group open before training: this is %s", launch.describe())
        return _tracked_job(cfg, work, launch, multirun, handed)


def _tracked_job(
    cfg: DictConfig,
    work: Callable[[DictConfig], dict[str, Any]],
    launch: Launch,
    multirun: bool,
    handed: dict[str, Any] | None,
) -> dict[str, Any]:
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    all_agree(
        str(job_dir.absolute()),
        "the run folder: give every node the same hydra.run.dir, on a file system they share",
    )
    overrides = list(hydra_cfg.overrides.task)
    decision = handed or from_rank_zero(
        lambda: _decide(cfg, job_dir, overrides, multirun), handoff=DECISION
    )
    if decision["error"]:
        if not multirun:
            raise ConfigError(decision["error"])
        log.error("Job %s not run: %s", job_dir.name, decision["error"])
        return {"status": "failed", "error": decision["error"]}
    if decision["skip"] is not None:
        log.info("Job %s finished in an earlier run: skipping it", job_dir.name)
        return {**decision["skip"], "skipped": True}
    if decision["ckpt_path"]:
        with open_dict(cfg):
            cfg.ckpt_path = decision["ckpt_path"]
        log.info(
            "Job %s was %s: resuming from %s", job_dir.name, decision["previous"], cfg.ckpt_path
        )

    def record(**fields: Any) -> None:
        if launch.main:
            write_status(job_dir, **fields)

    record(
        status="running",
        overrides=overrides,
        attempts=decision["attempt"],
        host=socket.gethostname(),
        pid=os.getpid(),
        world_size=launch.world_size,
        started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        error=None,
    )
    sweep_dir = Path(str(hydra_cfg.sweep.dir))
    try:
        if multirun:
            with pinned_gpu(cfg, sweep_dir):
                metrics = work(cfg)
        else:
            metrics = work(cfg)
    except Exception as err:
        user_error = find_user_error(err)
        root = _root_cause(err)
        message = str(user_error) if user_error else f"{type(root).__name__}: {root}"
        record(status="failed", error=message.splitlines()[0] if message else "")
        if not multirun:
            raise
        if user_error:
            log.error("Job %s failed: %s", job_dir.name, message)
        else:
            log.exception("Job %s failed", job_dir.name)
        return {"status": "failed", "error": message}
    except Interrupted as stop:
        record(status="interrupted")
        if multirun and launch.main:
            stop.sweep_dir, stop.job = str(sweep_dir), job_dir.name
            _report_so_far(sweep_dir, cfg.get("optimized_metric"))
        raise
    except BaseException:
        record(status="interrupted")
        raise
    metric = metrics.get(cfg.get("optimized_metric") or "best_val_acc")
    pruned = metrics.get("pruned_epoch")
    if pruned is not None:  # an Optuna trial its pruner stopped: finished, not failed
        record(status="pruned", metric=metric, pruned_epoch=pruned)
    else:
        record(status="done", metric=metric)
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
