"""Multi-process and multi-node jobs: every launcher's rank known before the Trainer, one
writer of the run's files, one decision to skip or resume, one scan.

The "nodes" are processes on this machine talking Gloo over loopback, started the three
ways a cluster starts them: `torchrun`, by hand with `NODE_RANK`, and with SLURM's
variables set by hand (as `srun` sets them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY, make_image_folder
from helpers.net import free_port
from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from vision_tl.core.config import register_resolvers
from vision_tl.core.errors import ConfigError
from vision_tl.core.launch import (
    LOCAL_HANDOFF_ENV,
    Launch,
    detect_launch,
    from_rank_zero,
    handed_over,
    local_handoff,
    rank_suffix,
)
from vision_tl.sweeps.jobs import _decide
from vision_tl.sweeps.status import write_status
from vision_tl.training.distributed import cluster_plugins

HELPERS = Path(__file__).parent / "helpers"
LAUNCH_VARS = (
    "TORCHELASTIC_RUN_ID",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "GROUP_RANK",
    "NODE_RANK",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
    "SLURM_JOB_NAME",
    "SLURM_JOB_ID",
    "SLURM_NNODES",
    "SLURM_NTASKS_PER_NODE",
)
# One epoch of three batches per rank, no test: what a launch needs to show, fast.
RUN = [
    *[o for o in TINY if not o.startswith("trainer.max_epochs=")],
    "trainer=ddp",
    "trainer.max_epochs=1",
    "model.backbone.name=timm/test_efficientnet",
    "logger=none",
    "test=false",
    "callbacks.learning_rate_monitor=null",
    "+trainer.limit_val_batches=2",
]


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.unit
@pytest.mark.parametrize(
    ("env", "nodes", "devices", "expected"),
    [
        ({}, 1, 1, Launch("single")),
        ({"LOCAL_RANK": "1"}, 1, 2, Launch("lightning", 1, 2, 1, 0)),
        ({"NODE_RANK": "1"}, 2, 1, Launch("node_rank", 1, 2, 0, 1)),
        (
            {"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
            | {"GROUP_RANK": "1"},
            2,
            2,
            Launch("torchrun", 3, 4, 1, 1),
        ),
        (
            {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
            | {"SLURM_NODEID": "1", "SLURM_JOB_NAME": "job"},
            2,
            1,
            Launch("slurm", 1, 2, 0, 1),
        ),
        # An interactive allocation is not a SLURM launch (Lightning's rule too).
        (
            {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_JOB_NAME": "bash"},
            1,
            1,
            Launch("single"),
        ),
    ],
)
def test_every_launcher_gives_the_rank_before_the_trainer(
    no_launcher: pytest.MonkeyPatch, env: dict, nodes: int, devices: int, expected: Launch
) -> None:
    for name, value in env.items():
        no_launcher.setenv(name, value)
    launch = detect_launch(nodes, devices, "cpu")
    assert launch == expected
    assert launch.external == (expected.launcher in ("torchrun", "slurm", "node_rank"))
    assert rank_suffix(devices) == (f"_rank{expected.rank}" if expected.rank else "")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("env", "nodes", "devices", "message"),
    [
        ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2"}, 1, 1, "torchrun started 2 processes"),
        ({"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "job"}, 2, 2, "SLURM started 2 tasks"),
        ({"NODE_RANK": "2"}, 2, 1, "NODE_RANK=2 but trainer.num_nodes=2"),
        ({"NODE_RANK": "1"}, 2, 2, "start every process with its launcher"),
        ({}, 1, "two", "trainer.devices=two"),
    ],
)
def test_a_task_count_that_does_not_match_is_one_line(
    no_launcher: pytest.MonkeyPatch, env: dict, nodes: int, devices: object, message: str
) -> None:
    for name, value in env.items():
        no_launcher.setenv(name, value)
    with pytest.raises(ConfigError, match=message) as err:
        detect_launch(nodes, devices, "cpu")
    assert "\n" not in str(err.value)


@pytest.mark.unit
def test_only_rank_zero_keeps_hydra_files_and_each_rank_logs_apart(
    no_launcher: pytest.MonkeyPatch,
) -> None:
    register_resolvers()
    node = OmegaConf.create(
        {
            "trainer": {"devices": 2},
            "name": "train${vtl.rank_suffix:${oc.select:trainer.devices,1}}",
            "subdir": "${vtl.rank_zero:.hydra,${oc.select:trainer.devices,1}}",
        }
    )
    assert (node.name, node.subdir) == ("train", ".hydra")
    no_launcher.setenv("NODE_RANK", "1")  # node 1's first process: global rank 2
    assert (node.name, node.subdir) == ("train_rank2", None)


@pytest.mark.unit
def test_slurm_requeue_has_one_owner() -> None:
    (plugin,) = cluster_plugins(Launch("slurm", 0, 2))
    assert isinstance(plugin, SLURMEnvironment) and plugin.auto_requeue is False
    assert cluster_plugins(Launch("torchrun", 0, 2)) == []


@pytest.mark.unit
def test_without_a_process_group_rank_zeros_work_is_done_here() -> None:
    assert from_rank_zero(lambda: 41 + 1) == 42


@pytest.mark.unit
def test_local_ranks_lightning_starts_take_rank_zeros_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in (*LAUNCH_VARS, LOCAL_HANDOFF_ENV):
        monkeypatch.delenv(name, raising=False)
    calls = []

    def scan(value: str) -> Callable[[], dict]:
        return lambda: calls.append(value) or {"scanned by": value}

    with local_handoff(Launch("single")):  # one process: nothing to hand over
        assert LOCAL_HANDOFF_ENV not in os.environ
    with local_handoff(Launch("lightning", 0, 2)):
        folder = Path(os.environ[LOCAL_HANDOFF_ENV])
        assert from_rank_zero(scan("rank 0"), handoff="catalog") == {"scanned by": "rank 0"}
        monkeypatch.setenv("LOCAL_RANK", "1")  # a local rank Lightning started
        assert from_rank_zero(scan("rank 1"), handoff="catalog") == {"scanned by": "rank 0"}
        assert from_rank_zero(scan("rank 1"), handoff="other") == {"scanned by": "rank 1"}
        assert from_rank_zero(scan("rank 1")) == {"scanned by": "rank 1"}
        # what a local rank reads before deciding to compute (the job decision)
        assert handed_over("catalog") == {"scanned by": "rank 0"}
        assert handed_over("job decision") is None
        monkeypatch.setenv("LOCAL_RANK", "0")
        assert handed_over("catalog") is None, "rank 0 computes; it is handed nothing"
    assert calls == ["rank 0", "rank 1", "rank 1"]
    assert not folder.exists() and LOCAL_HANDOFF_ENV not in os.environ


@pytest.mark.unit
def test_skip_and_resume_are_decided_from_the_job_files(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"ckpt_path": None})
    job = tmp_path / "job"
    assert _decide(cfg, job, ["a=1"], multirun=False)["ckpt_path"] is None
    write_status(job, status="interrupted", overrides=["a=1"], attempts=1)
    (job / "checkpoints").mkdir()
    (job / "checkpoints" / "last.ckpt").write_bytes(b"x")
    decision = _decide(cfg, job, ["a=1"], multirun=False)
    assert decision["ckpt_path"] == str(job / "checkpoints" / "last.ckpt")
    assert decision["attempt"] == 2 and decision["skip"] is None
    assert "other overrides" in _decide(cfg, job, ["a=2"], multirun=False)["error"]
    write_status(job, status="done")
    (job / "metrics.json").write_text('{"best_val_acc": 0.5}')
    assert _decide(cfg, job, ["a=1"], multirun=False)["skip"] == {"best_val_acc": 0.5}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    path = os.pathsep.join(p for p in (str(HELPERS), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def _ranks(
    commands: list[tuple[list[str], dict[str, str], int]], cwd: Path, timeout: int = 240
) -> list[subprocess.CompletedProcess]:
    """Start every (argv, env, umask) at once, each in a session of its own, and wait for
    all; past `timeout` every one is killed (with what it started) and the test fails."""

    def start(argv: list[str], env: dict[str, str], umask: int) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, *argv],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=lambda: os.umask(umask),
        )

    processes = [start(*command) for command in commands]
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, output))
    except subprocess.TimeoutExpired:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"ranks still running after {timeout} s")
    return results


def _two_nodes(how: str, args: list[str], port: int, **env: str) -> list:
    """The (argv, env, umask) of the two ranks of a 2-node x 1-device job started `how`.
    Rank 1 runs with umask 077: a file it wrote last is private."""
    train = ["-m", "vision_tl.train", *args, "trainer.num_nodes=2", "trainer.devices=1"]
    commands = []
    for node in (0, 1):
        umask = 0o022 if node == 0 else 0o077
        if how == "torchrun":
            argv = [
                *("-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"),
                *(f"--node-rank={node}", "--master-addr=127.0.0.1", f"--master-port={port}"),
                *train,
            ]
            commands.append((argv, _env(**env), umask))
            continue
        if how == "node_rank":
            ids = {"NODE_RANK": str(node)}
        else:  # as srun sets them for --nodes=2 --ntasks-per-node=1
            ids = {
                "SLURM_JOB_ID": "4242",
                "SLURM_JOB_NAME": "vision_tl",
                "SLURM_NTASKS": "2",
                "SLURM_NNODES": "2",
                "SLURM_NTASKS_PER_NODE": "1",
                "SLURM_PROCID": str(node),
                "SLURM_NODEID": str(node),
                "SLURM_LOCALID": "0",
                "SLURM_NODELIST": "127.0.0.1",
            }
        ids |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        commands.append((train, _env(**ids, **env), umask))
    return commands


def _assert_one_writer(run: Path) -> None:
    """Everything shared in the run folder was written by rank 0 (umask 022); rank 1
    (umask 077) wrote its own log only."""
    for name in ("config.yaml", "split.csv", "bad_files.csv", "job_status.json", "metrics.json"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name
    assert (run / "checkpoints" / "last.ckpt").stat().st_mode & 0o777 == 0o644
    assert (run / "train_rank1.log").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in run.glob("*.log")) == ["train.log", "train_rank1.log"]


@pytest.mark.slow  # 11 s; the two-rank feature extraction (test_features) runs in the suite
def test_two_nodes_by_hand_with_node_rank(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=6, size=32)
    run = tmp_path / "run"
    args = [*RUN, f"data.root={data}", f"hydra.run.dir={run}"]
    commands = _two_nodes("node_rank", args, free_port())
    caches = [tmp_path / "cache0", tmp_path / "cache1"]  # each rank's own cache folder
    for (_, env, _), cache in zip(commands, caches, strict=True):
        env["VISION_TL_CACHE"] = str(cache)
    results = _ranks(commands, cwd=tmp_path)
    assert [r.returncode for r in results] == [0, 0], results[1].stdout[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    _assert_one_writer(run)
    rank1 = (run / "train_rank1.log").read_text()
    assert "rank 1 of 2 (node 1, node_rank)" in rank1
    # The scan ran once, on rank 0 (its verdicts cached in its cache folder); rank 1 was
    # sent the catalog and its report.
    assert list((caches[0] / "scans").glob("*.json"))
    assert not (caches[1] / "scans").exists()
    assert "decode fine" in rank1
    assert json.loads((run / "job_status.json").read_text())["world_size"] == 2


def _last_weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return state["state_dict"]


@pytest.mark.slow
def test_every_launcher_trains_the_weights_of_one_node_with_two_devices(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=8, size=32)
    base = [*RUN, f"data.root={data}", "trainer.max_epochs=2"]
    one_node = tmp_path / "one_node"
    single = _ranks(
        [(["-m", "vision_tl.train", *base, f"hydra.run.dir={one_node}"], _env(), 0o022)],
        cwd=tmp_path,
    )
    assert single[0].returncode == 0, single[0].stdout[-3000:]
    reference = _last_weights(one_node)
    # The local rank Lightning started took rank 0's scan instead of scanning again.
    handed = "The catalog rank 0 made, not made again here"
    assert handed in (one_node / "train_rank1.log").read_text()
    assert handed not in (one_node / "train.log").read_text()
    for how in ("torchrun", "node_rank", "slurm"):
        run = tmp_path / how
        args = [*base, f"hydra.run.dir={run}"]
        results = _ranks(_two_nodes(how, args, free_port()), cwd=tmp_path)
        assert [r.returncode for r in results] == [0, 0], (how, results[0].stdout[-3000:])
        assert json.loads((run / "metrics.json").read_text())["world_size"] == 2
        _assert_one_writer(run)
        weights = _last_weights(run)
        assert weights.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.allclose(weights[name], tensor, atol=1e-6), (how, name)


@pytest.mark.slow
def test_both_ranks_killed_at_epoch_2_resume_there(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=6, size=32)
    run = tmp_path / "run"
    args = [
        *RUN,
        f"data.root={data}",
        "trainer.max_epochs=4",
        "+callbacks.kill._target_=faults.KillAtEpoch",
        "+callbacks.kill.epoch=2",
        f"hydra.run.dir={run}",
    ]
    port = free_port()
    killed = _ranks(_two_nodes("torchrun", args, port, VISION_TL_TEST_KILL="1"), cwd=tmp_path)
    assert all(r.returncode != 0 for r in killed)
    assert json.loads((run / "job_status.json").read_text())["status"] == "running"
    assert not (run / "metrics.json").exists()

    results = _ranks(_two_nodes("torchrun", args, free_port()), cwd=tmp_path)
    assert [r.returncode for r in results] == [0, 0], results[0].stdout[-3000:]
    for log in ("train.log", "train_rank1.log"):
        assert "resuming from" in (run / log).read_text(), log
    history = pd.read_csv(run / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2, 3]
    status = json.loads((run / "job_status.json").read_text())
    assert status["status"] == "done" and status["attempts"] == 2
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 4

    rerun = _ranks(_two_nodes("torchrun", args, free_port()), cwd=tmp_path)
    assert [r.returncode for r in rerun] == [0, 0]
    for result in rerun:
        assert "finished in an earlier run: skipping it" in result.stdout


@pytest.mark.unit
def test_a_claim_file_makes_the_next_job_wait_without_flock(tmp_path: Path) -> None:
    import threading
    import time

    from vision_tl.core.io import claim

    path, order = tmp_path / "entry.claim", []

    def second() -> None:
        with claim(path, poll=0.01):
            order.append("second")

    with claim(path):
        waiting = threading.Thread(target=second)
        waiting.start()
        time.sleep(0.3)
        order.append("first done")
        assert path.exists()
    waiting.join(timeout=10)
    assert order == ["first done", "second"]
    assert not path.exists()


@pytest.mark.unit
def test_a_stale_claim_of_a_dead_job_is_broken_and_not_taken_back(tmp_path: Path) -> None:
    import time

    from vision_tl.core.io import claim

    path = tmp_path / "entry.claim"
    path.write_text("otherhost 1234 dead\n")
    old = time.time() - 600
    os.utime(path, (old, old))
    start = time.monotonic()
    with claim(path, stale_after=120, poll=0.01):
        assert time.monotonic() - start < 5
        assert "otherhost" not in path.read_text()
        path.write_text("a job that broke ours\n")  # ours went stale and was taken
    assert path.read_text() == "a job that broke ours\n", "the other job's claim stays"


@pytest.mark.slow
def test_a_linear_probe_on_two_nodes_shares_its_extraction(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=10, size=32)
    run = tmp_path / "run"
    args = [
        *RUN,
        f"data.root={data}",
        "finetune=linear_probe",
        "finetune.epochs=3",
        "finetune.folds=2",
        "finetune.short_epochs=0",
        f"hydra.run.dir={run}",
    ]
    results = _ranks(_two_nodes("torchrun", args, free_port()), cwd=tmp_path)
    assert [r.returncode for r in results] == [0, 0], results[0].stdout[-3000:]
    log = (run / "train.log").read_text()
    assert "2 ranks sharing the work" in log
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["probe"]["recipe"] == "converged"
    _assert_one_writer(run)
