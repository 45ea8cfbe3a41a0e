"""The configs and the Optuna sweeper ship inside the wheel, so a non-editable install
finds them (Hydra finds the sweeper in its `hydra_plugins` namespace)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import OFFLINE, REPO

from vision_tl.core.config import config_dir


# Builds from what is installed (hatchling is a dev dependency) and never asks an index:
# under the suite's network guard, any download would fail the test.
def offline_pip(command: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "pip", command, "--no-input", "--no-index", *args]


def test_checkout_uses_the_top_level_conf() -> None:
    assert config_dir() == REPO / "conf"
    assert (config_dir() / "train.yaml").is_file()


@pytest.mark.slow
def test_wheel_ships_the_configs(tmp_path: Path) -> None:
    subprocess.run(
        offline_pip(
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ),
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("vision_tl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("vision_tl/conf/") for n in names if n.startswith("vision_tl/conf/")}
    expected = {str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    assert expected <= shipped

    target = tmp_path / "site"
    subprocess.run(
        offline_pip("install", "--no-deps", "-q", "--target", str(target), str(wheel)),
        check=True,
        capture_output=True,
    )

    def installed(code: str) -> str:
        """What `code` prints where only the installed wheel (and the network guard) is."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(OFFLINE)])}
        run = [sys.executable, "-c", code]
        return subprocess.run(
            run, env=env, cwd=tmp_path, capture_output=True, text=True, check=True
        ).stdout.strip()

    probe = "import vision_tl.core.config as c; print(c.config_dir())"
    assert Path(installed(probe)) == target / "vision_tl" / "conf"

    plugin = "hydra_plugins/vision_tl_optuna_sweeper/optuna_sweeper.py"
    assert plugin in names and "hydra_plugins/__init__.py" not in names  # a namespace
    found = (
        "from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
        "import inspect; print([inspect.getfile(c) for c in Plugins.instance().discover(Sweeper)"
        " if c.__name__ == 'OptunaSweeper'])"
    )
    assert installed(found) == str([str(target / plugin)])
