"""`core/shims.py` holds every private attribute of torch, Lightning, Hydra and OmegaConf
vision_tl uses: each shim works against the installed libraries and fails in one line
naming the library and version when its private name is gone; no other module of
vision_tl reaches for a private name."""

from __future__ import annotations

import ast
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO

from vision_tl.core import shims
from vision_tl.core.shims import ShimError

PACKAGE = REPO / "src" / "vision_tl"

# Private names allowed outside core/shims.py: (path under src/vision_tl, the line's code),
# each with its reason. None today; the scan fails on an entry that is no longer needed.
ALLOWED: set[tuple[str, str]] = set()


def assert_one_line_naming(err: pytest.ExceptionInfo[ShimError], library: str) -> None:
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{library} "), message
    assert message.split()[1][0].isdigit(), f"no version in: {message}"


# ------------------------------------------------------------------ each shim


def test_hydra_args_parser_reads_a_command_line_as_hydra_does() -> None:
    args = shims.hydra_args_parser().parse_args(["-m", "--cfg", "job", "seed=1", "+a=b"])
    assert args.multirun and args.cfg == "job" and args.overrides == ["seed=1", "+a=b"]


def test_hydra_args_parser_fails_in_one_line_without_hydra_s_parser(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hydra._internal.utils

    monkeypatch.delattr(hydra._internal.utils, "get_args_parser")
    with pytest.raises(ShimError) as err:
        shims.hydra_args_parser()
    assert_one_line_naming(err, "hydra-core")


def _scheduler() -> torch.optim.lr_scheduler.LambdaLR:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.2})
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_set_last_lr_is_what_get_last_lr_returns_until_the_next_step() -> None:
    scheduler = _scheduler()
    assert scheduler.get_last_lr() == [0.1, 0.2]
    shims.set_last_lr(scheduler, (0.05, 0.07))
    assert scheduler.get_last_lr() == [0.05, 0.07]
    scheduler.optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == [0.1, 0.2]


def test_set_last_lr_fails_in_one_line_on_a_scheduler_without_it() -> None:
    scheduler = _scheduler()
    del scheduler._last_lr
    with pytest.raises(ShimError) as err:
        shims.set_last_lr(scheduler, [0.1, 0.2])
    assert_one_line_naming(err, "torch")


def _launchers() -> tuple[types.ModuleType, types.ModuleType]:
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

    return fabric_launcher, trainer_launcher


def test_replace_hydra_subprocess_cmd_reaches_both_launchers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for module in _launchers():  # restored after the test
        monkeypatch.setattr(module, "_hydra_subprocess_cmd", module._hydra_subprocess_cmd)

    def command(local_rank: int) -> tuple[list[str], str]:
        return ["true"], "."

    shims.replace_hydra_subprocess_cmd(command)
    assert all(module._hydra_subprocess_cmd is command for module in _launchers())


def test_replace_hydra_subprocess_cmd_fails_in_one_line_without_lightning_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fabric_launcher, trainer_launcher = _launchers()
    monkeypatch.setattr(
        trainer_launcher, "_hydra_subprocess_cmd", trainer_launcher._hydra_subprocess_cmd
    )
    monkeypatch.delattr(fabric_launcher, "_hydra_subprocess_cmd")
    with pytest.raises(ShimError) as err:
        shims.replace_hydra_subprocess_cmd(lambda local_rank: ([], "."))
    assert_one_line_naming(err, "lightning")


def test_onednn_bf16_supported_asks_onednn() -> None:
    supported = shims.onednn_bf16_supported()
    assert supported is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_onednn_bf16_supported_fails_in_one_line_without_the_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())
    with pytest.raises(ShimError) as err:
        shims.onednn_bf16_supported()
    assert_one_line_naming(err, "torch")


def test_stop_fit_as_on_sigterm_is_what_lightning_s_loops_read() -> None:
    import lightning as L

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert not trainer.received_sigterm
    shims.stop_fit_as_on_sigterm(trainer)
    assert trainer.received_sigterm  # the property Lightning's fit and epoch loops check


def test_stop_fit_as_on_sigterm_fails_in_one_line_without_the_connector() -> None:
    with pytest.raises(ShimError) as err:
        shims.stop_fit_as_on_sigterm(types.SimpleNamespace())
    assert_one_line_naming(err, "lightning")


@pytest.mark.integration
def test_a_command_run_as_a_program_ends_with_its_files_and_log_written(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = f"""
import atexit, logging
from pathlib import Path
from vision_tl.core.cli import run_as_program
logging.basicConfig(filename={str(tmp_path / "run.log")!r}, level=logging.INFO)
atexit.register(lambda: Path({str(tmp_path / "teardown")!r}).write_text("ran"))
def main():
    Path({str(tmp_path / "result.csv")!r}).write_text("a,b")
    logging.getLogger("command").info("the last line")
run_as_program(main)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert (tmp_path / "result.csv").read_text() == "a,b"
    assert "the last line" in (tmp_path / "run.log").read_text()  # flushed before the end
    assert not (tmp_path / "teardown").exists()  # the interpreter's teardown was skipped


# ------------------------------------------------------------------ nowhere else


def _hydra_key(name: str) -> bool:
    """`_target_`, `_partial_`, ...: Hydra's public config keys, not private names."""
    return name.startswith("_") and name.endswith("_") and not name.startswith("__")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and not _hydra_key(name)


def _own_names(tree: ast.AST) -> set[str]:
    """Names the module binds itself: assignments, defs, classes, imports, arguments."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def private_uses(source: str) -> list[tuple[int, str]]:
    """(line, code) of each reach for another library's private name in `source`:
    `x._name` (unless `x` is self, cls or a `_name` of the module's own), a string
    `"_name"` given to getattr/setattr/hasattr/delattr, an import from a module path
    with a `_private` part, and `from library import _name`."""
    tree = ast.parse(source)
    own = {name for name in _own_names(tree) if name.startswith("_")} | {"self", "cls"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            if not (isinstance(base, ast.Name) and base.id in own):
                found.append(node)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
            and not (isinstance(node.args[0], ast.Name) and node.args[0].id in own)
        ):
            found.append(node)
        elif isinstance(node, ast.Import):
            if any(_private(part) for alias in node.names for part in alias.name.split(".")):
                found.append(node)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level or module.split(".")[0] == "vision_tl":
                continue  # vision_tl's own modules
            if any(_private(part) for part in module.split(".")) or any(
                _private(alias.name) for alias in node.names
            ):
                found.append(node)
    lines = source.splitlines()
    return sorted({(n.lineno, lines[n.lineno - 1].strip()) for n in found})


def test_the_scan_finds_each_kind_of_private_use() -> None:
    source = (
        "import hydra._internal.utils\n"
        "from hydra._internal.utils import get_args_parser\n"
        "from torch.nn.modules.batchnorm import _BatchNorm\n"
        "from vision_tl.core import _helper\n"
        "from __future__ import annotations\n"
        "_CACHE = {}\n"
        "def f(cfg, scheduler, timer):\n"
        "    cfg._get_node('a')\n"
        "    scheduler._last_lr = []\n"
        "    setattr(timer, '_duration', 1)\n"
        "    _CACHE._ok, self._ok, cls._ok, cfg._target_\n"
        "    return getattr(timer, 'time_remaining')(), super().__init__()\n"
    )
    assert [line for line, _ in private_uses(source)] == [1, 2, 3, 8, 9, 10]


def test_private_names_of_other_libraries_only_in_the_shims_module() -> None:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "core/shims.py":
            continue
        for line, code in private_uses(path.read_text()):
            found[(relative, code)] = line
    unexpected = [f"{path}:{line}: {code}" for (path, code), line in found.items()]
    unexpected = [u for (key, u) in zip(found, unexpected, strict=True) if key not in ALLOWED]
    assert not unexpected, "use a public API or a function of core/shims.py:\n" + "\n".join(
        unexpected
    )
    stale = ALLOWED - set(found)
    assert not stale, f"no longer used, remove from ALLOWED: {sorted(stale)}"
