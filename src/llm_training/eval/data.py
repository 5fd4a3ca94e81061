"""Test data for ``llm-evaluate``: plain text, or labelled JSON Lines (multiple choice or text + label).

Formats (one JSON object a line in .jsonl, or a JSON list in .json; the kind is taken from the first record
and every record must be of that kind):
- plain text: a ``.txt`` file, or records ``{"text": ...}``;
- multiple choice: ``{"prompt": ..., "choices": [...], "answer": <index or the choice's text>}``;
- classification: ``{"text": ..., "label": ...}``; the choices are every label in the file, and each is
  scored as the continuation of ``<text>\\nLabel:``.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

from llm_training.errors import DataError


@dataclass
class TextSet:
    documents: list[str]
    kind: str = "text"
    source: str = ""  # the file it was read from


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


def _records(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    name = path.name.removesuffix(".gz")
    with opener(path, "rt", encoding="utf-8") as handle:
        if name.endswith(".json"):
            try:
                data = json.load(handle)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of records (or JSON Lines in a .jsonl file)")
            yield from ((i, r) for i, r in enumerate(data, 1))
            return
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {number}: not valid JSON ({exc.msg})") from None


def _kind(record, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "choices" in record or "answer" in record:
        return "choices"
    if "label" in record:
        return "labels"
    if "text" in record:
        return "text"
    raise DataError(
        f"{where}: no 'text', 'prompt'+'choices'+'answer' or 'text'+'label' field (has {sorted(record)})"
    )


def read_test_data(path: str | Path) -> TextSet | ChoiceSet:
    data = _read(Path(path))
    data.source = str(path)
    return data


def _read(path: Path) -> TextSet | ChoiceSet:
    if not path.is_file():
        raise DataError(f"test data not found: {path}")
    if path.name.removesuffix(".gz").endswith((".txt", ".md")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="strict") as handle:
            text = handle.read()
        if not text.strip():
            raise DataError(f"{path}: empty test file")
        return TextSet([text])
    kind, texts, raw = None, [], []
    for number, record in _records(path):
        where = f"{path}: line {number}"
        this = _kind(record, where)
        if kind is None:
            kind = this
        elif this != kind:
            raise DataError(f"{where}: a {this} record in a file of {kind} records")
        if kind == "text":
            if not isinstance(record["text"], str):
                raise DataError(f"{where}: 'text' must be a string")
            texts.append(record["text"])
        else:
            raw.append((number, record, where))
    if kind is None:
        raise DataError(f"{path}: empty test file (no records)")
    if kind == "text":
        return TextSet(texts)
    if kind == "labels":
        labels = sorted({str(r["label"]) for _, r, _ in raw})
        items = []
        for number, r, where in raw:
            if not isinstance(r.get("text"), str):
                raise DataError(f"{where}: a labelled record needs a string 'text'")
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
        choices = [str(c) for c in choices]
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
            index = answer
        elif isinstance(answer, str) and answer in choices:
            index = choices.index(answer)
        else:
            raise DataError(
                f"{where}: 'answer' {answer!r} is neither an index below {len(choices)} nor one of the choices"
            )
        items.append(ChoiceItem(prompt, choices, index, number))
    return ChoiceSet(items, "choices")
