"""Errors a user can fix: entry points print them as one line, without a traceback."""

from __future__ import annotations


class VisionTLError(Exception):
    """Base class for problems with the user's input (config, files, weights)."""


class ConfigError(VisionTLError, ValueError):
    """A config value, path or name that cannot be used."""


class WeightsError(VisionTLError):
    """Pretrained weights that cannot be obtained or do not fit the model."""


def find_user_error(err: BaseException | None) -> VisionTLError | None:
    """The user-fixable error behind `err`, if any (Hydra's instantiate wraps them)."""
    while err is not None:
        if isinstance(err, VisionTLError):
            return err
        err = err.__cause__ or err.__context__
    return None


def error_line(err: BaseException) -> str:
    """`Type: first line of the message`, for a one-line reason in logs and CSVs."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
