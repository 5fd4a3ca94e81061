"""Test data for ``llm-evaluate``: plain text, or labelled JSON Lines (multiple choice or text + label).

Formats (one JSON object a line in .jsonl, or a JSON list in .json; the kind is taken from the first record
and every record must be of that kind):
- plain text: a ``.txt`` file, or records ``{"text": ...}``;
- multiple choice: ``{"prompt": ..., "choices": [...], "answer": <index or the choice's text>}``;
- classification: ``{"text": ..., "label": ...}``; the choices are every label in the file, and each is
  scored as the continuation of ``<text>\\nLabel:``;
- chat: the records ``llm-finetune`` reads (``messages``, ``prompt``/``completion``, Alpaca's ``instruction``,
  ShareGPT's ``conversations``; ``data/chat_formats.py``), scored on the assistant's tokens (``eval/chat.py``).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

from llm_training.data.chat_formats import detect_format, read_chat_file
from llm_training.errors import DataError, quoted
from llm_training.fileio import HANDLED, storage_error
from llm_training.limits import MAX_CHOICES, MAX_LINE_BYTES, bad_text, json_loads


@dataclass
class TextSet:
    documents: list[str]
    kind: str = "text"
    source: str = ""  # the file it was read from


@dataclass
class ChatSet:
    examples: list  # data.chat_formats.ChatExample
    format: str  # as chat_formats names it: messages, prompt_completion, alpaca, sharegpt
    kind: str = "chat"
    source: str = ""


@dataclass
class ChoiceItem:
    prompt: str
    choices: list[str]
    answer: int
    line: int


@dataclass
class ChoiceSet:
    items: list[ChoiceItem]
    kind: str  # "choices" or "labels"
    labels: list[str] = field(default_factory=list)  # classification: the classes, in order
    source: str = ""  # the file it was read from


def read_text(path: Path) -> str:
    """A test or prompt file's text (gzip by suffix); bytes that are not UTF-8 are a one-line error naming
    the line."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as exc:
        if isinstance(exc, OSError) and exc.errno in HANDLED:
            raise storage_error(exc, path) from None
        raise DataError(f"{path}: cannot be read ({exc})") from None
    if len(data) > MAX_LINE_BYTES:  # a line past the cap would take minutes to score: refused, not cut
        lengths = [len(line) for line in data.split(b"\n")]
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[longest] > MAX_LINE_BYTES:
            raise DataError(f"{path}: line {longest + 1}: {lengths[longest]:,} bytes, more than the "
                            f"{MAX_LINE_BYTES:,} a line may hold; split it into several lines")  # fmt: skip
    try:
        return data.decode("utf-8-sig")  # -sig: a byte-order mark is not text
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text; save the file as UTF-8") from None


def _skip(text: str, i: int, chars: str) -> int:
    while text[i] in chars:
        i += 1
    return i


def _array_lines(text: str, start: int) -> list[int]:
    """The line of each element of the JSON array that opens at ``text[start]`` (already known valid);
    newlines are counted once, as the walk goes."""
    decoder, lines, i = json.JSONDecoder(), [], start + 1
    line, counted = text.count("\n", 0, start) + 1, start
    while True:
        i = _skip(text, i, " \t\r\n,")
        if text[i] == "]":
            return lines
        line, counted = line + text.count("\n", counted, i), i
        lines.append(line)
        i = decoder.raw_decode(text, i)[1]


def _data_array(text: str) -> int | None:
    """Where the array under the top-level key "data" of a (valid) JSON object opens."""
    decoder, i = json.JSONDecoder(), _skip(text, 0, " \t\r\n") + 1
    while True:
        i = _skip(text, i, " \t\r\n,")
        if text[i] == "}":
            return None
        key, i = decoder.raw_decode(text, i)
        i = _skip(text, i, " \t\r\n:")
        if key == "data" and text[i] == "[":
            return i
        i = decoder.raw_decode(text, i)[1]


def _records(path: Path):
    """(line, record) of a JSON Lines file or of a JSON list (or ``{"data": [...]}``) in a .json file."""
    text = read_text(path)
    if path.name.removesuffix(".gz").endswith(".json"):
        try:
            data = json_loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
            found = _data_array(text)
            lines = _array_lines(text, found) if found is not None else []
        elif isinstance(data, list):
            lines = _array_lines(text, len(text) - len(text.lstrip()))
        else:
            raise DataError(f"{path}: expected a JSON list of records (or JSON Lines in a .jsonl file)")
        if len(lines) != len(data):  # a repeated "data" key (JSON keeps the last): record numbers instead
            lines = list(range(1, len(data) + 1))
        yield from zip(lines, data, strict=True)
        return
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield number, json_loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None


def _text(value, where: str, name: str) -> str:
    """``value`` if it is text a model can read, else a one-line error naming the line."""
    if not isinstance(value, str):
        raise DataError(
            f"{where}: {name} is {'null' if value is None else type(value).__name__}, not a string"
        )
    why = bad_text(value)
    if why is not None:
        raise DataError(f"{where}: {name} holds {why}; fix or drop this record")
    return value


def _kind(record, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "choices" in record or "answer" in record:
        return "choices"
    if "label" in record:
        return "labels"
    chat = detect_format(record)
    if chat == "preference":
        raise DataError(f"{where}: a preference pair (chosen/rejected); llm-evaluate scores one reply a record "
                        "(messages, prompt/completion, instruction/output, conversations)")  # fmt: skip
    if chat not in (None, "text"):
        return "chat"
    if "text" in record:
        return "text"
    raise DataError(f"{where}: no 'text', 'prompt'+'choices'+'answer', 'text'+'label' or chat fields ('messages', "
                    f"'prompt'+'completion', ...) (has {quoted(sorted(map(str, record)))})")  # fmt: skip


def read_test_data(path: str | Path) -> TextSet | ChoiceSet | ChatSet:
    data = _read(Path(path))
    data.source = str(path)
    return data


def _read(path: Path) -> TextSet | ChoiceSet | ChatSet:
    if not path.is_file():
        raise DataError(f"test data not found: {path}")
    if path.name.removesuffix(".gz").endswith((".txt", ".md")):
        text = read_text(path)
        if not text.strip():
            raise DataError(f"{path}: empty test file")
        return TextSet([text])
    kind, texts, raw = None, [], []
    for number, record in _records(path):
        where = f"{path}: line {number}"
        this = _kind(record, where)
        if kind is None and this == "chat":  # read as llm-finetune reads it: every record in that format
            chats = read_chat_file(path)
            return ChatSet(chats.examples, chats.format)
        if kind is None:
            kind = this
        elif this != kind:
            raise DataError(f"{where}: a {this} record in a file of {kind} records")
        if kind == "text":
            texts.append(_text(record["text"], where, "'text'"))
        else:
            raw.append((number, record, where))
    if kind is None:
        raise DataError(f"{path}: empty test file (no records)")
    if kind == "text":
        return TextSet(texts)
    if kind == "labels":
        labels = sorted({_text(str(r["label"]), where, "'label'") for _, r, where in raw})
        if len(labels) > MAX_CHOICES:  # every item is scored against every label
            raise DataError(f"{path}: {len(labels):,} different labels, more than {MAX_CHOICES:,}; "
                            "is 'label' a class, not a free text?")  # fmt: skip
        items = []
        for number, r, where in raw:
            _text(r.get("text"), where, "a labelled record's 'text'")
            items.append(
                ChoiceItem(r["text"].rstrip() + "\nLabel:", labels, labels.index(str(r["label"])), number)
            )
        if len(labels) < 2:
            raise DataError(
                f"{path}: every record has the label {labels[0]!r}; classification needs two or more"
            )
        return ChoiceSet(items, "labels", labels)
    items = []
    for number, r, where in raw:
        prompt, choices, answer = r.get("prompt"), r.get("choices"), r.get("answer")
        if not isinstance(prompt, str) or not isinstance(choices, list) or len(choices) < 2:
            raise DataError(f"{where}: needs a string 'prompt' and a list 'choices' of two or more")
        if len(choices) > MAX_CHOICES:
            raise DataError(f"{where}: {len(choices):,} choices, more than {MAX_CHOICES:,}")
        _text(prompt, where, "'prompt'")
        choices = [_text(str(c), where, "a choice") for c in choices]
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
            index = answer
        elif isinstance(answer, str) and answer in choices:
            index = choices.index(answer)
        else:
            raise DataError(
                f"{where}: 'answer' {quoted(answer)} is neither an index below {len(choices)} nor one of the choices"
            )
        items.append(ChoiceItem(prompt, choices, index, number))
    return ChoiceSet(items, "choices")
