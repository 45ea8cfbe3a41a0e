"""The Optuna study a search shares between its workers and its jobs: storages and pruners.

The sweeper (`sweeps.optuna_sweeper`) opens the study to ask and tell trials; a job opens
it again, from the same `hydra.sweeper` settings, to report `val/acc` and ask whether to
stop (`sweeps.pruning`). Both go through `open_storage`, so a storage string means the same
thing on every side:

- none: in memory, this process only. Jobs the basic launcher runs in this process find
  the study through `IN_PROCESS`; jobs in other processes (joblib, SLURM) cannot report,
  so they are not pruned (one logged line says so).
- `sqlite:///FILE`, `postgresql://...` (any SQLAlchemy URL): Optuna's RDB storage, with
  heartbeats (`heartbeat_interval`) so a killed worker's trial is failed and retried.
- `journal:PATH`: Optuna's `JournalStorage` on a file (a shared file system), no server.
- `grpc://HOST:PORT`: Optuna's `GrpcStorageProxy` to a `run_grpc_proxy_server`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vision_tl.core.errors import ConfigError
from vision_tl.core.io import file_lock
from vision_tl.core.registry import Registry

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

# Studies kept in this process's memory (storage none), by name, with their storage: how a
# job the basic launcher runs in the sweeper's own process reaches its trial.
IN_PROCESS: dict[str, tuple[optuna.Study, Any]] = {}

# `hydra.sweeper.pruner` names -> Optuna's pruner classes (`optuna.pruners`): adding one is
# one entry. `threshold` prunes below fixed values, e.g. `lower`: an accuracy no trial may
# fall under.
PRUNERS: Registry[str] = Registry("pruner")
for _name, _pruner in {
    "none": "NopPruner",
    "median": "MedianPruner",
    "hyperband": "HyperbandPruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "threshold": "ThresholdPruner",
}.items():
    PRUNERS.add(_name, _pruner)


def build_pruner(name: str | None, args: dict[str, Any] | None = None) -> Any:
    """The pruner `hydra.sweeper.pruner` names, with `hydra.sweeper.pruner_args`."""
    import optuna

    pruner = getattr(optuna.pruners, PRUNERS.get(str(name or "none")))
    try:
        return pruner(**dict(args or {}))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"hydra.sweeper.pruner_args={dict(args or {})}: {err}") from None


@dataclass(frozen=True)
class StudySettings:
    """What names the study and how to reach it: the same on the sweeper's and the jobs' side."""

    study_name: str
    storage: str | None = None
    direction: str = "maximize"
    pruner: str = "none"
    pruner_args: dict[str, Any] = field(default_factory=dict)
    heartbeat_interval: int | None = 60
    grace_period: int | None = None
    max_retry: int | None = 1

    @classmethod
    def from_config(cls, sweeper: Any) -> StudySettings:
        """From the `hydra.sweeper` node (a DictConfig or a mapping)."""
        from omegaconf import OmegaConf

        node = sweeper if isinstance(sweeper, dict) else OmegaConf.to_container(sweeper)
        storage = node.get("storage")
        return cls(
            study_name=str(node.get("study_name") or "vision_tl"),
            storage=None if storage in (None, "", "none", "memory") else str(storage),
            direction=str(node.get("direction") or "maximize"),
            pruner=str(node.get("pruner") or "none"),
            pruner_args=dict(node.get("pruner_args") or {}),
            heartbeat_interval=node.get("heartbeat_interval"),
            grace_period=node.get("grace_period"),
            max_retry=node.get("max_retry"),
        )

    @property
    def kind(self) -> str:
        """memory, rdb, journal or grpc."""
        if self.storage is None:
            return "memory"
        if self.storage.startswith("journal:"):
            return "journal"
        if self.storage.startswith("grpc://"):
            return "grpc"
        if "://" in self.storage:
            return "rdb"
        raise ConfigError(
            f"hydra.sweeper.storage={self.storage}: one of null (in memory), sqlite:///FILE, "
            "postgresql://USER@HOST/DB, journal:PATH, grpc://HOST:PORT"
        )

    def local_file(self) -> Path | None:
        """The storage's file when it is one (SQLite, Journal): workers lock beside it."""
        if self.kind == "journal":
            return Path(self.storage.removeprefix("journal:")).expanduser()
        if self.kind == "rdb" and self.storage.startswith("sqlite:///"):
            path = self.storage.removeprefix("sqlite:///")
            return None if path in ("", ":memory:") else Path(path).expanduser()
        return None


def _retry_callback(max_retry: int | None) -> Any:
    """Optuna's callback that re-queues a trial whose heartbeat stopped (renamed in 4.9)."""
    import optuna

    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    return (retry or optuna.storages.RetryFailedTrialCallback)(max_retry=max_retry)


def retried_number(trial: Any) -> int | None:
    """The number of the trial `trial` retries (None for a first attempt)."""
    import optuna

    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    return (retry or optuna.storages.RetryFailedTrialCallback).retried_trial_number(trial)


def open_storage(settings: StudySettings) -> Any:
    """The Optuna storage `settings.storage` names (a new one, for storage none)."""
    import optuna

    kind = settings.kind
    if kind == "memory":
        return optuna.storages.InMemoryStorage()
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = settings.local_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if kind == "grpc":
        return _grpc_proxy(settings.storage)
    path = settings.local_file()
    engine: dict[str, Any] = {}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Several workers write one SQLite file: wait for its lock rather than fail.
        engine = {"connect_args": {"timeout": 60}}
    heartbeat: dict[str, Any] = {}
    if settings.heartbeat_interval:
        retry = _retry_callback(settings.max_retry)
        new_name = "heartbeat_stale_trial_callback"
        import inspect

        params = inspect.signature(optuna.storages.RDBStorage).parameters
        name = new_name if new_name in params else "failed_trial_callback"
        heartbeat = {
            "heartbeat_interval": int(settings.heartbeat_interval),
            "grace_period": settings.grace_period,
            name: retry,
        }
    try:
        return optuna.storages.RDBStorage(settings.storage, engine_kwargs=engine, **heartbeat)
    except ImportError as err:
        raise ConfigError(
            f"hydra.sweeper.storage={settings.storage}: its database driver is not installed "
            f"({err})"
        ) from None


# How long a worker waits for the gRPC storage proxy to answer before a one-line error.
GRPC_READY_S = 30.0


def _grpc_proxy(url: str) -> Any:
    """Optuna's gRPC storage proxy client (needs grpcio, Optuna's `grpc` extra)."""
    import optuna

    host, _, port = url.removeprefix("grpc://").rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"hydra.sweeper.storage={url}: write grpc://HOST:PORT")
    proxy = getattr(optuna.storages, "GrpcStorageProxy", None)
    if proxy is None:
        raise ConfigError(f"hydra.sweeper.storage={url}: this Optuna has no gRPC storage proxy")
    try:
        client = proxy(host=host, port=int(port))
        client.wait_server_ready(timeout=GRPC_READY_S)
    except ImportError as err:
        raise ConfigError(
            f"hydra.sweeper.storage={url}: the gRPC proxy needs grpcio "
            f"(pip install 'optuna[grpc]'): {err}"
        ) from None
    except ConnectionError:
        raise ConfigError(
            f"hydra.sweeper.storage={url}: no gRPC storage proxy answered in {GRPC_READY_S:g} s "
            "(start one with optuna.storages.run_grpc_proxy_server)"
        ) from None
    return client


def load_study(settings: StudySettings) -> tuple[optuna.Study, Any] | None:
    """The existing study `settings` names, with its pruner, and its storage (None when an
    in-memory study lives in another process)."""
    import optuna

    if settings.kind == "memory":
        return IN_PROCESS.get(settings.study_name)
    storage = open_storage(settings)
    pruner = build_pruner(settings.pruner, settings.pruner_args)
    study = optuna.load_study(study_name=settings.study_name, storage=storage, pruner=pruner)
    return study, storage


def trial_id(study: optuna.Study, storage: Any, number: int) -> int:
    """The storage's id of trial `number` (Optuna's public storage API)."""
    study_id = storage.get_study_id_from_name(study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


@contextlib.contextmanager
def ask_lock(settings: StudySettings) -> Iterator[None]:
    """Held while a worker counts the study's trials and asks for one, so two workers
    never both take the last one. A lock file beside a SQLite or Journal file (a POSIX
    lock: released when its process dies); nothing for a server storage, where a worker
    may start one trial past the cap."""
    path = settings.local_file()
    if path is None:
        yield
        return
    with file_lock(path.with_name(path.name + ".ask.lock")):
        yield


def open_job_trial(number: int) -> Any:
    """Optuna trial `number` of the study this Hydra job's sweeper names, for the job's
    pruning callback (`training.callbacks.TrialPruning`), on rank 0; None, with one logged
    line, when the study cannot be reached from here (the run is worth more than its
    pruning)."""
    import optuna
    from hydra.core.hydra_config import HydraConfig

    from vision_tl.core.errors import error_line

    sweeper = HydraConfig.get().sweeper if HydraConfig.initialized() else None
    if sweeper is None or "study_name" not in sweeper:
        log.info("Trial %d is not pruned: this run has no Optuna sweeper settings", number)
        return None
    try:
        found = load_study(StudySettings.from_config(sweeper))
        if found is None:
            log.info(
                "Trial %d is not pruned: its in-memory study lives in another process "
                "(give hydra.sweeper.storage a file or a server to prune there)",
                number,
            )
            return None
        study, storage = found
        return optuna.trial.Trial(study, trial_id(study, storage, number))
    except Exception as err:
        log.warning("Trial %d is not pruned: %s", number, error_line(err))
        return None
