"""Text normalisation applied to every document before scoring and tokenization."""

from __future__ import annotations

import re
import unicodedata

# C0/C1 control characters except tab and newline; backspace overstrike is removed with its character below.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_OVERSTRIKE = re.compile(r".\x08")
_MANY_BLANK_LINES = re.compile("\n\n\n+")  # a literal first character keeps re's scan fast


def clean_text(text: str) -> str:
    """NFC-normalise, drop control characters, unify newlines and trim trailing space and excess blank lines.

    Each step is skipped when a cheap test shows it has nothing to do (most documents are already clean).
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    while "\x08" in text:
        stripped = _OVERSTRIKE.sub("", text)
        if stripped == text:
            break
        text = stripped
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    if " \n" in text or "\t\n" in text:
        text = "\n".join([line.rstrip(" \t") for line in text.split("\n")])
    if "\n\n\n" in text:
        text = _MANY_BLANK_LINES.sub("\n\n", text)
    return text.strip()
