"""Errors a user can fix. The CLI prints them as one line and exits with status 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a file, a flag, a config key): the message says what is wrong and what to do."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration key, type or value that cannot be used."""


class DataError(UserError):
    """Input data that cannot be read or prepared."""


class StorageError(UserError):
    """A file that cannot be written or read: a full disk, a quota, a read-only file system, permissions."""
