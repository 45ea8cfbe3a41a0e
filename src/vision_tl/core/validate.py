"""How config values are checked before any work: the rule mechanism and the schema.

Each package keeps the rules of the keys it reads in its own `rules` module (a `Rules`
table: `data/rules.py`, `training/rules.py`, ...) and registers it here; a rule applies
wherever its key exists (`data.batch_size` in train and eval, `top_k` in predict), so every
entry config, every value of a `-m` sweep included, is checked by the same schema before
the first job. A violation is one line, `KEY=VALUE: what is allowed`, raised as a
`ConfigError`. Names that live in a registry (backbones, heads) are checked where the
registry is read.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from vision_tl.core.errors import ConfigError

MISSING = object()


@dataclass(frozen=True)
class Allowed:
    """A predicate on a config value and the words that tell the user what passes it
    (`words` may be computed when needed: a registry's names, read on first use)."""

    test: Callable[[Any], bool]
    words: str | Callable[[], str]

    @property
    def text(self) -> str:
        return self.words() if callable(self.words) else self.words

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):
            return False


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def integer(minimum: int = 0) -> Allowed:
    words = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    return Allowed(lambda v: is_int(v) and v >= minimum, words)


def number(
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> Allowed:
    """A finite number within the given bounds."""
    bounds = [
        (gt, lambda v, b: v > b, f"> {gt}"),
        (ge, lambda v, b: v >= b, f">= {ge}"),
        (lt, lambda v, b: v < b, f"< {lt}"),
        (le, lambda v, b: v <= b, f"<= {le}"),
    ]
    active = [(b, check, words) for b, check, words in bounds if b is not None]
    words = "a number" + (" " + " and ".join(w for _, _, w in active) if active else "")
    return Allowed(
        lambda v: is_number(v) and all(check(float(v), b) for b, check, _ in active), words
    )


def one_of(*values: Any) -> Allowed:
    shown = ", ".join(str(v) for v in values)
    return Allowed(lambda v: str(v) in {str(x) for x in values}, f"one of {shown}")


def or_null(allowed: Allowed, meaning: str) -> Allowed:
    return Allowed(
        lambda v: v is None or allowed(v), lambda: f"{allowed.text}, or null ({meaning})"
    )


def registered(names: Callable[[], Iterable[str]], extra: Sequence[str] = ()) -> Allowed:
    """A name in a registry (read when first checked, so checking imports nothing heavy),
    or one of `extra`."""

    def every() -> list[str]:
        return [*extra, *names()]

    return Allowed(lambda v: str(v) in every(), lambda: f"one of {', '.join(every())}")


def sequence(length: int, item: Allowed, what: str) -> Allowed:
    def test(value: Any) -> bool:
        return (
            isinstance(value, (list, tuple, ListConfig))
            and len(value) == length
            and all(item(v) for v in value)
        )

    return Allowed(test, f"a list of {length} {what}")


FLAG = Allowed(lambda v: isinstance(v, bool), "true or false")
PROBABILITY = number(ge=0, le=1)
FRACTION = number(gt=0, lt=1)
WORKERS = or_null(integer(0), "one per CPU core, up to a cap")


def path(kind: str) -> Allowed:
    """An existing folder, file or either (relative to where the command runs)."""
    checks = {"folder": Path.is_dir, "file": Path.is_file, "path": Path.exists}
    return Allowed(lambda v: checks[kind](Path(str(v)).expanduser()), f"an existing {kind}")


Check = Callable[[DictConfig], list[str]]


@dataclass(frozen=True)
class Rules:
    """One package's config checks, kept next to the code that reads the keys: a rule per
    key (applied wherever the key exists in an entry config) and `checks` that read
    several keys at once."""

    keys: Mapping[str, Allowed]
    checks: tuple[Check, ...] = ()


# Every package's table, registered when the package's `rules` module is imported (the
# `vision_tl` package imports them all), so the command-line check sees one schema.
SCHEMA: list[Rules] = []


def register_rules(rules: Rules) -> Rules:
    """Add a package's table to the schema every command is checked against."""
    clash = set(rules.keys) & {k for r in SCHEMA for k in r.keys}
    if clash:
        raise KeyError(f"config keys checked twice: {sorted(clash)}")
    SCHEMA.append(rules)
    return rules


def _shown(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_shown(v) for v in value) + "]"
    return str(value)


def select(cfg: DictConfig, key: str) -> Any:
    """The value at `key`, lists as lists; `MISSING` when the key is absent."""
    value = OmegaConf.select(cfg, key, default=MISSING, throw_on_missing=False)
    if isinstance(value, ListConfig):
        return list(value)
    return value


def violations(cfg: DictConfig, schema: Sequence[Rules] | None = None) -> list[str]:
    """Every `KEY=VALUE: allowed` line for `cfg` (empty when it is valid)."""
    found = []
    for rules in SCHEMA if schema is None else schema:
        for key, allowed in rules.keys.items():
            value = select(cfg, key)
            if value is MISSING or allowed(value):
                continue
            found.append(f"{key}={_shown(value)}: {allowed.text}")
        for check in rules.checks:
            found.extend(check(cfg))
    return found


def check_values(
    prefix: str,
    values: Mapping[str, Any],
    rules: Rules,
    context: Mapping[str, Any] | None = None,
) -> None:
    """Raise the first violation of `rules` by `values` (the fields of an object built in
    code, e.g. a fine-tune policy), as if they were the config node `prefix`; `context`:
    other nodes the rules' cross-key checks read (e.g. `{"data": {"unlabeled": ...}}`)."""
    node = OmegaConf.create({**(context or {}), prefix: {k: _plain(v) for k, v in values.items()}})
    found = violations(node, [rules])
    if found:
        raise ConfigError(found[0])


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def validate(cfg: DictConfig) -> None:
    """Raise a one-line `ConfigError` for the first invalid value."""
    found = violations(cfg)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ConfigError(found[0] + more)


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate a typo most likely meant, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Sequence[str]) -> str:
    """`; did you mean X?` for a close candidate, else an empty string."""
    match = closest(name, candidates)
    return f"; did you mean {match}?" if match else ""
