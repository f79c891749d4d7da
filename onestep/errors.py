"""Errors that mean bad input from the user, never a bug in onestep.

Each message is one line that names the file, key or value and what would be accepted. The command line
prints it after ``error:`` (``config error:`` for a `ConfigError`) and exits with status 2; Python callers
catch `InputError`. This module imports nothing from onestep, so every layer can raise these.
"""
from __future__ import annotations


class InputError(ValueError):
    """Base of every one-line user error."""


class ConfigError(InputError):
    """A bad configuration: an unknown key, a wrong type, a value out of range or a refused combination."""


class UnknownNameError(ConfigError, KeyError):
    """A config named a teacher, objective or metric that is not registered; the message lists what is."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class DataError(InputError):
    """An unusable data file or folder (image folder, prompt file)."""


class TeacherWeightsError(InputError):
    """A teacher folder whose files exist but cannot be used."""


class TeacherFilesMissingError(InputError, FileNotFoundError):
    """A teacher file that cannot be had: not in the local folder, or not reachable on the hub (no network,
    or HF_HUB_OFFLINE without a cached copy). The message names the file and the option that points to a
    local copy."""

    def __str__(self) -> str:  # OSError would prefix errno fields when given several args
        return self.args[0]


class ExportError(InputError):
    """A run that cannot be exported as asked (missing checkpoint, unsupported format or step count)."""


class ResumeError(InputError):
    """A run's latest checkpoint cannot be loaded (refused or unreadable)."""


class UsageError(InputError):
    """A bad command-line argument found after argparse has parsed the line."""
