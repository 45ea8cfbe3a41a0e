"""Sweeps through the real entry point: grid, Optuna, resume, failures, DDP, the report."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from conftest import TINY, make_image_folder, run_cli
from hydra import compose, initialize_config_dir
from PIL import Image

from vision_tl import report as report_entry
from vision_tl.core.cli import check_command_line
from vision_tl.core.config import config_dir
from vision_tl.core.errors import ConfigError
from vision_tl.sweeps import report
from vision_tl.sweeps.jobs import DeviceSlots
from vision_tl.sweeps.status import read_status, write_status
from vision_tl.training.train import check_precision

HELPERS = Path(__file__).parent / "helpers"
SWEEP_TINY = [*TINY, "trainer.max_epochs=1", "data.image_size=32"]


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("sweep") / "data", per_class=6, size=32)


def _sweep(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 400):
    result = run_cli(["vision_tl.train", "-m", *args], cwd=cwd, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _jobs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _decodes(path: Path) -> bool:
    with Image.open(path) as image:
        image.load()
        return image.size[0] > 0


@pytest.mark.integration
def test_grid_sweep_one_dir_per_job_and_summary(sweep_data: Path, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "grid"
    _sweep(
        [
            *SWEEP_TINY,
            f"data.root={sweep_data}",
            "data.batch_size=4,8",
            "optimizer.lr=0.01,0.001",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
    )
    jobs = _jobs(sweep_dir)
    assert len(jobs) == 4
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert 0.0 <= metrics["best_val_acc"] <= 1.0
        assert (job / "config.yaml").exists() and (job / "checkpoints" / "best.ckpt").exists()
        assert list((job / "tensorboard").glob("events.out.tfevents.*"))
        status = read_status(job)
        assert status["status"] == "done" and status["metric"] == metrics["best_val_acc"]
    assert not (tmp_path / "outputs").exists()

    # The closing Hydra callback wrote the report; the CLI rewrites it the same way.
    summary = pd.read_csv(sweep_dir / "summary.csv")
    report_entry.main([str(sweep_dir)])
    again = pd.read_csv(sweep_dir / "summary.csv")
    pd.testing.assert_frame_equal(summary, again)
    assert len(summary) == 4
    combos = set(zip(summary["data.batch_size"], summary["optimizer.lr"], strict=True))
    assert combos == {(4, 0.01), (4, 0.001), (8, 0.01), (8, 0.001)}
    assert list(summary["best_val_acc"]) == sorted(summary["best_val_acc"], reverse=True)
    assert (summary["status"] == "done").all()
    gaps = summary["final_train_acc"] - summary["final_val_acc"]
    assert (gaps - summary["train_val_gap"]).abs().max() < 1e-6
    assert (summary["peak_rss_mb"] > 0).all() and (summary["epochs"] == 1).all()
    assert (summary["best_val_acc_lo"] <= summary["best_val_acc"]).all()
    assert (summary["best_val_acc"] <= summary["best_val_acc_hi"]).all()
    top = summary.iloc[0]
    overlap = summary["best_val_acc_hi"] >= top["best_val_acc_lo"]
    assert list(summary["tied_with_best"]) == list(overlap)
    assert "| data.batch_size | optimizer.lr |" in (sweep_dir / "summary.md").read_text()
    assert _decodes(sweep_dir / "heatmap.png") and _decodes(sweep_dir / "curves.png")
    assert len(list((sweep_dir / "hparams").glob("*/events.out.tfevents.*"))) == 4

    # Partial results: a job still running has no metrics.json yet, only its history.
    running = jobs[0]
    (running / "metrics.json").unlink()
    write_status(running, status="running", pid=os.getpid())
    partial, _ = report.summarize(sweep_dir)
    row = partial[partial["job"] == running.name].iloc[0]
    assert row["status"] == "running"
    history = pd.read_csv(running / "history.csv")
    assert row["best_val_acc"] == pytest.approx(history["val_acc"].max())


@pytest.mark.slow
def test_optuna_study_persists_in_sqlite_and_two_workers_share_it(
    sweep_data: Path, tmp_path: Path
) -> None:
    """README's line: 3 trials kept in optuna.db; the same line with n_trials=6 run by two
    workers at once adds 3 more to the same study, in job folders named by trial number."""
    sweep_dir = tmp_path / "optuna"
    # A value given on the command line fixes that parameter: leave batch size to Optuna.
    fixed = [o for o in SWEEP_TINY if not o.startswith("data.batch_size=")]
    args = [
        *fixed,
        "model.backbone.name=timm/test_efficientnet",
        "logger=none",
        "test=false",
        f"data.root={sweep_data}",
        "hparams_search=optuna",
        "hydra.sweeper.storage=sqlite:///optuna.db",
        "hydra.sweeper.sampler.n_startup_trials=2",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    _sweep([*args, "hydra.sweeper.n_trials=3"], cwd=tmp_path)
    assert [j.name for j in _jobs(sweep_dir)] == ["0", "1", "2"]
    study = optuna.load_study(
        study_name="vision_tl", storage="sqlite:///" + str(tmp_path / "optuna.db")
    )
    assert len(study.trials) == 3

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda _: _sweep([*args, "hydra.sweeper.n_trials=6"], cwd=tmp_path), [0, 1]))
    study = optuna.load_study(
        study_name="vision_tl", storage="sqlite:///" + str(tmp_path / "optuna.db")
    )
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(6))
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE}
    jobs = _jobs(sweep_dir)
    assert [j.name for j in jobs] == [str(n) for n in range(6)]
    for job, trial in zip(jobs, sorted(trials, key=lambda t: t.number), strict=True):
        assert f"trial={trial.number}" in read_status(job)["overrides"]
        value = json.loads((job / "metrics.json").read_text())["best_val_acc"]
        assert value == pytest.approx(trial.value)
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(study.best_value)

    report_entry.main([str(sweep_dir)])
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert len(summary) == 6 and (summary["status"] == "done").all()
    assert summary["optimizer.lr"].between(1e-5, 1e-1).all()
    assert set(summary["data.batch_size"]) <= {8, 16, 32, 64}
    assert summary["model.head.dropout"].between(0.0, 0.6).all()
    assert _decodes(sweep_dir / "optuna_history.png")
    assert _decodes(sweep_dir / "optuna_importances.png")


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_redoing_finished_jobs(
    sweep_data: Path, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "resume"
    args = [
        *TINY,
        "data.image_size=32",
        f"data.root={sweep_data}",
        "trainer.max_epochs=1,3",
        "+callbacks.kill._target_=faults.KillAtEpoch",
        "+callbacks.kill.epoch=2",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    env = {"PYTHONPATH": str(HELPERS)}
    killed = run_cli(
        ["vision_tl.train", "-m", *args], cwd=tmp_path, env={**env, "VISION_TL_TEST_KILL": "1"}
    )
    assert killed.returncode != 0
    first, second = _jobs(sweep_dir)
    assert read_status(first)["status"] == "done"
    assert read_status(second)["status"] == "running"
    assert not (second / "metrics.json").exists()
    assert (second / "checkpoints" / "last.ckpt").exists()
    first_metrics = (first / "metrics.json").read_bytes()
    first_mtime = (first / "metrics.json").stat().st_mtime_ns

    result = _sweep(args, cwd=tmp_path, env=env)
    assert "finished in an earlier run: skipping it" in result.stderr + result.stdout
    assert (first / "metrics.json").read_bytes() == first_metrics
    assert (first / "metrics.json").stat().st_mtime_ns == first_mtime
    status = read_status(second)
    assert status["status"] == "done" and status["attempts"] == 2
    metrics = json.loads((second / "metrics.json").read_text())
    assert metrics["epochs"] == 3
    history = pd.read_csv(second / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2]
    assert "resuming from" in (second / "train.log").read_text()


@pytest.mark.slow
def test_failing_job_is_recorded_and_ddp_lp_ft_job_finishes_under_joblib(
    sweep_data: Path, tmp_path: Path
) -> None:
    """Parallel jobs (joblib), each a 2-process DDP run; the job with an unknown backbone
    fails when it builds its model (the command-line check cannot know the registry). The
    other runs LP-FT: both ranks run both stages (two fits in one process) in its one job
    dir."""
    sweep_dir = tmp_path / "fail"
    _sweep(
        [
            *SWEEP_TINY,
            f"data.root={sweep_data}",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "finetune=lp_ft",
            "model.backbone.name=resnet18,resnet_nope",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
    )
    summary = pd.read_csv(sweep_dir / "summary.csv").set_index("model.backbone.name")
    ok, bad = summary.loc["resnet18"], summary.loc["resnet_nope"]
    assert ok["status"] == "done" and ok["best_val_acc"] >= 0
    assert bad["status"] == "failed"
    assert "unknown backbone 'resnet_nope'" in bad["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fail"]

    done = sweep_dir / str(ok["job"])
    metrics = json.loads((done / "metrics.json").read_text())
    probe = json.loads((done / "probe" / "metrics.json").read_text())
    assert metrics["world_size"] == probe["world_size"] == 2
    assert metrics["probe"]["probe_val_acc"] == probe["best_val_acc"] <= metrics["best_val_acc"]
    assert (done / "train_rank1.log").exists()
    assert sorted(done.glob("**/metrics.json")) == [
        done / "metrics.json",
        done / "probe" / "metrics.json",
    ]
    assert len(list(done.glob("**/.hydra"))) == 1


def test_unsupported_precision_fails_in_one_line() -> None:
    with pytest.raises(ConfigError, match="needs a GPU") as err:
        check_precision("16-mixed", "cpu")
    assert "\n" not in str(err.value)
    check_precision("bf16-mixed", "cpu")
    with pytest.raises(ConfigError, match=r"^trainer\.precision=8-mixed: one of 32, 32-true"):
        check_command_line("train", ["trainer.accelerator=cpu", "trainer.precision=8-mixed"])


def test_device_slots_never_share_a_card(tmp_path: Path) -> None:
    slots = [DeviceSlots(tmp_path / "locks", count=2) for _ in range(3)]
    assert slots[0].acquire(timeout=0) == 0
    assert slots[1].acquire(timeout=0) == 1
    assert slots[2].acquire(timeout=0.2, poll=0.05) is None
    slots[0].release()
    assert slots[2].acquire(timeout=0) == 0
    slots[1].release()
    slots[2].release()


def _compose_hydra(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_search_and_launcher_configs_compose() -> None:
    grid = _compose_hydra(["hparams_search=grid"]).hydra
    assert grid.mode.name == "MULTIRUN"
    assert dict(grid.sweeper.params) == {
        "data.batch_size": "4,8",
        "optimizer.lr": "0.01,0.001",
        "model": "resnet50,mobilenet_v2,ensemble",
    }
    search = _compose_hydra(["hparams_search=optuna"]).hydra.sweeper
    assert search._target_.startswith("hydra_plugins.vision_tl_optuna_sweeper.")
    assert search.direction == "maximize" and search.sampler.constant_liar
    assert set(search.params) == {
        "optimizer.lr",
        "optimizer.weight_decay",
        "model.head.dropout",
        "data.batch_size",
    }
    slurm = _compose_hydra(["hydra/launcher=slurm"]).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.max_num_timeout > 0
    joblib = _compose_hydra(["hydra/launcher=joblib"]).hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher")
    ddp = _compose_hydra(["trainer=ddp", "trainer.num_nodes=2"]).trainer
    assert ddp.strategy == "ddp" and ddp.num_nodes == 2
    for name in ("resnet50", "mobilenet_v2"):
        assert _compose_hydra([f"model={name}"]).model.backbone.name == name


def test_failed_job_reports_the_root_cause_not_the_wrapper() -> None:
    from vision_tl.sweeps.jobs import _root_cause

    with pytest.raises(RuntimeError) as wrapped:
        try:
            raise TypeError("unexpected keyword argument 'manifest'")
        except TypeError as err:
            raise RuntimeError("Error in call to target 'ImageFolderDataModule'") from err
    root = _root_cause(wrapped.value)
    assert isinstance(root, TypeError) and "manifest" in str(root)


def test_a_run_inside_a_job_is_one_of_its_stages_not_a_job(tmp_path: Path) -> None:
    for job in ("0", "0/probe", "1", "2/nested/probe"):
        (tmp_path / job).mkdir(parents=True)
        (tmp_path / job / "metrics.json").write_text("{}")
    assert report.find_jobs(tmp_path) == [
        tmp_path / "0",
        tmp_path / "1",
        tmp_path / "2/nested/probe",
    ]
