"""vision_tl's Optuna sweeper: the search grammar, storages, workers sharing one study,
pruned and failed trials, a worker killed mid-trial."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import TINY, make_image_folder, run_cli
from helpers.net import free_port
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from vision_tl.core.cli import check_command_line
from vision_tl.core.errors import ConfigError
from vision_tl.sweeps import study as study_module
from vision_tl.sweeps.optuna_sweeper import OptunaWorker, search_space, tally
from vision_tl.sweeps.status import read_status
from vision_tl.sweeps.study import PRUNERS, StudySettings, build_pruner, open_storage

HELPERS = Path(__file__).parent / "helpers"
# One epoch of the smallest network on 32-pixel images: a trial takes seconds.
TRIAL_TINY = [
    *[o for o in TINY if not o.startswith(("trainer.max_epochs=", "data.batch_size="))],
    "trainer.max_epochs=1",
    "model.backbone.name=timm/test_efficientnet",
    "logger=none",
    "test=false",
]


@pytest.fixture(scope="module")
def optuna_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("optuna") / "data", per_class=4, size=32)


def test_search_space_is_hydra_grammar_mapped_to_optuna() -> None:
    params = {
        "optimizer.lr": "tag(log, interval(1e-5, 1e-1))",
        "optimizer.weight_decay": "interval(0.0, 0.1)",
        "data.batch_size": "choice(8, 16, 32)",
        "trainer.max_epochs": "range(2, 8, 2)",
        "model.head.dropout": "interval(0.0, 0.6)",
    }
    space, fixed = search_space(
        params, ["model.head.dropout=0.2", "model=resnet50,mobilenet_v2", "+x.y=3"]
    )
    assert space["optimizer.lr"] == FloatDistribution(1e-5, 1e-1, log=True)
    assert space["optimizer.weight_decay"] == FloatDistribution(0.0, 0.1)
    assert space["data.batch_size"] == CategoricalDistribution([8, 16, 32])
    # range's stop is exclusive, as in a Hydra sweep: 2, 4, 6.
    assert space["trainer.max_epochs"] == IntDistribution(2, 6, step=2)
    assert space["model"] == CategoricalDistribution(["resnet50", "mobilenet_v2"])
    # A plain value on the command line fixes the key: it leaves the search space.
    assert "model.head.dropout" not in space
    assert fixed == ["model.head.dropout=0.2", "+x.y=3"]
    with pytest.raises(ConfigError, match="cannot be searched"):
        search_space({"data.root": "glob(*)"}, [])


def test_storage_strings_and_pruners(tmp_path: Path) -> None:
    def settings(storage: str | None) -> StudySettings:
        return StudySettings.from_config({"study_name": "s", "storage": storage})

    assert settings(None).kind == "memory" and settings("none").kind == "memory"
    assert settings("sqlite:///a.db").local_file() == Path("a.db")
    assert settings("postgresql://u@h/db").kind == "rdb"
    assert settings("postgresql://u@h/db").local_file() is None
    journal = settings(f"journal:{tmp_path}/sub/study.log")
    assert journal.kind == "journal"
    assert isinstance(open_storage(journal), optuna.storages.JournalStorage)
    assert (tmp_path / "sub" / "study.log").is_file()
    with pytest.raises(ConfigError, match=r"^hydra\.sweeper\.storage=study\.db: one of null"):
        _ = settings("study.db").kind
    with pytest.raises(ConfigError, match="write grpc://HOST:PORT"):
        open_storage(settings("grpc://nohost"))
    assert PRUNERS.names() == ["hyperband", "median", "none", "successive_halving", "threshold"]
    assert isinstance(build_pruner("median", {"n_startup_trials": 2}), optuna.pruners.MedianPruner)
    with pytest.raises(ConfigError, match=r"unknown pruner .medain.*did you mean median"):
        build_pruner("medain")
    with pytest.raises(ConfigError, match=r"^hydra\.sweeper\.pruner_args="):
        build_pruner("median", {"no_such_argument": 1})


def test_hydra_finds_the_sweeper_in_its_plugin_namespace() -> None:
    found = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Sweeper)}
    assert "hydra_plugins.vision_tl_optuna_sweeper.optuna_sweeper.OptunaSweeper" in found
    assert not any("hydra_optuna_sweeper" in name for name in found)


# Worker processes with a job that needs no training: what is tested is the study they
# share (cap, numbers, heartbeats), through real storages and real processes.
def _worker(storage: str, n_trials: int, sweep_dir: str, hang: bool, heartbeat: int) -> None:
    settings = StudySettings.from_config(
        {
            "study_name": "shared",
            "storage": storage,
            "heartbeat_interval": heartbeat,
            "grace_period": 2 * heartbeat,
        }
    )

    def launch(jobs: list[list[str]], first: int) -> list[JobReturn]:
        if hang:
            Path(sweep_dir, f"hanging_{first}").touch()
            time.sleep(600)
        returns = []
        for index, job in enumerate(jobs):
            Path(sweep_dir, str(first + index)).mkdir()  # a second job here would fail
            x = float(next(o for o in job if o.startswith("x=")).split("=")[1])
            time.sleep(0.1)
            returns.append(JobReturn(status=JobStatus.COMPLETED, _return_value=-((x - 1) ** 2)))
        return returns

    worker = OptunaWorker(
        settings,
        lambda worker: optuna.samplers.TPESampler(seed=worker, constant_liar=True),
        n_trials=n_trials,
        n_jobs=1,
        sweep_dir=Path(sweep_dir),
        launch=launch,
        worker=os.getpid(),
    )
    space, fixed = search_space({"x": "interval(-3.0, 3.0)"}, [])
    worker.run(space, fixed)


def _start(*args) -> multiprocessing.Process:
    process = multiprocessing.get_context("spawn").Process(target=_worker, args=args)
    process.start()
    return process


@pytest.mark.slow
def test_worker_processes_share_one_journal_study_and_its_cap(tmp_path: Path) -> None:
    """Two workers on one Journal file (SQLite: tests/test_sweep.py, through the command
    line): 6 trials, 6 numbers, 6 job folders, none run twice."""
    storage = f"journal:{tmp_path}/s.log"
    workers = [_start(storage, 6, str(tmp_path), False, 60) for _ in range(2)]
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    study = optuna.load_study(
        study_name="shared",
        storage=open_storage(
            StudySettings.from_config({"study_name": "shared", "storage": storage})
        ),
    )
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(6))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == list(range(6))


# Optuna's own gRPC storage proxy in front of a SQLite file, as a user starts one.
GRPC_SERVER = """
import sys
from optuna.storages import get_storage, run_grpc_proxy_server
run_grpc_proxy_server(get_storage(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]))
"""


@pytest.mark.integration
def test_a_worker_keeps_its_study_behind_a_grpc_proxy(tmp_path: Path) -> None:
    """`storage=grpc://HOST:PORT`: the worker's trials pass through a real proxy server on
    loopback into the database behind it; no server there is a one-line error."""
    database, port = f"sqlite:///{tmp_path}/behind.db", free_port()
    server = subprocess.Popen([sys.executable, "-c", GRPC_SERVER, database, str(port)])
    try:
        _worker(f"grpc://127.0.0.1:{port}", 3, str(tmp_path), False, 0)
    finally:
        server.kill()
        server.wait(30)
    trials = optuna.load_study(study_name="shared", storage=database).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE and -16 <= t.value <= 0 for t in trials)
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [0, 1, 2]


def test_no_grpc_proxy_at_the_address_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(study_module, "GRPC_READY_S", 0.2)
    settings = StudySettings.from_config(
        {"study_name": "s", "storage": f"grpc://127.0.0.1:{free_port()}"}
    )
    with pytest.raises(ConfigError, match=r"^hydra\.sweeper\.storage=grpc://.*no gRPC storage"):
        open_storage(settings)


@pytest.mark.slow
def test_a_killed_workers_trial_is_retried_by_the_other(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path}/s.db"
    hanging = _start(storage, 4, str(tmp_path), True, 1)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("hanging_*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    (marker,) = tmp_path.glob("hanging_*")
    os.kill(hanging.pid, signal.SIGKILL)
    hanging.join()
    survivor = _start(storage, 4, str(tmp_path), False, 1)
    survivor.join(120)
    assert survivor.exitcode == 0
    study = optuna.load_study(study_name="shared", storage=storage)
    trials = study.get_trials()
    killed = int(marker.name.split("_")[1])
    states = {t.number: t.state for t in trials}
    assert states[killed] == TrialState.FAIL
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 4 and tally(study).counted == 4
    retry = [t for t in complete if t.system_attrs.get("failed_trial") == killed]
    assert len(retry) == 1 and retry[0].params == trials[killed].params


@pytest.mark.slow  # out of the suite for its 10-minute budget; run with -m slow
def test_pruned_and_failed_trials_are_recorded_and_the_study_goes_on(
    optuna_data: Path, tmp_path: Path
) -> None:
    """Brute force over two backbones: one cannot be built (failed), the other is pruned by
    a threshold no accuracy reaches, after its first of three epochs."""
    sweep_dir = tmp_path / "sweep"
    storage = tmp_path / "study.log"
    result = run_cli(
        [
            "vision_tl.train",
            "-m",
            *[o for o in TRIAL_TINY if not o.startswith("model.backbone.name=")],
            "trainer.max_epochs=3",
            f"data.root={optuna_data}",
            "hydra/sweeper=optuna",
            "hydra.sweeper.sampler._target_=optuna.samplers.BruteForceSampler",
            "~hydra.sweeper.sampler.constant_liar",
            "model.backbone.name=choice(timm/test_efficientnet,resnet_nope)",
            "hydra.sweeper.n_trials=5",
            "hydra.sweeper.pruner=threshold",
            "+hydra.sweeper.pruner_args.lower=1.01",
            f"hydra.sweeper.storage=journal:{storage}",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(
        study_name="vision_tl",
        storage=open_storage(StudySettings.from_config({"storage": f"journal:{storage}"})),
    )
    # Brute force stops the study once both points are tried, before n_trials.
    by_backbone = {t.params["model.backbone.name"]: t for t in study.get_trials()}
    assert by_backbone["resnet_nope"].state == TrialState.FAIL
    pruned = by_backbone["timm/test_efficientnet"]
    assert pruned.state == TrialState.PRUNED and list(pruned.intermediate_values) == [0]
    job = sweep_dir / str(pruned.number)
    status = read_status(job)
    assert status["status"] == "pruned" and status["pruned_epoch"] == 0
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["pruned_epoch"] == 0 and metrics["epochs"] == 1
    assert len(pd.read_csv(job / "history.csv")) == 1
    summary = pd.read_csv(sweep_dir / "summary.csv").set_index("model.backbone.name")
    assert summary.loc["timm/test_efficientnet", "status"] == "pruned"
    assert summary.loc["timm/test_efficientnet", "pruned_epoch"] == 0
    assert summary.loc["resnet_nope", "status"] == "failed"
    assert "unknown backbone 'resnet_nope'" in summary.loc["resnet_nope", "error"]
    # No trial completed: Optuna's views are skipped, each with its line.
    assert not list(sweep_dir.glob("optuna_*.png"))
    assert "optuna_history.png skipped: 0 completed trials" in result.stdout + result.stderr


def test_a_searched_value_on_the_command_line_needs_no_dash_m_under_hparams_search() -> None:
    """hparams_search=optuna makes the run a multirun: its sweep values are the search's."""
    check_command_line("train", ["hparams_search=optuna", "optimizer.lr=tag(log,interval(1e-8,1))"])
    with pytest.raises(ConfigError, match="needs -m"):
        check_command_line("train", ["optimizer.lr=tag(log,interval(1e-8,1))"])


def _search(args: list[str], cwd: Path, env: dict[str, str] | None = None):
    return run_cli(["vision_tl.train", "-m", "hydra/sweeper=optuna", *args], cwd=cwd, env=env)


@pytest.mark.slow
def test_ddp_ranks_stop_at_the_same_pruned_epoch(optuna_data: Path, tmp_path: Path) -> None:
    """Two CPU ranks; rank 0 asks the (in-memory) study, both stop after epoch 0 of 3."""
    sweep_dir = tmp_path / "sweep"
    result = _search(
        [
            *[o for o in TRIAL_TINY if o != "trainer.max_epochs=1"],
            "trainer.max_epochs=3",
            "trainer=ddp",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            f"data.root={optuna_data}",
            "hydra.sweeper.n_trials=1",
            "hydra.sweeper.pruner=threshold",
            "+hydra.sweeper.pruner_args.lower=1.01",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    job = sweep_dir / "0"
    assert read_status(job)["status"] == "pruned"
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["pruned_epoch"] == 0 and metrics["epochs"] == 1
    for log in ("train.log", "train_rank1.log"):
        assert "Trial 0 pruned after epoch 0" in (job / log).read_text(), log


@pytest.mark.slow
def test_two_command_line_workers_share_a_journal_study(optuna_data: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    args = [
        *TRIAL_TINY,
        f"data.root={optuna_data}",
        "optimizer.lr=tag(log,interval(1e-4,1e-1))",
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.storage=journal:study.log",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: _search(args, cwd=tmp_path), [0, 1]))
    assert [r.returncode for r in results] == [0, 0], results[0].stderr[-2000:]
    study = optuna.load_study(
        study_name="vision_tl",
        storage=open_storage(
            StudySettings.from_config({"storage": f"journal:{tmp_path}/study.log"})
        ),
    )
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == list("012345")
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert len(summary) == 6 and set(summary["status"]) == {"done"}


@pytest.mark.slow
def test_a_command_line_worker_killed_mid_trial_leaves_a_trial_the_other_retries(
    optuna_data: Path, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    args = [
        *[o for o in TRIAL_TINY if o != "trainer.max_epochs=1"],
        "trainer.max_epochs=2",
        "+callbacks.kill._target_=faults.KillAtEpoch",
        "+callbacks.kill.epoch=1",
        f"data.root={optuna_data}",
        "optimizer.lr=tag(log,interval(1e-4,1e-1))",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.storage=sqlite:///study.db",
        "hydra.sweeper.heartbeat_interval=1",
        "hydra.sweeper.grace_period=3",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    env = {"PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}
    with ThreadPoolExecutor(2) as pool:
        killed = pool.submit(_search, args, tmp_path, {**env, "VISION_TL_TEST_KILL": "1"})
        time.sleep(5)
        survivor = pool.submit(_search, args, tmp_path, env)
        assert killed.result().returncode != 0
        assert survivor.result().returncode == 0, survivor.result().stderr[-3000:]
    study = optuna.load_study(study_name="vision_tl", storage=f"sqlite:///{tmp_path}/study.db")
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(failed) == 1 and len(complete) == 4
    (retry,) = [t for t in complete if t.system_attrs.get("failed_trial") == failed[0].number]
    assert retry.params == failed[0].params
    summary = pd.read_csv(sweep_dir / "summary.csv").set_index("job")
    assert summary.loc[failed[0].number, "status"] == "interrupted"
