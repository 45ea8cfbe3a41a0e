"""Errors a user can fix: entry points print them as one line, without a traceback."""


class VisionTLError(Exception):
    """Base class for problems with the user's input (config, files, weights)."""


class ConfigError(VisionTLError, ValueError):
    """A config value, path or name that cannot be used."""


class WeightsError(VisionTLError):
    """Pretrained weights that cannot be obtained or do not fit the model."""
