"""Text normalisation applied to every document before tokenization."""

from __future__ import annotations

import re
import unicodedata

# C0/C1 control characters except tab and newline; backspace overstrike is removed with its character below.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_OVERSTRIKE = re.compile(r".\x08")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """NFC-normalise, drop control characters, unify newlines and trim trailing space and excess blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    while "\x08" in text:
        stripped = _OVERSTRIKE.sub("", text)
        if stripped == text:
            break
        text = stripped
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
    text = _MANY_BLANK_LINES.sub("\n\n", text)
    return text.strip()
