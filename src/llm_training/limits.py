"""Bounds on what a user's file may cost: YAML whose aliases expand without end ("billion laughs") or nest
too deep, JSON nested too deep for the parser, text that UTF-8 cannot encode (lone surrogates from
``"\\ud800"`` escapes), and the caps on per-line sizes that ``llm-evaluate`` and ``llm-infer`` read.

Every reader of user input goes through these, so one hostile input gives one line naming the file and the
line, in bounded time and memory, instead of a traceback or a 2 GB error message."""

from __future__ import annotations

import functools
import json
import re
from typing import Any

MAX_YAML_NODES = 100_000  # values in a config after its aliases are expanded; real configs have < 500
MAX_YAML_DEPTH = 64  # nesting of a config; real configs use 3
MAX_CONFIG_BYTES = 1 << 18  # a config file (PyYAML reads about 0.5 MB/s); the shipped ones are under 4 kB
MAX_LINE_BYTES = 16 << 20  # one line (record) of a test or prompt file, as data.max_document_bytes' default
MAX_NEW_TOKENS = 1 << 20  # new tokens per prompt in llm-infer (about 4 MB of text)
MAX_CHOICES = 1000  # choices of one multiple-choice item, and labels of a classification file

_SURROGATE = re.compile("[\ud800-\udfff]")


class InputLimitError(ValueError):
    """A YAML document past one of the bounds above; the message says which, and where."""


def surrogate_at(text: str) -> int | None:
    """Where ``text`` holds a lone surrogate (from a JSON ``\\ud800`` escape), which no file can hold."""
    found = _SURROGATE.search(text)
    return None if found is None else found.start()


def bad_text(value: Any) -> str | None:
    """Why a string cannot be used as text (a lone surrogate), or None."""
    if isinstance(value, str) and (at := surrogate_at(value)) is not None:
        return (
            f"a lone surrogate \\u{ord(value[at]):04x} at character {at} (from an escape such as \\ud800, or "
            "bytes that are not UTF-8), which is not Unicode text"
        )
    return None


def json_loads(text: str | bytes) -> Any:
    """``json.loads`` whose too-deep nesting or too-long numbers are a ``JSONDecodeError`` like any other
    malformed JSON (its position is unknown: 0)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError:  # an integer of more than 4,300 digits
        raise json.JSONDecodeError("a number too long to read", "", 0) from None


MAX_JSON_FILE_BYTES = 64 << 20  # a JSON file the tool wrote and reads back (a report, a marker, a record)


def read_json_file(path, max_bytes: int = MAX_JSON_FILE_BYTES) -> Any:
    """A JSON file read back (a report, a folder's marker, a job record): one larger than ``max_bytes``, not
    UTF-8, malformed or nested too deeply is a ``ValueError`` that names the file; unreadable, an OSError."""
    with open(path, "rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputLimitError(f"{path}: larger than the {max_bytes:,} bytes such a file has; it is not one")
    try:
        return json_loads(data.decode("utf-8-sig"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


@functools.cache
def _loader_class():
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """A SafeLoader that refuses nesting past MAX_YAML_DEPTH while it composes (before any recursion
        limit), and, through ``check_nodes``, aliases that expand past MAX_YAML_NODES and repeated keys."""

        depth = 0

        def compose_node(self, parent, index):
            self.depth += 1
            try:
                if self.depth > MAX_YAML_DEPTH:
                    line = self.peek_event().start_mark.line + 1
                    raise InputLimitError(f"line {line}: nested deeper than {MAX_YAML_DEPTH} levels")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return BoundedLoader


def _check_nodes(root) -> None:
    """Count the values the document expands to (an alias counts its whole target each time it is used),
    without expanding anything; refuse recursive aliases and keys repeated in one mapping."""
    import yaml

    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if finished:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_YAML_NODES:
                raise InputLimitError(
                    f"line {node.start_mark.line + 1}: its aliases expand to more than {MAX_YAML_NODES:,} "
                    "values (a 'billion laughs' document?); write the values out instead"
                )
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise InputLimitError(f"line {node.start_mark.line + 1}: an alias refers to itself")
        on_path.add(key)
        stack.append((node, True))
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for k, _ in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value in seen and k.tag != "tag:yaml.org,2002:merge":
                    raise InputLimitError(
                        f"line {k.start_mark.line + 1}: key '{k.value[:100]}' repeated (first on line "
                        f"{seen[k.value]}); give each key once"
                    )
                if isinstance(k, yaml.ScalarNode):
                    seen[k.value] = k.start_mark.line + 1
        stack.extend((c, False) for c in children if id(c) not in sizes)


_BRACKET = re.compile(r"[\[\]{}]")


def _flow_depth_check(text: str) -> None:
    """Refuse deep ``[[[...`` / ``{{{...`` before PyYAML's scanner sees them: it looks ahead over every open
    bracket at each one (quadratic: 5,000 take seconds, 100,000 hours). Brackets inside quoted text count
    too, which only matters for a config holding more than MAX_YAML_DEPTH unclosed ones."""
    depth = 0
    for match in _BRACKET.finditer(text):
        depth = depth + 1 if match.group() in "[{" else max(0, depth - 1)
        if depth > MAX_YAML_DEPTH:
            line = text.count("\n", 0, match.start()) + 1
            raise InputLimitError(f"line {line}: nested deeper than {MAX_YAML_DEPTH} levels")


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` within the bounds above: raises ``InputLimitError`` past them, ``yaml.YAMLError``
    on malformed YAML."""
    _flow_depth_check(text)
    loader = _loader_class()(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node)
        try:
            return loader.construct_document(node)
        except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4,300 digits
            raise InputLimitError(f"a value cannot be read ({str(exc)[:200]})") from None
    finally:
        loader.dispose()
