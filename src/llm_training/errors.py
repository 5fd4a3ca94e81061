"""Errors a user can fix. The CLI prints them as one line and exits with status 2, no traceback."""

from __future__ import annotations

import re


class UserError(Exception):
    """Bad input (a file, a flag, a config key): the message says what is wrong and what to do."""

    exit_code = 2


class ConfigError(UserError):
    """A configuration key, type or value that cannot be used."""


class DataError(UserError):
    """Input data that cannot be read or prepared."""


class StorageError(UserError):
    """A file that cannot be written or read: a full disk, a quota, a read-only file system, permissions."""


QUOTE_LIMIT = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # line breaks and terminal control codes


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters, computed in bounded time and
    memory: a user's value may be a 100 MB string, a YAML alias bomb or a 5,000-digit number."""
    import reprlib

    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"<an integer of {value.bit_length():,} bits>"
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, limit, limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 8
    text = short.repr(value)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate prints as \ud800


def one_line(message: str, limit: int = 2000) -> str:
    """A message as one printable line of at most ``limit`` characters (the CLI's last guard)."""
    # line breaks and terminal control codes (a path holding an escape sequence) print as spaces
    text = _CONTROL.sub(" ", str(message))
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
