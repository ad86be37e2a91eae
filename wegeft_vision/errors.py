"""The errors a user's input causes: the command line prints them as one line and exits 2.

Raise these on purpose where a path, a name or a value the user gave is at fault; anything else
is a bug and keeps its traceback. They subclass the built-in types a library user would catch.
"""
from __future__ import annotations


class UserError(ValueError):
    """A value, setting or file content the user gave is wrong; the message names it."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class RunFolderInUseError(UserError):
    """A run folder already holds another run's files, or another process is working in it."""


class UserTypeError(UserError, TypeError):
    """A value the user gave has the wrong type."""
