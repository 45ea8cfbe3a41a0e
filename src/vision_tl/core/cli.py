"""What every `python -m vision_tl.<command>` entry point shares: a command line checked
before Hydra starts, values checked before any work, and one-line errors.

Hydra reports a typo in a key, a missing config option or an unwritable run dir as a
multi-line message or a traceback; `command` composes the config first, the way Hydra
will, and turns each of those into one `error: KEY=VALUE: ...` line with exit status 1.
SIGTERM and SIGINT end a command with one `interrupted by ...` line and status 128 + the
signal (`core.signals`).
"""

from __future__ import annotations

import errno
import functools
import gc
import logging
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from omegaconf import DictConfig, OmegaConf

from vision_tl.core.config import config_dir, register_resolvers
from vision_tl.core.errors import ConfigError, find_user_error
from vision_tl.core.logs import quiet_third_party
from vision_tl.core.shims import end_process_now, hydra_args_parser
from vision_tl.core.signals import Interrupted, handle_signals, report
from vision_tl.core.validate import did_you_mean, validate, violations

log = logging.getLogger(__name__)

T = TypeVar("T")

# OS errors that the user fixes (space, permissions, a read-only or missing place).
_USER_OS_ERRORS = {
    errno.EACCES,
    errno.EPERM,
    errno.ENOSPC,
    errno.EROFS,
    errno.EDQUOT,
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EFBIG,
}
# Each sweep dimension is checked value by value, up to this many compositions.
_MAX_COMPOSITIONS = 32


def os_error_line(err: BaseException | None) -> str | None:
    """`PATH: reason` for an OS error behind `err` that the user can fix, else None."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _USER_OS_ERRORS:
            where = err.filename if err.filename is not None else "a file"
            return f"{where}: {err.strerror or err}"
        err = err.__cause__ or err.__context__
    return None


def freeze_startup() -> None:
    """Once per process, take every object alive now out of the cyclic garbage collector's
    sight (`gc.freeze`). A command has imported its modules by now (torch, Lightning:
    about 540,000 objects, alive as long as the process), and each full collection walked
    them all: 0.25-0.3 s on the 2-core CPU, 8 times (1.0 s) in an 18 s linear probe of
    hymenoptera, once in a 4 s scan of 10,000 files. Loader workers forked later leave
    those pages shared too. Once only: in a sweep's process, a later job's freeze would
    keep an earlier job's garbage for good."""
    global _FROZEN
    if not _FROZEN:
        gc.freeze()
        _FROZEN = True


_FROZEN = False


def run_command(work: Callable[..., T], cfg: DictConfig, *args: Any) -> T:
    """Validate `cfg`, then run `work(cfg, *args)` with third-party noise filtered
    (`core.logs`) and the start-up's objects frozen (`freeze_startup`); an error the user
    can fix (a config value, a file, a full disk, a permission) exits with one line, not a
    traceback."""
    quiet_third_party()
    freeze_startup()
    try:
        validate(cfg)
        return work(cfg, *args)
    except Exception as err:
        user_error = find_user_error(err)
        line = str(user_error) if user_error is not None else os_error_line(err)
        if line is None:
            raise
        line = line.splitlines()[0] if line else type(err).__name__
        log.error("%s", line)
        raise SystemExit(f"error: {line}") from None


def command(config_name: str) -> Callable[[Callable[[DictConfig], T]], Callable[[], T]]:
    """`@hydra.main` on `conf/<config_name>.yaml`, after `check_command_line`, with
    SIGTERM and SIGINT handled (`core.signals`)."""
    import hydra

    def decorate(task: Callable[[DictConfig], T]) -> Callable[[], T]:
        hydra_main = hydra.main(
            version_base="1.3", config_path=str(config_dir()), config_name=config_name
        )(task)

        @functools.wraps(task)
        def main() -> T:
            with handle_signals():
                try:
                    check_command_line(config_name, sys.argv[1:])
                    return hydra_main()
                except ConfigError as err:
                    raise SystemExit(f"error: {err}") from None
                except Interrupted as stop:
                    raise report(stop, config_name) from None

        return main

    return decorate


def run_as_program(main: Callable[[], object]) -> NoReturn:
    """Run a command's `main` as the program and end the process once it returns: its
    results are written and closed and its log is flushed here, so the interpreter's
    teardown (0.7-1.9 s of module finalizers in torch and OpenVINO on the 2-core CPU) is
    skipped. A failure exits as `main` makes it exit."""
    main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    end_process_now(0)


def check_command_line(config_name: str, argv: list[str]) -> None:
    """Compose the config as Hydra will and raise a one-line `ConfigError` for an unknown
    key or option, a bad value (every value of a sweep) or a run dir that cannot be written."""
    args, _ = hydra_args_parser().parse_known_args(argv)
    if (
        args.help
        or args.hydra_help
        or args.cfg
        or args.info
        or args.shell_completion
        or args.config_path
        or args.config_dir
        or args.experimental_rerun
    ):
        return
    name = args.config_name or config_name
    overrides = list(args.overrides)
    register_resolvers()
    first: DictConfig | None = None
    multirun = bool(args.multirun) or _config_sets_multirun(name, overrides)
    for variant in _variants(overrides, multirun=multirun):
        cfg = _compose(name, variant)
        found = violations(cfg)
        if found:
            raise ConfigError(found[0])
        if first is None:
            first = cfg
    if first is not None:
        multirun = bool(args.multirun) or str(first.hydra.mode) == "RunMode.MULTIRUN"
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        _check_writable(key, OmegaConf.select(first, key))


def _config_sets_multirun(config_name: str, overrides: list[str]) -> bool:
    """Whether a sweep value without -m is one a config's multirun will search
    (`hparams_search=optuna` sets hydra.mode=MULTIRUN): composed without the sweeps."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:
        return False  # `_variants` says what cannot be parsed
    plain = [o.input_line or "" for o in parsed if not o.is_sweep_override()]
    if len(plain) == len(parsed):
        return False
    return str(_compose(config_name, plain).hydra.mode) == "RunMode.MULTIRUN"


def _variants(overrides: list[str], multirun: bool) -> Iterator[list[str]]:
    """The override lists to check: each sweep value in turn, the others at their first."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException, OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse the overrides: {str(err).splitlines()[0]}") from None
    choices: list[list[str]] = []
    for override in parsed:
        line = override.input_line or ""
        if not override.is_sweep_override():
            choices.append([line])
            continue
        if not multirun:
            raise ConfigError(f"{line}: a sweep over values needs -m (--multirun)")
        try:
            values = list(override.sweep_string_iterator())
        except HydraException:  # interval(), tag(): Optuna draws them; the key is still checked
            values = []
        prefix = line.split("=", 1)[0]
        choices.append([f"{prefix}={v}" for v in values])
    base = [c[0] for c in choices if c]
    yield base
    count = 1
    for index, options in enumerate(choices):
        for option in options[1:]:
            if count >= _MAX_COMPOSITIONS:
                return
            count += 1
            before = [c[0] for c in choices[:index] if c]
            after = [c[0] for c in choices[index + 1 :] if c]
            yield [*before, option, *after]


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException

    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return compose(config_name, overrides=overrides, return_hydra_config=True)
    except MissingConfigException as err:
        raise ConfigError(_missing_option(err, overrides)) from None
    except ConfigCompositionException as err:
        raise ConfigError(_composition_problem(config_name, err, overrides)) from None


def _missing_option(err: Any, overrides: list[str]) -> str:
    missing = str(getattr(err, "missing_cfg_file", "") or "")
    group, _, option = missing.rpartition("/")
    options = [str(o) for o in (getattr(err, "options", None) or [])]
    given = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == group), None)
    if not group or not options:
        return str(err).splitlines()[0]
    return (
        f"{given or f'{group}={option}'}: not a config of {group}/ "
        f"(one of {', '.join(options)}){did_you_mean(option, options)}"
    )


def _composition_problem(config_name: str, err: Exception, overrides: list[str]) -> str:
    message = str(err)
    if message.startswith("Could not override '"):
        key = message.split("'")[1]
        given = next((o for o in overrides if o.split("=", 1)[0] == key), key)
        others = [o for o in overrides if o.split("=", 1)[0] != key]
        try:
            known = _dotted_keys(_compose(config_name, others))
        except ConfigError:
            known = []
        return f"{given}: no such key{did_you_mean(key, known)} (+{given} adds a new key)"
    return message.splitlines()[0]


def _dotted_keys(cfg: DictConfig | dict, prefix: str = "") -> list[str]:
    """Every key path of `cfg`, groups and leaves, without Hydra's own node (nothing is
    resolved: `${now:...}` and the like need Hydra's runtime)."""
    tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    keys = []
    for key, value in tree.items():
        if not prefix and key == "hydra":
            continue
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, dict):
            keys.extend(_dotted_keys(value, f"{path}."))
    return keys


def _check_writable(key: str, directory: Any) -> None:
    """Fail in one line when `directory` cannot be created or written, before Hydra tries."""
    path = Path(str(directory)).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={directory}: {existing} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".vision_tl-", dir=existing)
        Path(probe).rmdir()
    except OSError as err:
        raise ConfigError(
            f"{key}={directory}: cannot write under {existing} ({err.strerror or err})"
        ) from None
