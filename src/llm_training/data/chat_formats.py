"""Fine-tuning records: the six common JSON shapes, read from a file and normalised to messages.

A file's format is detected from its first record (every later record must have that shape) or named:

| format | a record | becomes |
|---|---|---|
| ``text`` | ``{"text": ...}`` | continued pretraining: every token trained, no chat template |
| ``prompt_completion`` | ``{"prompt": ..., "completion": ...}`` | user prompt, assistant completion |
| ``alpaca`` | ``{"instruction": ..., "input": ..., "output": ...}`` | user ``instruction`` (+ blank line + ``input``), assistant ``output`` |
| ``messages`` | ``{"messages": [{"role": ..., "content": ...}, ...]}`` (OpenAI) | the messages |
| ``sharegpt`` | ``{"conversations": [{"from": "human", "value": ...}, ...]}`` | ``human``/``gpt``/``system`` as user/assistant/system |
| ``preference`` | ``{"prompt": ..., "chosen": ..., "rejected": ...}`` | prompt messages + the two continuations |

Prompts, completions and the two continuations may be strings or message lists (TRL's "conversational"
forms); a preference record without ``prompt`` takes the messages its two conversations share as the prompt.
``prompt_completion`` and ``alpaca`` records may carry a ``system`` string. Roles are ``system``, ``user``
and ``assistant``. A bad record is a :class:`~llm_training.errors.DataError` naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_training.errors import DataError, quoted
from llm_training.limits import MAX_LINE_BYTES, bad_text, json_loads

ROLES = ("system", "user", "assistant")
FORMATS = ("text", "prompt_completion", "alpaca", "messages", "sharegpt", "preference")
SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}
MAX_JSON_BYTES = 1 << 30  # a .json list is parsed whole (about 10x its size in memory); JSON Lines stream


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class ChatExample:
    """One record, normalised. ``kind`` is ``"text"`` (one assistant message holding the text, encoded
    without a template), ``"chat"`` (a conversation) or ``"pair"`` (``messages`` is the prompt; ``chosen`` and
    ``rejected`` are the two continuations). ``source`` names the file and line, for errors later on."""

    messages: tuple[Message, ...]
    chosen: tuple[Message, ...] = ()
    rejected: tuple[Message, ...] = ()
    kind: str = "chat"
    source: str = ""


@dataclass
class ChatFile:
    path: str
    format: str  # one of FORMATS
    detected: bool  # False when the caller named the format
    examples: list[ChatExample]


def detect_format(record: Any) -> str | None:
    """The format a record's keys say it is in, or None."""
    if not isinstance(record, dict):
        return None
    if "chosen" in record and "rejected" in record:
        return "preference"
    for key, fmt in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca")):
        if key in record:
            return fmt
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return "text" if "text" in record else None


def parse_record(record: Any, fmt: str, where: str, origin: str = "") -> ChatExample:
    """``record`` (a parsed JSON object) in format ``fmt`` as a ChatExample; ``where`` ("file: line 3")
    starts every error message; ``origin`` says where the format came from ("detected from line 1")."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {_kind(record)}")
    missing = [key for key in _REQUIRED[fmt] if key not in record]
    if missing:
        seen = detect_format(record)
        hint = f"; it looks like a {seen} record" if seen and seen != fmt else ""
        hint += f" (the format was {origin})" if origin else ""
        raise DataError(
            f"{where}: a {fmt} record needs {', '.join(repr(k) for k in missing)} "
            f"(has {quoted(sorted(map(str, record)))}){hint}"
        )
    return _PARSERS[fmt](record, where)


def parse_records(records: Iterable[Any], fmt: str | None = None, source: str = "records") -> ChatFile:
    """In-memory records (dicts, e.g. rows of a Hugging Face dataset) as a ChatFile; errors name the
    record's number in ``source``."""
    return _collect(((i, r) for i, r in enumerate(records, 1)), fmt, source, "record")


def read_chat_file(path: str | Path, fmt: str | None = None) -> ChatFile:
    """Every record of a JSON Lines file (``.jsonl``, gzip or zstd compressed too) or of a JSON list
    (``.json``, or an object with a ``data`` list), in format ``fmt`` or the one its first record has."""
    path = str(path)
    plain = path.split("?")[0].lower().removesuffix(".gz").removesuffix(".zst")
    unit = "record" if plain.endswith(".json") else "line"
    records = _json_list(path) if unit == "record" else _jsonl(path)
    return _collect(records, fmt, path, unit)


# ---- records ---------------------------------------------------------------------------------------------------


def _collect(numbered: Iterable[tuple[int, Any]], fmt: str | None, source: str, unit: str) -> ChatFile:
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"unknown record format {quoted(fmt)}; choose one of {', '.join(FORMATS)}")
    detected, examples, origin = fmt is None, [], ""
    for number, record in numbered:
        where = f"{source}: {unit} {number}"
        if fmt is None:
            fmt, origin = detect_format(record), f"detected from {unit} {number}"
            if fmt is None:
                what = (
                    f"keys {quoted(sorted(map(str, record)))}" if isinstance(record, dict) else _kind(record)
                )
                raise DataError(
                    f"{where}: cannot tell the record format from {what}; records need 'text', 'prompt' + "
                    "'completion', 'instruction' + 'output', 'messages', 'conversations' or 'prompt' + "
                    "'chosen' + 'rejected' (or name the format)"
                )
        examples.append(parse_record(record, fmt, where, origin))
    if not examples:
        raise DataError(f"{source}: no records (an empty file?)")
    return ChatFile(source, fmt, detected, examples)  # type: ignore[arg-type]


def _jsonl(path: str) -> Iterator[tuple[int, Any]]:
    from llm_training.data.sources import _open  # .gz, .zst and fsspec URLs, as every other input

    try:
        with _open(path) as handle:
            for number, raw in enumerate(iter(lambda: handle.readline(MAX_LINE_BYTES + 1), b""), 1):
                if len(raw) > MAX_LINE_BYTES:
                    raise DataError(f"{path}: line {number}: longer than the {MAX_LINE_BYTES:,} bytes a record "
                                    "may hold; shorten or split it")  # fmt: skip
                if raw.strip():
                    yield number, _decode(raw, path, f"line {number}", number == 1)
    except FileNotFoundError:
        raise DataError(f"fine-tuning data not found: {path}") from None
    except (EOFError, OSError) as exc:
        raise DataError(f"{path}: cannot be read ({exc}); is the file truncated?") from None


def _json_list(path: str) -> Iterator[tuple[int, Any]]:
    from llm_training.data.sources import _open

    try:
        with _open(path) as handle:
            content = handle.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise DataError(f"fine-tuning data not found: {path}") from None
    except (EOFError, OSError) as exc:
        raise DataError(f"{path}: cannot be read ({exc}); is the file truncated?") from None
    if len(content) > MAX_JSON_BYTES:
        raise DataError(f"{path}: over {MAX_JSON_BYTES:,} bytes, too large to read whole; write it as JSON "
                        "Lines (.jsonl), one record a line")  # fmt: skip
    data = _decode(content, path, "", True)
    records = data.get("data") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records (or an object with a 'data' list)")
    yield from enumerate(records, 1)


def _decode(raw: bytes, path: str, where: str, first: bool) -> Any:
    at = f"{path}: {where}" if where else path
    try:
        return json_loads(raw.decode("utf-8-sig" if first else "utf-8"))  # -sig: a byte-order mark is no text
    except UnicodeDecodeError:
        raise DataError(f"{at}: not UTF-8 text; save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        line = f" (line {exc.lineno})" if not where and exc.lineno > 1 else ""
        raise DataError(f"{at}{line}: not valid JSON ({exc.msg})") from None


# ---- fields ----------------------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    return (
        "null"
        if value is None
        else {dict: "an object", list: "a list", str: "a string"}.get(type(value), type(value).__name__)
    )


def _text(value: Any, where: str, name: str) -> str:
    """``value`` if it is a string a model can read, else a one-line error."""
    if not isinstance(value, str):
        raise DataError(f"{where}: {name} is {_kind(value)}, not a string")
    why = bad_text(value)
    if why is not None:
        raise DataError(f"{where}: {name} holds {why}; fix or drop this record")
    return value


def _messages(
    value: Any, where: str, name: str, role_key: str, content_key: str, roles: dict
) -> list[Message]:
    if not isinstance(value, list):
        raise DataError(f"{where}: {name} is {_kind(value)}, not a list of messages")
    if not value:
        raise DataError(f"{where}: {name} is empty (a conversation needs messages)")
    out = []
    for index, item in enumerate(value, 1):
        what = f"message {index} of {name}"
        if not isinstance(item, dict):
            raise DataError(
                f"{where}: {what} is {_kind(item)}, not an object with {role_key!r} and {content_key!r}"
            )
        role = item.get(role_key)
        if role not in roles:
            raise DataError(
                f"{where}: {what} has {role_key} {quoted(role, 60)}; use one of {', '.join(roles)}"
            )
        if content_key not in item:
            raise DataError(f"{where}: {what} has no {content_key!r}")
        out.append(Message(roles[role], _text(item[content_key], where, f"the {content_key!r} of {what}")))
    return out


_OPENAI = {role: role for role in ROLES}


def parse_messages(value: Any, where: str) -> list[Message]:
    """An OpenAI ``messages`` list as a prompt (a conversation to reply to: no assistant message needed);
    a bad one is a one-line :class:`DataError` starting with ``where``."""
    return _messages(value, where, "'messages'", "role", "content", _OPENAI)


def _turns(value: Any, where: str, name: str, role: str) -> list[Message]:
    """A string (one message of ``role``) or an OpenAI message list."""
    if isinstance(value, str):
        return [Message(role, _text(value, where, name))]
    if isinstance(value, list):
        return _messages(value, where, name, "role", "content", _OPENAI)
    raise DataError(f"{where}: {name} is {_kind(value)}, not a string or a list of messages")


def _system(record: dict, where: str) -> list[Message]:
    value = record.get("system")
    return [] if value in (None, "") else [Message("system", _text(value, where, "'system'"))]


def _chat(messages: list[Message], where: str, name: str) -> tuple[Message, ...]:
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"{where}: {name} has no assistant message, so nothing to learn from")
    return tuple(messages)


def _parse_text(record: dict, where: str) -> ChatExample:
    text = _text(record["text"], where, "'text'")
    if not text:
        raise DataError(f"{where}: 'text' is empty")
    return ChatExample((Message("assistant", text),), kind="text", source=where)


def _parse_prompt_completion(record: dict, where: str) -> ChatExample:
    prompt = _turns(record["prompt"], where, "'prompt'", "user")
    completion = _turns(record["completion"], where, "'completion'", "assistant")
    messages = _chat(_system(record, where) + prompt + completion, where, "the record")
    return ChatExample(messages, source=where)


def _parse_alpaca(record: dict, where: str) -> ChatExample:
    instruction = _text(record["instruction"], where, "'instruction'")
    extra = _text(record.get("input") or "", where, "'input'")
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    answer = Message("assistant", _text(record["output"], where, "'output'"))
    return ChatExample((*_system(record, where), Message("user", prompt), answer), source=where)


def _parse_messages(record: dict, where: str) -> ChatExample:
    messages = _messages(record["messages"], where, "'messages'", "role", "content", _OPENAI)
    return ChatExample(_chat(messages, where, "'messages'"), source=where)


def _parse_sharegpt(record: dict, where: str) -> ChatExample:
    messages = _messages(record["conversations"], where, "'conversations'", "from", "value", SHAREGPT_ROLES)
    return ChatExample(_chat(messages, where, "'conversations'"), source=where)


def _parse_preference(record: dict, where: str) -> ChatExample:
    chosen = _turns(record["chosen"], where, "'chosen'", "assistant")
    rejected = _turns(record["rejected"], where, "'rejected'", "assistant")
    if "prompt" in record:
        prompt = _turns(record["prompt"], where, "'prompt'", "user")
    elif isinstance(record["chosen"], list) and isinstance(record["rejected"], list):
        shared = 0  # TRL's implicit prompt: the messages both conversations begin with
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        raise DataError(f"{where}: a preference record without 'prompt' needs 'chosen' and 'rejected' as "
                        "whole conversations (message lists) that begin with the same prompt")  # fmt: skip
    if not prompt:
        raise DataError(f"{where}: the preference record has no prompt (its conversations share no message)")
    return ChatExample(
        tuple(prompt),
        _chat(chosen, where, "'chosen'"),
        _chat(rejected, where, "'rejected'"),
        kind="pair",
        source=where,
    )


_REQUIRED = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "preference": ("chosen", "rejected"),
}
_PARSERS = {
    "text": _parse_text,
    "prompt_completion": _parse_prompt_completion,
    "alpaca": _parse_alpaca,
    "messages": _parse_messages,
    "sharegpt": _parse_sharegpt,
    "preference": _parse_preference,
}
