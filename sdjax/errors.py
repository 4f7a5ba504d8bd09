"""Errors a user can act on. Each message says what is wrong and how to fix it, on one line."""


class SdjaxError(Exception):
    """Base class of the errors sdjax raises for bad input (the CLI prints them without a traceback)."""


class ConfigError(SdjaxError, ValueError):
    """A model or run configuration sdjax cannot honour."""


class WeightsError(SdjaxError, ValueError):
    """Weights that cannot be found, read or matched to the model."""
