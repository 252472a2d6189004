"""User-facing errors: one clear message naming what is wrong and where, never a traceback (see ``cli.main``)."""


class SSTokenError(Exception):
    """Base class of errors caused by user input (configs, data, model paths); the CLI prints only the message."""


class DataError(SSTokenError, ValueError):
    """A data file or record is malformed, missing a field, or the dataset is empty."""


class ConfigError(SSTokenError, ValueError):
    """A configuration value is out of range or inconsistent (e.g. ratio outside (0, 1])."""
