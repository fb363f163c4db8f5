"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""


class AhaError(Exception):
    """Base class of errors caused by the user's input (recipe, data, model path), not by a bug."""


class ConfigError(AhaError, ValueError):
    """A recipe or override that cannot run; the message says what to change."""


class DataError(AhaError, ValueError):
    """A dataset that cannot be used as configured (missing column, empty, unreadable)."""
