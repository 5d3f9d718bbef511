"""The errors that are the user's to fix: entry points print their message alone and exit with 2."""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A bad value, file, folder or machine that the user can fix; the message names the value and the fix."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (a model that cannot be built, sizes that do not fit)."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used for what was asked (another model, no run config, unreadable)."""


class DivergenceError(UserError, FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and what to try."""


class DataError(UserError, ValueError):
    """A dataset is missing, malformed or unreadable; the message names the path and the fix."""


class SharedDataError(DataError):
    """A `DataError` that rank 0 raised and prints, raised on the other ranks too so that all stop together:
    they exit with its status without printing it again."""


class HardwareError(UserError, RuntimeError):
    """The trainer asks for devices this machine does not have."""


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (a full disk, a quota, a read-only folder); the previous one is intact."""


class RankError(UserError):
    """Another rank of this DDP run ended with a user's error (its message is printed above this one)."""
