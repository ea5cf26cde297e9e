"""The errors adaptune raises for bad input.

Every message says *where* the problem is (file and line, config field, model name) and *what was
expected*, so that a user can fix it without reading a traceback. They are raised before any
training starts.
"""

from __future__ import annotations


class AdaptuneError(Exception):
    """Base class: a problem the user can fix (as opposed to a bug in adaptune)."""


class ConfigError(AdaptuneError, ValueError):
    """A config field is unknown, has the wrong type or an impossible value."""


class DataError(AdaptuneError, ValueError):
    """A data file is missing, empty or malformed."""

    def __init__(self, message: str, path: object = None, line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}" + (f", line {line}" if line is not None else "") + ": "
        super().__init__(where + message)
        self.path = path
        self.line = line


class ModelError(AdaptuneError, ValueError):
    """A model name cannot be resolved, or a model does not support what was asked of it."""


class NotApplicable(ConfigError, ModelError):
    """A method cannot be used on this model at all (BitFit on a bias-free model, a rank larger
    than the adapted layers): a sweep lists such cells as skipped rather than failed."""


class OutputDirError(AdaptuneError):
    """The output folder cannot be used for this run."""


class TrainingDiverged(AdaptuneError, RuntimeError):
    """The loss became NaN or infinite."""


class Interrupted(AdaptuneError):
    """SIGTERM or SIGINT stopped a run (cluster preemption, Ctrl-C); the message says whether a
    checkpoint was saved and how to resume."""
