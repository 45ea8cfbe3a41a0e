"""torch and torchvision are a range in pyproject.toml, not a pin: the installed pair lies in
it, and (by hand) the lowest pair it allows installs and works (tests/compat/lowest_torch.sh)."""

from __future__ import annotations

import os
import re
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import OFFLINE, REPO
from packaging.requirements import Requirement
from packaging.version import Version

SCRIPT = REPO / "tests" / "compat" / "lowest_torch.sh"
OPT_IN = "VISION_TL_LOWEST_TORCH"


def declared() -> dict[str, Requirement]:
    """pyproject.toml's torch and torchvision requirements (read as text: Python 3.10 has
    no tomllib)."""
    text = (REPO / "pyproject.toml").read_text()
    found = map(Requirement, re.findall(r'^\s*"(torch[^"]*)",', text, flags=re.MULTILINE))
    return {r.name: r for r in found if r.name in ("torch", "torchvision")}


def test_torch_and_torchvision_are_ranges_that_hold_the_installed_pair() -> None:
    requirements = declared()
    assert set(requirements) == {"torch", "torchvision"}
    for name, requirement in requirements.items():
        assert not any(s.operator in ("==", "===") for s in requirement.specifier), requirement
        # A local label (+cu132, +cpu) names the build, not the release.
        assert Version(version(name)).public in requirement.specifier, (name, version(name))


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get(OPT_IN) != "1",
    reason=f"installs the lowest torch pair in a new venv (~4 GB from the index): {OPT_IN}=1",
)
def test_lowest_torch_pair_installs_trains_evaluates_and_exports(tmp_path: Path) -> None:
    """Runs the script; opt-in because `pytest` runs the slow tier by default (.ci/run too)."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    # pip needs the index: the suite's network guard (sitecustomize on PYTHONPATH) stays out.
    env.pop("VISION_TL_TEST_OFFLINE", None)
    paths = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p and p != str(OFFLINE)]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    result = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "lowest_torch: OK" in result.stdout
