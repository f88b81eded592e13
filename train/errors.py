"""Errors a user can cause or a run cannot recover from, in one place.

Each message starts with the field, flag or path it is about, so the command line prints it as
one line: ``ConfigError``, ``DataError`` and ``WorkdirError`` exit with code 2 (bad input, nothing
started), ``CheckpointError`` and ``NonFiniteError`` with 1 (a run that cannot go on).
"""


class ConfigError(ValueError):
    """A user-caused configuration error; the message starts with the field or path."""


class DataError(ValueError):
    """A user-caused data problem; the message starts with the path or config field."""


class WorkdirError(ValueError):
    """A user-caused problem with --workdir; the message starts with the flag."""


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that cannot be written (the message names the folder)."""


class NonFiniteError(RuntimeError):
    """Training stopped after too many consecutive non-finite steps (the message names the step)."""


USER_ERRORS = (ConfigError, DataError, WorkdirError)  # exit code 2
RUN_ERRORS = (CheckpointError, NonFiniteError)  # exit code 1
