"""Shared fixtures: no network, isolated caches, tiny generated image folders, config composer."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers.offline import network_guard
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from vision_tl.core.config import config_dir
from vision_tl.core.logs import ini_filterwarnings

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
HYMENOPTERA = SHARED / "datasets" / "hymenoptera"

# Overrides that make a training run tiny and quiet, whatever the model ...
TINY_ANY_MODEL = [
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "callbacks.rich_progress_bar=null",
    "data.num_workers=0",
    "data.batch_size=8",
    "data.image_size=32",
    "model.pretrained=false",
]
# ... and on timm's smallest ResNet (0.47M weights): resnet18's 134 MB checkpoints take most of
# a tiny run's time. A ResNet, since CPU depthwise convolutions are slow below 48 px.
TINY_NET = "model.backbone.name=timm/test_resnet"
TINY = [*TINY_ANY_MODEL, TINY_NET]
# The converged linear probe alone (the early-stopped recipe has tests of its own), short.
QUICK_PROBE = [
    "finetune=linear_probe",
    "finetune.epochs=3",
    "finetune.folds=2",
    "finetune.batch_size=8",
    "finetune.short_epochs=0",
]
# One epoch of two batches, no test, logger or extra checkpoint: a checkpoint, fast.
QUICK_TRAIN = [
    *TINY,
    "trainer.max_epochs=1",
    "test=false",
    "logger=none",
    "callbacks.learning_rate_monitor=null",
    "callbacks.last_checkpoint=null",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
]


# No network in this process or in any Python process it starts (see network_guard).
OFFLINE = Path(network_guard.__file__).parent
os.environ[network_guard.ENV] = "1"
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(OFFLINE), os.environ.get("PYTHONPATH")) if p
)
network_guard.install()
# Engines: the suite's commands predict a few tiny images per process, where converting
# the network for OpenVINO costs more than it saves, and spies count eager forwards.
# `auto` runs eager here (core.engines.SITE_ENGINE); tests/test_engines.py runs every
# engine by name and `auto` with the variable removed.
os.environ.setdefault("VISION_TL_ENGINE", "torch")


TIERS = ("unit", "integration", "slow")


def pytest_configure(config: pytest.Config) -> None:
    """Third-party warnings are filtered as the commands filter them (core/logs.py)."""
    for line in ini_filterwarnings():
        config.addinivalue_line("filterwarnings", line)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test without `integration` or `slow` is `unit`; `unit_tests_never_train` holds
    it to that. Runs before `-m` selects, so `make test-fast` (-m unit) sees the marks."""
    for item in items:
        tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
        if len(tiers) > 1:
            raise pytest.UsageError(f"{item.nodeid}: one tier of {', '.join(TIERS)}, not {tiers}")
        if not tiers:
            item.add_marker(pytest.mark.unit)


class TrainingInUnitTest(RuntimeError):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """The unit tier stays fast because nothing in it, its fixtures included, fits a model
    or starts a command."""
    if item.get_closest_marker("unit") is None:
        yield
        return
    import lightning

    def refuse(*args, **kwargs):
        raise TrainingInUnitTest(f"{item.nodeid} trains: mark it integration")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lightning.Trainer, "fit", refuse)
        mp.setenv("VISION_TL_TEST_TIER", "unit")
        yield


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vision_tl_cache")


@pytest.fixture(autouse=True)
def isolated_caches(
    monkeypatch: pytest.MonkeyPatch, session_cache: Path, tmp_path: Path
) -> Iterator[None]:
    """Generated data is shared across tests; weights caches start empty in each test."""
    monkeypatch.setenv("VISION_TL_CACHE", str(session_cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield


def _draw(label: int, seed: int, size: int, mode: str = "RGB") -> Image.Image:
    """A class-coloured square on noise: learnable in a few steps, different per image."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    colour = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220], [220, 220, 40]][label % 4])
    lo = size // 4 + int(rng.integers(-2, 3))
    pixels[lo : lo + size // 2, lo : lo + size // 2] = colour
    return Image.fromarray(pixels).convert(mode)


def make_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "fox"),
    per_class: int = 8,
    splits: tuple[str, ...] = ("train", "val"),
    size: int = 40,
) -> Path:
    """Write `root/<split>/<class>/*.png` (or `root/<class>/` when `splits` is empty)."""
    for s, split in enumerate(splits or ("",)):
        for c, name in enumerate(classes):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                _draw(c, seed=s * 10_000 + c * 100 + i, size=size).save(folder / f"{name}_{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", splits=("train", "val", "test"))


def compose_entry(name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """The config `python -m vision_tl.<name>` would compose, writing into `output_dir`."""
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return compose(name, overrides=[*overrides, f"paths.output_dir={output_dir}"])


@pytest.fixture
def compose_train() -> Callable[..., DictConfig]:
    """Compose the real `train` config with overrides, outside a Hydra app."""

    def _compose(overrides: list[str], output_dir: Path) -> DictConfig:
        with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
            return compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])

    return _compose


def browser_check(page: Path, png: Path, *args: str, timeout: int = 120) -> dict:
    """Open `page` in headless Chromium through `bench/audit_browser.py` (a screenshot in
    `png`, `args` such as `--click SEL`) and return what it reports of the rendered page."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "audit_browser.py"), str(page), str(png), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def run_cli(
    args: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: int = 300,
    memory_limit: int | None = None,
):
    """Run `python -m vision_tl.<entry> ...` as a user would, returning the CompletedProcess.
    With `memory_limit` (bytes), the command's address space is capped there: a command
    that reads without bound fails instead of taking the machine's memory."""
    import resource
    import signal
    import subprocess
    import sys

    if os.environ.get("VISION_TL_TEST_TIER") == "unit":
        raise TrainingInUnitTest(f"a unit test runs {args[:1]}: mark it integration")
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}

    def cap_memory() -> None:
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    # A session of its own, so a timeout also kills the processes it started (DDP ranks).
    with subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=cap_memory if memory_limit is not None else None,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail the block with `TimeoutError` after `seconds` (SIGALRM, main thread): a test
    that could block in a system call (opening a named pipe) cannot hang the suite."""
    import signal

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
