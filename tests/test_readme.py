"""README.md keeps its word: a short user guide whose links resolve, one console script per
command, and every `python -m vision_tl.<command>` line it shows accepted by that command's
own command-line check (the check `@command` runs before Hydra starts)."""

from __future__ import annotations

import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_image_folder

from vision_tl.core.cli import check_command_line
from vision_tl.core.errors import ConfigError

README = REPO / "README.md"
MAX_LINES = 400
PACKAGE = REPO / "src" / "vision_tl"

# Placeholders and example paths README's command lines use, and what each stands for. The
# test makes each under tmp_path and substitutes it; longer entries win over their
# prefixes (`OUT/clean_manifest.csv` before `OUT`). A placeholder README uses but this
# table lacks fails the test: add it here, with the kind of thing it stands for.
#   images: a tiny image folder (train/val/test, class subfolders)
#   file:   an existing file (check_command_line only checks that a file exists)
#   folder: an existing folder
#   new:    a folder that does not exist yet (a run or sweep dir)
PLACEHOLDERS = {
    "DIR": "images",
    "IMAGES": "images",
    "POOL": "images",
    "UNKNOWN_DIR": "images",
    "/path/to/images": "images",
    "../shared/datasets/hymenoptera": "images",
    "~/.cache/vision_tl/datasets/shapes-v1/test": "images",
    "CKPT": "file",
    "FILE": "file",
    "W0": "file",
    "W2": "file",
    "TEACHER/checkpoints/best.ckpt": "file",
    "RUN/checkpoints/best.ckpt": "file",
    "RUN/checkpoints/last.ckpt": "file",
    "RUN_DIR/checkpoints/best.ckpt": "file",
    "OUT/clean_manifest.csv": "file",
    "outputs/tour_sweep/0/checkpoints/best.ckpt": "file",
    "../shared/weights/tf_efficientnet_lite0.in1k.safetensors": "file",
    "../shared/weights": "folder",
    "outputs/tour_sweep": "folder",
    "SHARED/sweep": "folder",
    "SHARED": "folder",
    "SHARED/RUN": "new",
    "SHARDS": "folder",
    "OUT": "new",
    "RUN_DIR": "new",
    "NAME": "new",
}

# README command lines this test cannot check, each with the reason. Keep it tiny: a line
# that needs GPUs or a cluster to run still composes and validates here.
NOT_CHECKED: dict[str, str] = {}

# An upper-case word inside a value is a placeholder (DIR, CKPT, MY_DATA, ...).
_PLACEHOLDER_WORD = re.compile(r"(?<![A-Za-z0-9_])[A-Z][A-Z0-9_]+(?![A-Za-z0-9_])")
# Keys whose value is a path that must exist (the CLI check covers most; weights paths are
# read only when the model is built, so the table must cover them here).
_PATH_KEYS = re.compile(r"(^|\.)(root|manifest|ckpt_path|input|teacher|weights_dir|weights_path)$")


def _code_lines(text: str) -> list[str]:
    """The lines of every fenced code block, backslash continuations joined."""
    lines: list[str] = []
    fenced = False
    pending = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            fenced = not fenced
            pending = ""
            continue
        if not fenced:
            continue
        line = f"{pending} {raw.strip()}" if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        pending = ""
        lines.append(_strip_comment(line))
    return lines


def _strip_comment(line: str) -> str:
    """`line` without a trailing shell comment (a `#` that starts a word outside quotes)."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip()
    return line


def _commands(line: str) -> list[list[str]]:
    """The `... -m vision_tl.<command> ...` argument lists on one shell line (comments
    stripped; `a && b` gives both), whatever starts the module: `python`, `srun python`,
    `torchrun --nnodes=2 ...`, `NODE_RANK=I python`."""
    if "vision_tl." not in line:
        return []
    words = shlex.split(line, comments=True)
    found, current = [], []
    for word in [*words, "&&"]:
        if word in ("&&", "||", ";", "|"):
            module = next(
                (
                    i + 1
                    for i in range(len(current) - 1)
                    if current[i] == "-m" and current[i + 1].startswith("vision_tl.")
                ),
                None,
            )
            if module is not None:
                found.append(current[module:])
            current = []
        else:
            current.append(word)
    return found


def readme_command_lines() -> list[str]:
    return [line for line in _code_lines(README.read_text()) if _commands(line)]


def _make(kind: str, path: Path) -> Path:
    if kind == "images":
        if not path.exists():
            make_image_folder(
                path, classes=("cat", "dog"), per_class=2, splits=("train", "val", "test"), size=16
            )
    elif kind == "file":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    elif kind == "folder":
        path.mkdir(parents=True, exist_ok=True)
    elif kind != "new":
        raise ValueError(f"unknown placeholder kind {kind!r}")
    return path


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each placeholder's stand-in path, made under a temporary folder."""
    root = tmp_path_factory.mktemp("readme")
    made = {}
    for index, (name, kind) in enumerate(PLACEHOLDERS.items()):
        slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
        made[name] = str(_make(kind, root / f"{index:02d}_{slug}"))
    return made


def _substitute(value: str, stand_ins: dict[str, str]) -> str:
    names = sorted(stand_ins, key=len, reverse=True)
    pattern = "|".join(re.escape(n) for n in names)
    # A placeholder starts a value or follows a separator, and ends the path or the item.
    return re.sub(
        rf"(?<![\w./~-])({pattern})(?![\w.-])",
        lambda m: stand_ins[m.group(1)],
        value,
    )


def _unknown_placeholders(value: str) -> list[str]:
    known = sorted(PLACEHOLDERS, key=len, reverse=True)
    rest = re.sub("|".join(re.escape(n) for n in known), "", value)
    return _PLACEHOLDER_WORD.findall(rest)


def _check_report(argv: list[str]) -> None:
    """`vision_tl.report` is argparse, not Hydra: its parser must accept the line, and an
    existing empty folder then gets the command's own 'no jobs found' answer."""
    from vision_tl.report import main

    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert str(stop.value).startswith("error: no jobs found"), (
        f"`python -m vision_tl.report {' '.join(argv)}` was refused: {stop.value}"
    )


# --------------------------------------------------------------------------- unit


@pytest.mark.unit
def test_readme_is_a_short_guide_whose_links_resolve() -> None:
    text = README.read_text()
    count = len(text.splitlines())
    assert count <= MAX_LINES, f"README.md has {count} lines; keep it at most {MAX_LINES}"
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link for link in links if not re.match(r"[a-z]+:", link) and not link.startswith("#")]
    assert any(link.startswith("docs/") for link in local), "README links into docs/"
    for link in local:
        path, _, anchor = link.partition("#")
        target = (REPO / path).resolve()
        assert target.exists(), f"README links to {link}, which does not exist"
        if anchor and target.is_file():
            assert anchor in _anchors(target.read_text()), (
                f"README links to {link}: no such heading"
            )
    for anchor in re.findall(r"\]\(#([^)\s]+)\)", text):
        assert anchor in _anchors(text), f"README links to #{anchor}: no such heading"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    prose = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)  # no code comments
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", prose, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def entry_point_modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


@pytest.mark.unit
def test_every_command_has_a_console_script_named_in_readme() -> None:
    # tomllib is Python >= 3.11; on 3.10 its backport tomli, when installed
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    modules = entry_point_modules()
    expected = {f"vision-tl-{name}": f"vision_tl.{name}:main" for name in modules}
    assert scripts == expected, "[project.scripts] maps vision-tl-<name> onto each entry point"
    readme = README.read_text()
    for script, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr, None)), target
        assert f"`{script}`" in readme, f"README does not name the script {script}"
        assert f"python -m {module}" in readme, f"README does not show python -m {module}"


@pytest.mark.unit
def test_readme_shows_every_command_and_lists_no_stale_exception() -> None:
    lines = readme_command_lines()
    shown = {argv[0] for line in lines for argv in _commands(line)}
    missing = {f"vision_tl.{name}" for name in entry_point_modules()} - shown
    assert not missing, f"README shows no command line for {sorted(missing)}"
    stale = set(NOT_CHECKED) - set(lines)
    assert not stale, f"NOT_CHECKED lists lines README no longer has: {stale}"


# Integration: every README line composed through Hydra (~11 s for the ~45 lines).
@pytest.mark.integration
@pytest.mark.parametrize("line", readme_command_lines(), ids=lambda line: line)
def test_readme_command_line_passes_the_commands_own_check(
    line: str, stand_ins: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if line in NOT_CHECKED:
        pytest.skip(NOT_CHECKED[line])
    monkeypatch.chdir(tmp_path)  # relative run dirs (outputs/...) land here, not in the repo
    for argv in _commands(line):
        name = argv[0].removeprefix("vision_tl.")
        args = []
        for word in argv[1:]:
            key, sep, value = word.partition("=")
            unknown = _unknown_placeholders(value if sep else word)
            assert not unknown, (
                f"README's `{line}` uses {unknown} in {word!r}: add it to PLACEHOLDERS in "
                f"{Path(__file__).name} (what it stands for: images, file, folder or new)"
            )
            value = _substitute(value if sep else word, stand_ins)
            if (
                sep
                and _PATH_KEYS.search(key.lstrip("+~"))
                and not Path(value).expanduser().exists()
            ):
                pytest.fail(
                    f"README's `{line}`: {word} names a path this test cannot make: add it to "
                    f"PLACEHOLDERS in {Path(__file__).name}"
                )
            args.append(f"{key}={value}" if sep else value)
        if (REPO / "conf" / f"{name}.yaml").exists():
            try:
                check_command_line(name, args)
            except ConfigError as err:
                pytest.fail(f"README's `{line}` is refused: error: {err}")
        elif name == "report":
            _check_report(args)
        else:
            pytest.fail(f"README's `{line}`: no way to check vision_tl.{name}; teach this test")
