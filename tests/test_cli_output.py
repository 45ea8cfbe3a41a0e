"""What a user sees: a training run prints each line once, with no advertisement, no
warning and no summary line that says something false (core/logs.py, training/summary.py)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from conftest import TINY, make_image_folder, run_cli

from vision_tl.core.logs import quiet_third_party
from vision_tl.training.summary import ModelSummary

# Hydra's console format, `[2025-01-31 12:00:00,123][logger.name][INFO] - message`, and the
# one Lightning's own handler adds, `INFO: message`: both reduce to the message.
TIMESTAMP = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+\]")
HYDRA_PREFIX = re.compile(r"^\[[\w.]+\]\[[A-Z]+\] - ")
LEVEL_PREFIX = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL): ")
# Lines of a rich table's frame, repeated by any two tables of the same width.
FRAME = re.compile(r"^[\s\u2500-\u257f]*$")
# A warning as Python prints it (`path.py:12: Category: message`), as Lightning does
# (`path.py:12: message`), or logged (`[name][WARNING] - message`).
WARNED = re.compile(r"^\S+\.py:\d+: |warn", re.IGNORECASE)


def messages(output: str) -> list[str]:
    """Each non-blank line of `output` without its timestamp and logger prefix."""
    lines = []
    for raw in output.splitlines():
        line = LEVEL_PREFIX.sub("", HYDRA_PREFIX.sub("", TIMESTAMP.sub("", raw))).strip()
        if line and not FRAME.match(line):
            lines.append(line)
    return lines


@pytest.mark.slow  # 12 s; the unit tests below hold the log's rules in the suite
def test_a_training_run_prints_each_line_once_and_nothing_false(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=6)
    # TINY, but with the model summary a user sees; test=false: the best checkpoint is
    # restored once (for calibration), so no line is repeated by right.
    overrides = [o for o in TINY if "enable_model_summary" not in o]
    result = run_cli(
        [
            "vision_tl.train",
            *overrides,
            f"data.root={root}",
            "trainer.max_epochs=1",
            "test=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    lines = messages(output)
    assert any("Trainable params" in line for line in lines), "no model summary:\n" + output

    seen: set[str] = set()
    twice = [line for line in lines if line in seen or seen.add(line)]
    assert not twice, "printed twice:\n" + "\n".join(twice)
    assert "litlogger" not in output.lower() and "Tip:" not in output, output
    warned = [line for line in output.splitlines() if WARNED.search(TIMESTAMP.sub("", line))]
    assert not warned, "warnings:\n" + "\n".join(warned)
    zero_flops = [line for line in lines if "flop" in line.lower() and re.search(r"\b0\b", line)]
    assert not zero_flops, "a FLOPs count of 0:\n" + "\n".join(zero_flops)


def test_lightning_lines_reach_the_root_handler_only_and_its_advert_none(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import lightning.pytorch  # noqa: F401  (adds Lightning's own handler)

    names = ("lightning", "lightning.pytorch", "lightning.fabric")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    for logger in [*map(logging.getLogger, names), rank_zero]:  # restored after the test
        monkeypatch.setattr(logger, "handlers", list(logger.handlers))
        monkeypatch.setattr(logger, "filters", list(logger.filters))
        monkeypatch.setattr(logger, "propagate", logger.propagate)
    quiet_third_party()
    quiet_third_party()  # a second command in the same process (a joblib worker)
    assert all(not logging.getLogger(n).handlers and logging.getLogger(n).propagate for n in names)
    with caplog.at_level(logging.INFO):
        rank_zero.info("GPU available: False, used: False")
        rank_zero.info("💡 Tip: try installing [litlogger](https://pypi.org/project/litlogger/)")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_the_model_summary_leaves_flops_out(capsys: pytest.CaptureFixture[str]) -> None:
    columns = [(" ", ["0"]), ("Name", ["model"]), ("Type", ["Net"]), ("Params", ["11.2 M"])]
    columns += [("Mode", ["train"]), ("FLOPs", ["0"])]
    ModelSummary.summarize(columns, 11_200_000, 11_200_000, 44.7, {"train": 1, "eval": 0}, 0)
    printed = capsys.readouterr().out
    assert "model" in printed and "Total params: 11.2 M" in printed
    assert "flop" not in printed.lower()


def test_trainer_enable_model_summary_still_turns_the_summary_off(compose_train) -> None:
    assert compose_train([], Path("/tmp")).callbacks.model_summary.enabled is True
    cfg = compose_train(["+trainer.enable_model_summary=false"], Path("/tmp"))
    assert cfg.callbacks.model_summary.enabled is False
