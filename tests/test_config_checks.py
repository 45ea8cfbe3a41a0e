"""A bad config stops at once: one `error: KEY=VALUE: ...` line, exit 1, nothing claiming
success; a run whose files fail far beyond the pre-flight check stops too; no network."""

from __future__ import annotations

import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import TINY, run_cli
from omegaconf import OmegaConf

from vision_tl.core.cli import check_command_line, os_error_line
from vision_tl.core.errors import ConfigError, VisionTLError
from vision_tl.core.validate import violations
from vision_tl.training.train import run_training

# --------------------------------------------------------------------------- unit


@pytest.mark.unit
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.image_size=0"], "data.image_size=0: an integer >= 8"),
        (["optimizer.lr=abc"], "optimizer.lr=abc: a number > 0"),
        (["optimizer.lr=-0.1"], "optimizer.lr=-0.1: a number > 0"),
        (["data.imag_size=64"], "data.imag_size=64: no such key; did you mean data.image_size?"),
        (["finetune=partal"], "finetune=partal: not a config of finetune/"),
        (["data.val_fraction=1.5"], "data.val_fraction=1.5: a number > 0 and < 1"),
        (["data.resize_size=16", "data.image_size=32"], "data.resize_size=16: at least"),
        (["data.max_failed_fraction=2"], "data.max_failed_fraction=2: a number >= 0 and <= 1"),
        (["loss.class_weights=often"], "loss.class_weights=often: null, auto"),
        (["data.root=/no/such/dir"], "data.root=/no/such/dir: an existing folder"),
        (["hydra.run.dir=/proc/x"], "hydra.run.dir=/proc/x: cannot write under /proc"),
        (["data.batch_size=4,8"], "data.batch_size=4,8: a sweep over values needs -m"),
        (["-m", "data.batch_size=4,0"], "data.batch_size=0: a positive integer"),
        (["trainer.max_epochs=0"], "trainer.max_epochs=0: a positive integer, or -1"),
    ],
)
def test_command_line_check_names_the_key_and_what_is_allowed(
    overrides: list[str], expected: str
) -> None:
    with pytest.raises(ConfigError) as err:
        check_command_line("train", overrides)
    assert str(err.value).startswith(expected), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.unit
def test_valid_command_lines_pass_the_check(tmp_path: Path) -> None:
    check_command_line("train", [f"hydra.run.dir={tmp_path / 'new' / 'run'}"])
    check_command_line("train", ["-m", "data.batch_size=4,8", "optimizer.lr=0.1,0.01"])
    check_command_line("train", ["+trainer.limit_train_batches=2", "data.image_size=64"])
    check_command_line("predict", ["top_k=2", "tta.crops=5", "reject_threshold=0.3"])
    assert not (tmp_path / "new").exists(), "the check creates nothing"


@pytest.mark.unit
def test_every_rule_rejects_a_wrong_type_and_accepts_the_shipped_defaults() -> None:
    from vision_tl.core.validate import SCHEMA

    keys = [key for rules in SCHEMA for key in rules.keys]
    assert {"data.sampler", "data.on_bad_image", "data.feature_cache", "trainer.precision"} <= set(
        keys
    ), "the keys the datamodule and the trainer used to check themselves"
    assert len(keys) == len(set(keys)), "each key is checked in one table"
    for key in keys:
        cfg = OmegaConf.create({})
        OmegaConf.update(cfg, key, "not-a-value", force_add=True)
        assert violations(cfg) and violations(cfg)[0].startswith(f"{key}=not-a-value: "), key
    from hydra import compose, initialize_config_dir

    from vision_tl.core.config import config_dir

    for name in ("train", "eval", "predict", "explain", "export", "audit", "select"):
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
            assert violations(compose(name)) == [], name


@pytest.mark.unit
@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        ("data.sampler=weigthed,balanced", "data.sampler=weigthed: one of shuffle, weighted"),
        ("data.on_bad_image=skip,ignore", "data.on_bad_image=ignore: one of skip, fail"),
        ("data.feature_cache=auto,maybe", "data.feature_cache=maybe: one of auto, on, off"),
        ("trainer.precision=32,17", "trainer.precision=17: one of 32, 32-true, 16-mixed"),
        ("data.source=auto,folderz", "data.source=folderz: one of auto, builtin, folder"),
        ("data.augment=none,flipcrop", "data.augment=flipcrop: one of documents, flip_crop, none"),
    ],
)
def test_every_sweep_value_is_checked_before_any_job(sweep: str, expected: str) -> None:
    """The keys the datamodule and the trainer once checked at run time, job by job."""
    with pytest.raises(ConfigError) as caught:
        check_command_line("train", ["-m", sweep])
    assert str(caught.value).startswith(expected)


@pytest.mark.integration
def test_a_misspelt_sweep_value_stops_the_command_in_one_line(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    done = run_cli(
        ["vision_tl.train", "-m", "data.sampler=weigthed,balanced", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == "error: data.sampler=weigthed: one of shuffle, weighted\n"
    assert not sweep.exists(), "no job started"


@pytest.mark.unit
def test_os_errors_the_user_can_fix_are_one_line() -> None:
    try:
        open("/proc/no/such/file", "w")  # noqa: SIM115
    except OSError as err:
        wrapped = RuntimeError("while writing metrics")
        wrapped.__cause__ = err
        assert os_error_line(wrapped) == "/proc/no/such/file: No such file or directory"
    assert os_error_line(OSError(28, "No space left on device", "/data/x")) == (
        "/data/x: No space left on device"
    )
    assert os_error_line(ValueError("not an OS error")) is None


@pytest.mark.unit
def test_no_process_the_suite_starts_can_reach_the_network() -> None:
    code = "import socket; socket.create_connection(('203.0.113.7', 80), timeout=2)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "NetworkBlocked" in result.stderr
    with socket.socket() as server:  # this machine stays reachable (DDP, notebook kernels)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        local = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=5)"
        assert subprocess.run([sys.executable, "-c", local]).returncode == 0
    with pytest.raises(RuntimeError, match="network access in tests"):
        socket.create_connection(("203.0.113.7", 80), timeout=2)


# --------------------------------------------------------------------------- integration


BAD_INPUTS = {
    "image_size_zero": (["data.image_size=0"], "error: data.image_size=0: "),
    "lr_not_a_number": (["optimizer.lr=abc"], "error: optimizer.lr=abc: a number > 0"),
    "typo_in_a_key": (["data.imag_size=64"], "error: data.imag_size=64: no such key; did you"),
    "too_many_stages": (
        ["finetune=partial", "finetune.trainable_stages=99"],
        "error: finetune.trainable_stages=99: timm/test_resnet has 5 stages",
    ),
    "unwritable_run_dir": (["hydra.run.dir=/proc/x"], "error: hydra.run.dir=/proc/x: cannot"),
    "missing_data_root": (
        ["data.root=/no/such/folder"],
        "error: data.root=/no/such/folder: an existing folder",
    ),
    "unknown_backbone": (
        ["model.backbone.name=resnet9000"],
        "error: unknown backbone 'resnet9000'; available:",
    ),
    "unknown_precision": (["trainer.precision=8"], "error: trainer.precision=8: one of"),
    "fp16_on_cpu": (
        ["trainer.precision=16-mixed"],
        "error: trainer.precision=16-mixed needs a GPU",
    ),
    "unknown_augment": (
        ["data.augment=mixup"],
        "error: data.augment=mixup: one of documents, flip_crop, none",
    ),
}


# Through the command line in the default tier: one mistake the pre-Hydra check catches and
# those only the model or the data reveal (every rule is also checked in-process above).
# Two in the suite (a path, a model); the slow tier runs every one.
AT_RUN_TIME = ["missing_data_root", "unknown_backbone"]


@pytest.mark.parametrize(
    "names",
    [
        pytest.param(AT_RUN_TIME, marks=pytest.mark.integration, id="at-run-time"),
        pytest.param(list(BAD_INPUTS), marks=pytest.mark.slow, id="all"),
    ],
)
def test_each_bad_input_exits_1_with_one_error_line_and_no_metrics(
    names: list[str], tmp_path: Path
) -> None:
    def run(name: str) -> tuple[str, subprocess.CompletedProcess]:
        overrides, _ = BAD_INPUTS[name]
        run_dir = (
            []
            if any(o.startswith("hydra.run.dir") for o in overrides)
            else [f"hydra.run.dir={tmp_path / name}"]
        )
        args = ["vision_tl.train", *TINY, *run_dir, *overrides]
        return name, run_cli(args, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})

    with ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(run, names))
    for name, result in results.items():
        expected = BAD_INPUTS[name][1]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 1, (name, result.stderr[-2000:])
        assert len(errors) == 1 and errors[0].startswith(expected), (name, errors)
        assert "Traceback" not in result.stderr, name
    assert not list(tmp_path.rglob("metrics.json")), "no run dir claims success"


@pytest.mark.integration
def test_a_run_whose_files_keep_failing_stops_and_says_it_is_not_the_files(
    compose_train, image_folder: Path, tmp_path: Path
) -> None:
    """A setup mistake no check can foresee (here: every read of the source fails after the
    pre-flight check passed, as on a disk that went away) stops the run in one line."""
    from vision_tl.data.sources.folder import FolderSource

    def gone(self, key, preprocess):
        raise OSError(f"[Errno 5] Input/output error: '{key}'")

    cfg = compose_train([*TINY, f"data.root={image_folder}"], tmp_path)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(VisionTLError) as err:
        mp.setattr(FolderSource, "open", gone)
        run_training(cfg)
    message = str(err.value)
    assert message.startswith("data.max_failed_fraction=0.1: ") and "\n" not in message
    assert "not the files" in message and "first: " in message
    assert str(image_folder) in message.split("first: ")[1]
    assert not (tmp_path / "metrics.json").exists()
    assert (tmp_path / "bad_files.csv").is_file(), "the failures stay listed"


@pytest.mark.integration
def test_a_few_failing_files_are_skipped_and_the_run_finishes(
    compose_train, tmp_path: Path
) -> None:
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "data", per_class=12)
    victim = data / "train" / "cat" / "cat_0.png"
    cfg = compose_train(
        [*TINY, f"data.root={data}", "trainer.max_epochs=1", "data.max_failed_fraction=0.1"],
        tmp_path / "run",
    )
    from vision_tl.data.datamodule import ImageDataModule

    original = ImageDataModule.setup

    def setup_then_break_one_file(self, stage=None):  # the file breaks after the check
        original(self, stage)
        victim.write_bytes(b"truncated")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ImageDataModule, "setup", setup_then_break_one_file)
        metrics = run_training(cfg)
    assert metrics["epochs"] == 1 and (tmp_path / "run" / "metrics.json").is_file()
    listed = (tmp_path / "run" / "bad_files.csv").read_text()
    assert "cat_0.png" in listed and "failed during training" in listed
