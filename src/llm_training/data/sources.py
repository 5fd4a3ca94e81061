"""Readers that turn input files into documents (an id and a text)."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from llm_training.errors import DataError

SAMPLE_NAME = "python_reference.jsonl.gz"
FORMATS = ("txt", "jsonl", "json")


@dataclass(frozen=True)
class Document:
    id: str
    text: str


def sample_data_path() -> Path:
    """The built-in sample: the Python Language Reference's topics (PSF licence), shipped with the package."""
    return Path(str(resources.files("llm_training") / "sample_data" / SAMPLE_NAME))


def detect_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() not in (".gz",)]
    ext = suffixes[-1].lstrip(".") if suffixes else "txt"
    if ext in ("jsonl", "ndjson"):
        return "jsonl"
    if ext == "json":
        return "json"
    return "txt"


def _open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")  # noqa: SIM115


def read_documents(path: str | Path, text_field: str = "text", fmt: str | None = None) -> Iterator[Document]:
    """Yield the documents of ``path``; errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"input file not found: {path}")
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass one file (.txt, .jsonl, .json, optionally .gz)")
    if path.stat().st_size == 0:
        raise DataError(f"input file is empty: {path}")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"{path}: unknown format '{fmt}' (valid: {', '.join(FORMATS)})")
    reader = {"txt": _read_txt, "jsonl": _read_jsonl, "json": _read_json}[fmt]
    lines = None
    try:
        with _open_binary(path) as handle:
            lines = _Lines(handle)
            yield from reader(lines, path, text_field)
    except UnicodeDecodeError as exc:
        where = f" at line {lines.number + 1}" if lines is not None else ""
        raise DataError(
            f"{path}: not valid UTF-8{where} ({exc.reason}); convert it with `iconv -t UTF-8` first"
        ) from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


class _Lines:
    """Decodes a binary handle line by line (strict UTF-8, so a bad byte is reported with its line instead of
    being silently replaced) and remembers how many lines were read."""

    def __init__(self, handle) -> None:
        self.handle, self.number = handle, 0

    def __iter__(self):
        for raw in self.handle:
            yield raw.decode("utf-8")
            self.number += 1


def _read_txt(lines: _Lines, path: Path, text_field: str):
    """A plain text file is one document."""
    text = "".join(lines)
    if text:
        yield Document(path.name, text)


def _read_jsonl(lines: _Lines, path: Path, text_field: str):
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{number}: invalid JSON ({exc.msg}); each line must be one JSON object"
            ) from None
        yield _record_to_doc(record, f"{path.name}:{number}", path, number, text_field)


def _read_json(lines: _Lines, path: Path, text_field: str):
    try:
        data = json.loads("".join(lines))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    records = data if isinstance(data, list) else data.get("data") if isinstance(data, dict) else None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records (or an object with a 'data' list)")
    for index, record in enumerate(records):
        yield _record_to_doc(record, f"{path.name}:{index}", path, index, text_field)


def _record_to_doc(record, default_id: str, path: Path, where: int, text_field: str) -> Document:
    if isinstance(record, str):
        return Document(default_id, record)
    if not isinstance(record, dict):
        raise DataError(
            f"{path}:{where}: expected an object with a '{text_field}' field, got {type(record).__name__}"
        )
    text = record.get(text_field)
    if not isinstance(text, str):
        keys = ", ".join(sorted(record)) or "none"
        raise DataError(f"{path}:{where}: no text field '{text_field}' (fields: {keys}); set data.text_field")
    return Document(str(record.get("id", default_id)), text)
