"""User-facing errors.

Anything a user can cause (bad YAML, missing data, unknown names, corrupt
checkpoints) raises ``OkdError``. The CLI prints its message as one line and
exits with status 2; programming errors keep their traceback.
"""


class OkdError(Exception):
    """A mistake in the user's input, reported as one line without a traceback."""


class ConfigError(OkdError):
    """Invalid configuration: unknown key, wrong type, value out of range."""


class DataError(OkdError):
    """A dataset that is missing, unreadable or inconsistent."""


class CheckpointError(OkdError):
    """A checkpoint that cannot be used for this run."""
