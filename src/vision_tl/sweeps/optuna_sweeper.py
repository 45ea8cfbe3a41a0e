"""vision_tl's Optuna search: one worker per invocation, asking, running and telling trials.

The Hydra plugin (`hydra_plugins.vision_tl_optuna_sweeper`) hands each sweep to
`OptunaWorker`. A worker joins the study (`sweeps.study`), asks for a trial, runs it as a
job through Hydra's launcher in `<hydra.sweep.dir>/<trial number>` (numbers are unique in
the study, so N workers never share a folder), tells its result, and asks again, until the
study holds `n_trials` trials: every worker's done, pruned and failed trials count, as do
the ones other workers are running. So N machines running the same line share one search.

The search space is written as before (`hydra.sweeper.params` and sweep overrides on the
command line): `choice(a, b)`, `a,b`, `range(a, b, step)`, `interval(a, b)`, `tag(log,
interval(a, b))`, parsed by Hydra's own override parser; the mapping to Optuna's
distributions is here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vision_tl.core.errors import ConfigError
from vision_tl.core.io import write_text
from vision_tl.core.logs import quiet_third_party
from vision_tl.sweeps.status import read_status
from vision_tl.sweeps.study import (
    IN_PROCESS,
    StudySettings,
    ask_lock,
    build_pruner,
    open_storage,
    retried_number,
    trial_id,
)

log = logging.getLogger(__name__)

# How often a worker with nothing left to ask looks whether a trial running elsewhere
# finished, or went stale and came back to be retried.
WAIT_POLL_S = 2.0
# The key of the job's config that says which trial it is (conf/train.yaml: `trial`).
TRIAL_KEY = "trial"


def _distribution(override: Any) -> Any:
    """The Optuna distribution of one sweep override (`choice`, `range`, `interval`)."""
    from hydra.core.override_parser.types import Glob, Transformer
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    key = override.get_key_element()
    value = override.value()
    if isinstance(value, Glob):
        pass  # config group names: nothing Optuna can sample
    elif override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        if not choices or not all(isinstance(c, str | int | float | bool) for c in choices):
            raise ConfigError(f"{override.input_line}: a choice of numbers, strings or booleans")
        return CategoricalDistribution(choices)
    elif override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values:
            raise ConfigError(f"{override.input_line}: the range is empty")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step))
        return FloatDistribution(values[0], values[-1], step=float(value.step))
    elif override.is_interval_sweep():
        log_scale = "log" in value.tags
        start, end = value.start, value.end
        if isinstance(start, int) and isinstance(end, int):
            return IntDistribution(start, end, log=log_scale)
        try:
            return FloatDistribution(float(start), float(end), log=log_scale)
        except ValueError as err:
            raise ConfigError(f"{override.input_line}: {err}") from None
    raise ConfigError(
        f"{key}: {override.input_line} cannot be searched; use choice(...), range(...), "
        "interval(a, b) or tag(log, interval(a, b))"
    )


def search_space(params: dict[str, Any], arguments: Sequence[str]) -> tuple[dict[str, Any], list]:
    """The distributions to search and the fixed overrides every trial gets, from the
    sweeper's `params` and the command line (a plain `key=value` there fixes `key`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    lines = [f"{k}={v}" for k, v in (params or {}).items()]
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in parser.parse_overrides([*lines, *arguments]):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = _distribution(override)
        else:
            fixed[key] = str(override.input_line)
    return space, list(fixed.values())


def worker_id(configured: int | None) -> int:
    """This worker's number, which offsets the sampler's seed: the configured one, a SLURM
    array task's id, else one derived from host and process id, so two workers started at
    the same moment still draw different first trials."""
    if configured is not None:
        return int(configured)
    array_task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_task and array_task.isdigit():
        return int(array_task)
    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) % 100_000


@dataclass
class Tally:
    """What the study holds, as a worker counts it against `n_trials`."""

    counted: int
    waiting: int
    running: int


def tally(study: Any) -> Tally:
    """Trials that count: every one, whatever its state, except queued ones and failed ones
    that a retry replaces (the retry counts instead)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {retried_number(t) for t in trials} - {None}
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    counted = sum(t.state != TrialState.WAITING and t.number not in retried for t in trials)
    return Tally(counted=counted, waiting=waiting, running=running)


class Heartbeat:
    """Record the trial's heartbeat while its job runs (the storage fails it when this stops:
    a worker killed mid-trial), on storages with heartbeats; nothing elsewhere."""

    def __init__(self, storage: Any, trial: int | None, interval: float | None) -> None:
        self.storage, self.trial, self.interval = storage, trial, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.trial is not None and self.interval:
            self.storage.record_heartbeat(self.trial)
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial)
            except Exception as err:  # a storage hiccup must not end the trial
                log.warning("Heartbeat of trial %s not recorded: %s", self.trial, err)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# (overrides of each job, the first job's number) -> one JobReturn per job.
Launch = Callable[[Sequence[Sequence[str]], int], Sequence[Any]]


class OptunaWorker:
    """One worker of a study: asks, runs through Hydra's launcher, tells, until the cap."""

    def __init__(
        self,
        settings: StudySettings,
        sampler: Callable[[int | None], Any],
        n_trials: int,
        n_jobs: int,
        sweep_dir: Path,
        launch: Launch,
        worker: int,
    ) -> None:
        self.settings = settings
        self.n_trials = int(n_trials)
        self.n_jobs = max(1, int(n_jobs))
        self.sweep_dir = Path(sweep_dir)
        self.launch = launch
        self.worker = worker
        with ask_lock(settings):  # two workers creating one SQLite schema collide
            self.storage = open_storage(settings)
        self.sampler = sampler(worker)
        self.exhausted = False
        self.heartbeat = (
            settings.heartbeat_interval if hasattr(self.storage, "record_heartbeat") else None
        )

    def open(self) -> Any:
        """Create the study, or join it when another worker (or an earlier run) has."""
        import optuna

        with ask_lock(self.settings):
            study = optuna.create_study(
                study_name=self.settings.study_name,
                storage=self.storage,
                sampler=self.sampler,
                pruner=build_pruner(self.settings.pruner, self.settings.pruner_args),
                direction=self.settings.direction,
                load_if_exists=True,
            )
        if self.settings.kind == "memory":
            IN_PROCESS[self.settings.study_name] = (study, self.storage)
        return study

    def run(self, space: dict[str, Any], fixed: list[str]) -> Any:
        """Ask, run and tell until the study holds `n_trials` trials; returns the study."""
        import optuna

        study = self.open()
        log.info(
            "Optuna study %s (%s storage), worker %d: %d trials in all, pruner %s",
            study.study_name,
            self.settings.kind,
            self.worker,
            self.n_trials,
            self.settings.pruner,
        )
        while not self.exhausted:
            quiet_third_party()  # Optuna's warnings, also after a job reset the filters
            optuna.storages.fail_stale_trials(study)
            trials = self._ask(study, space)
            if trials is None:
                break
            if not trials:  # others still run the last trials: wait for them or their death
                threading.Event().wait(min(float(self.heartbeat or 1), WAIT_POLL_S))
                continue
            self._run(study, trials, fixed)
        return study

    def _ask(self, study: Any, space: dict[str, Any]) -> list[Any] | None:
        """Up to `n_jobs` new trials; [] to wait for trials running elsewhere (whose retry
        may come), None when the study is complete."""
        with ask_lock(self.settings):
            count = tally(study)
            free = self.n_trials - count.counted + count.waiting
            if free <= 0:
                return [] if count.running and self.heartbeat else None
            return [study.ask(space) for _ in range(min(free, self.n_jobs))]

    def _run(self, study: Any, trials: list[Any], fixed: list[str]) -> None:
        numbers = [t.number for t in trials]
        jobs = [[*fixed, *self._overrides(t), f"{TRIAL_KEY}={t.number}"] for t in trials]
        consecutive = numbers == list(range(numbers[0], numbers[0] + len(numbers)))
        batches = (
            [(jobs, numbers)]
            if consecutive
            else [([j], [n]) for j, n in zip(jobs, numbers, strict=True)]
        )
        for batch, batch_numbers in batches:
            with contextlib.ExitStack() as beats:
                for number in batch_numbers:
                    trial = self._trial_id(study, number)
                    beats.enter_context(Heartbeat(self.storage, trial, self.heartbeat))
                try:
                    returns = self.launch(batch, batch_numbers[0])
                except BaseException:  # interrupted (a signal): the trials end here
                    for number in batch_numbers:
                        self._record(study, number, state="FAIL")
                    raise
            for number, job in zip(batch_numbers, returns, strict=True):
                self._tell(study, number, job)

    def _trial_id(self, study: Any, number: int) -> int | None:
        return trial_id(study, self.storage, number) if self.heartbeat else None

    @staticmethod
    def _overrides(trial: Any) -> list[str]:
        return [f"{key}={value}" for key, value in trial.params.items()]

    def _tell(self, study: Any, number: int, job: Any) -> None:
        """Tell the study how trial `number` ended: its value, pruned (the job's
        `job_status.json` says so) or failed (an error, or no value)."""
        from hydra.core.utils import JobStatus

        job_dir = self._job_dir(job, number)
        status = (read_status(job_dir) or {}).get("status")
        value = job.return_value if job.status == JobStatus.COMPLETED else None
        try:
            number_value = float(value)
        except (TypeError, ValueError):
            number_value = math.nan
        if status == "pruned":
            self._record(study, number, state="PRUNED")
            log.info("Trial %d pruned", number)
        elif math.isnan(number_value):
            self._record(study, number, state="FAIL")
            log.warning("Trial %d failed (%s)", number, status or "no value")
        else:
            self._record(study, number, value=number_value)
            log.info("Trial %d: %s", number, number_value)

    def _record(self, study: Any, number: int, value: float | None = None, state: str = "") -> None:
        """`study.tell`; a sampler that has run out of points (grid, brute force) asks to
        stop the study from inside its tell: the trial is stored, and this worker stops."""
        try:
            study.tell(
                number, value, state=optuna_state(state) if state else None, skip_if_finished=True
            )
        except RuntimeError as err:
            if "Study.stop" not in str(err):
                raise
            log.info("The sampler has tried every point of the search space")
            self.exhausted = True

    def _job_dir(self, job: Any, number: int) -> Path:
        try:
            return Path(str(job.hydra_cfg.hydra.runtime.output_dir))
        except AttributeError:
            return self.sweep_dir / str(number)


def optuna_state(name: str) -> Any:
    from optuna.trial import TrialState

    return TrialState[name]


def write_results(study: Any, path: Path) -> None:
    """`optimization_results.yaml`: the best trial so far over every worker's trials."""
    import yaml
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        log.warning("No trial of study %s completed: no best value", study.study_name)
        return
    best = study.best_trial
    results = {
        "name": "optuna",
        "study_name": study.study_name,
        "best_trial": best.number,
        "best_params": best.params,
        "best_value": best.value,
    }
    write_text(path, yaml.safe_dump(results, sort_keys=False))
