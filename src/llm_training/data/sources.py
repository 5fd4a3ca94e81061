"""Data source connectors: everything that turns some input into a stream of documents.

``DataSourceConnector`` is the base class of the usage guide: subclass it, implement ``documents()`` (and
``connect()`` if the source needs a connection), and pass an instance wherever an input is accepted. The
built-in connectors are ``FileSource`` (files, folders, globs, ``http(s)://``, ``s3://`` and other fsspec
URLs; txt, jsonl, json, csv and parquet; ``.gz`` and ``.zst``) and ``HuggingFaceSource`` (``hf://NAME``).

Reading streams: memory is bounded by the largest document, and a line longer than ``max_document_bytes``
is skipped without being held. Bad records (malformed JSON, a missing text field, bytes that are not UTF-8,
a binary file, a truncated archive, an over-long line) go to a ``Problems`` collector: counted with file and
line for the report by default, or raised at once under ``on_error="fail"``.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from llm_training.errors import DataError, quoted
from llm_training.fileio import storage_error
from llm_training.limits import bad_text, json_loads

SAMPLE_NAME = "python_reference.jsonl.gz"
FORMATS = ("txt", "jsonl", "json", "csv", "parquet")
_EXTENSIONS = {
    ".txt": "txt",
    ".text": "txt",
    ".md": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}
_COMPRESSION = (".gz", ".zst")
DEFAULT_MAX_DOCUMENT_BYTES = 16 * 2**20
_PROBLEM_EXAMPLES = 100
MAX_JSON_FILE_BYTES = 1 << 30  # a .json file is parsed whole (about 10x its size in memory)


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str = ""  # file or URL it came from
    line: int = 0  # line (or record) number within the source, from 1; 0 when not applicable


@dataclass
class DataSourceConnectorOutput:
    """What ``connect`` returns: an id for the connection, its status and whatever the source reports."""

    connection_id: str
    status: str
    metadata: dict = field(default_factory=dict)


class Problems:
    """Bad records met while reading: counted by reason with examples, or fatal under ``on_error="fail"``."""

    def __init__(self, on_error: str = "skip") -> None:
        if on_error not in ("skip", "fail"):
            raise DataError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
        self.on_error = on_error
        self.counts: Counter[str] = Counter()
        self.examples: list[dict] = []

    def record(self, reason: str, source: str, line: int | None, detail: str) -> None:
        where = f"{source}:{line}" if line else source
        if self.on_error == "fail":
            raise DataError(
                f"{where}: {detail} (--on-error skip, or --set data.on_error=skip, skips such records and counts them)"
            )
        self.counts[reason] += 1
        if len(self.examples) < _PROBLEM_EXAMPLES:
            self.examples.append({"reason": reason, "source": source, "line": line, "detail": detail})

    def to_report(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "examples": self.examples}


class DataSourceConnector:
    """Base class of every source. Subclasses implement ``documents()``; ``connect()`` is optional.

    ``event_bus`` (an ``llm_training.EventBus``) receives a ``data_source_connected`` event on ``connect``.
    """

    name = "custom"
    text_field = "text"
    id_field = "id"

    def __init__(self, event_bus=None) -> None:
        self.event_bus = event_bus
        self.problems = Problems()
        self.connection: DataSourceConnectorOutput | None = None

    def connect(self, input_data: Any = None) -> DataSourceConnectorOutput:
        """Open the source; returns a DataSourceConnectorOutput (connection_id, status, metadata) and publishes data_source_connected."""
        self.connection = DataSourceConnectorOutput(
            str(uuid.uuid4()), "connected", {"source": self.describe()}
        )
        if self.event_bus is not None:
            self.event_bus.publish("data_source_connected", connection=self.connection)
        return self.connection

    def documents(self) -> Iterator[Document]:
        """Yield the source's Documents (a subclass implements this)."""
        raise NotImplementedError(f"{type(self).__name__} must implement documents() to yield Documents")

    def to_document(self, record: Any, path: str, number: int) -> Document | None:
        """A record (a string, or a mapping with ``text_field`` and maybe ``id_field``) as a Document; a bad
        record goes to ``problems`` and gives None."""
        if isinstance(record, str):
            return Document(f"{Path(path).name}:{number}", record, path, number)
        if not isinstance(record, dict):
            self.problems.record(
                "not_an_object", path, number, f"expected an object with a '{self.text_field}' field"
            )
            return None
        text = record.get(self.text_field)
        if self.text_field in record and not isinstance(text, str):
            kind = "null" if text is None else type(text).__name__
            self.problems.record(
                "text_not_a_string", path, number, f"field '{self.text_field}' is {kind}, not a string"
            )
            return None
        if not isinstance(text, str):
            keys = sorted(map(str, record))
            shown = ", ".join(quoted(k, 40)[1:-1] for k in keys[:20]) + (", ..." if len(keys) > 20 else "")
            self.problems.record(
                "missing_text_field",
                path,
                number,
                f"no text field '{self.text_field}' (fields: {shown or 'none'}); set --text-field",
            )
            return None
        doc_id = record.get(self.id_field)
        doc_id = str(doc_id) if doc_id is not None else f"{Path(path).name}:{number}"
        why = bad_text(text) or bad_text(doc_id)
        if why is not None:  # from a "\ud800" escape: no file can hold it, so neither can the shards
            self.problems.record("invalid_unicode", path, number, why)
            return None
        return Document(doc_id, text, path, number)

    def describe(self) -> str:
        """A short description of the source, for logs and reports."""
        return type(self).__name__

    def __iter__(self) -> Iterator[Document]:
        return self.documents()


def sample_data_path() -> Path:
    """The built-in sample: the Python Language Reference's topics (PSF licence), shipped with the package."""
    return Path(str(resources.files("llm_training") / "sample_data" / SAMPLE_NAME))


def detect_format(path: str) -> str | None:
    suffixes = [s.lower() for s in Path(path.split("?")[0]).suffixes if s.lower() not in _COMPRESSION]
    return _EXTENSIONS.get(suffixes[-1]) if suffixes else None


def _is_url(spec: str) -> bool:
    return "://" in spec and not spec.startswith("file://")


class FileSource(DataSourceConnector):
    """Files, folders (recursively, files of known formats), glob patterns and fsspec URLs."""

    name = "file"

    def __init__(
        self,
        spec: str | Path,
        *,
        fmt: str | None = None,
        text_field: str = "text",
        id_field: str = "id",
        max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
        on_error: str = "skip",
        event_bus=None,
    ) -> None:
        super().__init__(event_bus)
        if fmt is not None and fmt not in FORMATS:
            raise DataError(f"unknown format '{fmt}' (valid: {', '.join(FORMATS)})")
        self.spec, self.fmt, self.text_field, self.id_field = str(spec), fmt, text_field, id_field
        self.max_document_bytes = max_document_bytes
        self.problems = Problems(on_error)
        self.paths = self._resolve()

    def describe(self) -> str:
        return self.spec

    def _resolve(self) -> list[str]:
        spec = self.spec.removeprefix("file://")
        if _is_url(spec):
            return [spec]
        path = Path(spec).expanduser()
        if any(ch in spec for ch in "*?["):
            paths = sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
            if not paths:
                raise DataError(f"no files match {spec}")
            return paths
        if not path.exists():
            raise DataError(f"input not found: {path}")
        if path.is_dir():
            paths = sorted(
                str(p) for p in path.rglob("*") if p.is_file() and (self.fmt or detect_format(p.name))
            )
            if not paths:
                raise DataError(
                    f"{path}: no input files in this folder (known extensions: {', '.join(_EXTENSIONS)}, "
                    "optionally .gz or .zst)"
                )
            return paths
        if path.stat().st_size == 0:
            raise DataError(f"input file is empty: {path}")
        return [str(path)]

    def documents(self) -> Iterator[Document]:
        for path in self.paths:
            fmt = self.fmt or detect_format(path) or "txt"
            yield from self._read(path, fmt)

    def _read(self, path: str, fmt: str) -> Iterator[Document]:
        if fmt == "parquet":
            yield from _read_parquet(path, self)
            return
        line = 0
        try:
            with _open(path) as raw:
                head = raw.peek(8192)[:8192]
                if b"\x00" in head:
                    self.problems.record("binary_file", path, None, "binary file (NUL bytes), not text")
                    return
                reader = {"txt": _read_txt, "jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}[fmt]
                for doc in reader(raw, path, self):
                    line = doc.line
                    yield doc
        except (EOFError, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise DataError(f"input not found: {path}") from None
            if isinstance(exc, PermissionError):  # the user can fix it: stop rather than train on less
                raise storage_error(exc, path) from None
            self.problems.record(
                "truncated_or_unreadable",
                path,
                line or None,
                f"cannot read past this point ({exc.__class__.__name__}: {exc}); the file may be truncated",
            )
        except ImportError as exc:
            raise DataError(f"{path}: {exc}") from None

    def lines(self, raw, path: str) -> Iterator[tuple[int, str]]:
        """(line number, decoded line) with bounded memory; over-long and non-UTF-8 lines are recorded."""
        limit = self.max_document_bytes
        number = 0
        while True:
            chunk = raw.readline(limit + 1)
            if not chunk:
                return
            number += 1
            if len(chunk) > limit and not chunk.endswith(b"\n"):
                size = len(chunk)
                while chunk and not chunk.endswith(b"\n"):  # skip the rest without holding it
                    chunk = raw.readline(1 << 20)
                    size += len(chunk)
                self.problems.record(
                    "line_too_long",
                    path,
                    number,
                    f"line of {size:,} bytes is longer than max_document_bytes ({limit:,})",
                )
                continue
            try:
                line = chunk.decode("utf-8")
                yield number, line[1:] if number == 1 and line.startswith("\ufeff") else line  # a BOM
            except UnicodeDecodeError as exc:
                self.problems.record(
                    "not_utf8", path, number, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
                )


class HuggingFaceSource(DataSourceConnector):
    """``hf://NAME[?config=C&split=S]``: a dataset through Hugging Face ``datasets`` (streamed), or a folder
    written by ``Dataset.save_to_disk``."""

    name = "huggingface"

    def __init__(self, spec: str, *, text_field: str = "text", id_field: str = "id", event_bus=None) -> None:
        super().__init__(event_bus)
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(spec)
        self.spec = spec
        self.name_or_path = (parts.netloc + parts.path).rstrip("/")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.config, self.split = query.get("config"), query.get("split", "train")
        self.text_field, self.id_field = text_field, id_field

    def describe(self) -> str:
        return self.spec

    def _dataset(self):
        try:
            import datasets
        except ImportError:
            raise DataError(
                "hf:// inputs need Hugging Face datasets: pip install 'llm-training[data]'"
            ) from None
        if Path(self.name_or_path).is_dir():
            loaded = datasets.load_from_disk(self.name_or_path)
            return loaded[self.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        try:
            return datasets.load_dataset(self.name_or_path, self.config, split=self.split, streaming=True)
        except Exception as exc:  # datasets raises many kinds: offline, missing, bad config
            raise DataError(f"{self.spec}: cannot load the dataset ({str(exc).splitlines()[0]})") from None

    def documents(self) -> Iterator[Document]:
        for number, record in enumerate(self._dataset(), 1):
            doc = self.to_document(record, self.spec, number)
            if doc is not None:
                yield doc


def open_source(
    spec: str | Path | DataSourceConnector,
    *,
    fmt: str | None = None,
    text_field: str = "text",
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES,
    on_error: str = "skip",
) -> DataSourceConnector:
    """The connector for an input: a connector is used as it is; ``hf://`` is a dataset; anything else is files."""
    if isinstance(spec, DataSourceConnector):
        return spec
    if str(spec).startswith("hf://"):
        source = HuggingFaceSource(str(spec), text_field=text_field)
        source.problems = Problems(on_error)
        return source
    return FileSource(
        spec, fmt=fmt, text_field=text_field, max_document_bytes=max_document_bytes, on_error=on_error
    )


def read_documents(path: str | Path, text_field: str = "text", fmt: str | None = None) -> Iterator[Document]:
    """The documents of an input, stopping at the first bad record (the strict reader of small inputs)."""
    source = FileSource(path, fmt=fmt, text_field=text_field, on_error="fail")
    return source.documents()


def _open(path: str) -> io.BufferedReader:
    """A binary, buffered, decompressing handle on a local path or an fsspec URL."""
    lower = path.split("?")[0].lower()
    if _is_url(path):
        try:
            import fsspec

            handle = fsspec.open(path, "rb").open()
        except ImportError as exc:
            raise ImportError(f"reading {path.split('://')[0]}:// needs an extra package ({exc})") from None
        except FileNotFoundError:
            raise DataError(f"input not found: {path}") from None
    else:
        handle = open(path, "rb")  # noqa: SIM115 - closed by the caller's with
    if lower.endswith(".gz"):
        return io.BufferedReader(gzip.GzipFile(fileobj=handle))  # type: ignore[arg-type]
    if lower.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(handle, closefd=True))
    return handle if isinstance(handle, io.BufferedReader) else io.BufferedReader(handle)


def _read_txt(raw, path: str, source: FileSource) -> Iterator[Document]:
    """A text file is one document, cut at blank lines into documents of at most ``max_document_bytes``."""
    name, part, start = Path(path).name, 0, 1
    buffer: list[str] = []
    size = 0
    for number, line in source.lines(raw, path):
        encoded = len(line.encode("utf-8")) if not line.isascii() else len(line)
        if buffer and size + encoded > source.max_document_bytes:
            cut = max((i for i, text in enumerate(buffer) if not text.strip()), default=len(buffer) - 1)
            yield Document(f"{name}#{part}" if part else name, "".join(buffer[: cut + 1]), path, start)
            part, start = part + 1, number - (len(buffer) - cut - 1)
            buffer = buffer[cut + 1 :]
            size = sum(len(text.encode("utf-8")) for text in buffer)
        buffer.append(line)
        size += encoded
    if buffer:
        yield Document(f"{name}#{part}" if part else name, "".join(buffer), path, start)


def _read_jsonl(raw, path: str, source: FileSource) -> Iterator[Document]:
    for number, line in source.lines(raw, path):
        if not line.strip():
            continue
        try:
            record = json_loads(line)
        except json.JSONDecodeError as exc:
            source.problems.record("invalid_json", path, number, f"invalid JSON ({exc.msg})")
            continue
        doc = source.to_document(record, path, number)
        if doc is not None:
            yield doc


def _read_json(raw, path: str, source: FileSource) -> Iterator[Document]:
    """A JSON list of records (or an object with a ``data`` list); read whole, so for modest files."""
    limit = max(source.max_document_bytes, MAX_JSON_FILE_BYTES)
    content = raw.read(limit + 1)
    if len(content) > limit:
        source.problems.record("file_too_large", path, None, f"a .json file is read whole and this one is over "
                               f"{limit:,} bytes; write it as JSON Lines (.jsonl), one record a line")  # fmt: skip
        return
    try:
        data = json_loads(content.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        source.problems.record("not_utf8", path, None, f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
        return
    except json.JSONDecodeError as exc:
        source.problems.record("invalid_json", path, exc.lineno, f"invalid JSON ({exc.msg})")
        return
    records = data if isinstance(data, list) else data.get("data") if isinstance(data, dict) else None
    if not isinstance(records, list):
        source.problems.record(
            "invalid_json", path, None, "expected a JSON list of records (or an object with a 'data' list)"
        )
        return
    for index, record in enumerate(records, 1):
        doc = source.to_document(record, path, index)
        if doc is not None:
            yield doc


def _read_csv(raw, path: str, source: FileSource) -> Iterator[Document]:
    csv.field_size_limit(source.max_document_bytes)
    text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")  # -sig: a BOM is not a column name
    delimiter = (
        "\t" if path.split("?")[0].lower().removesuffix(".gz").removesuffix(".zst").endswith(".tsv") else ","
    )
    reader = csv.DictReader(text, delimiter=delimiter)
    if reader.fieldnames is None or source.text_field not in reader.fieldnames:
        source.problems.record(
            "missing_text_field",
            path,
            1,
            f"no column '{source.text_field}' (columns: {', '.join(reader.fieldnames or [])}); set --text-field",
        )
        return
    try:
        for record in reader:
            doc = source.to_document(record, path, reader.line_num)
            if doc is not None:
                yield doc
    except (csv.Error, UnicodeDecodeError) as exc:
        source.problems.record("invalid_csv", path, reader.line_num, f"cannot parse CSV ({exc})")


def _read_parquet(path: str, source: FileSource) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: parquet inputs need pyarrow: pip install 'llm-training[data]'") from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and OSError for non-parquet files
        source.problems.record("invalid_parquet", path, None, f"not a parquet file ({exc})")
        return
    columns = parquet.schema_arrow.names
    if source.text_field not in columns:
        source.problems.record(
            "missing_text_field",
            path,
            None,
            f"no column '{source.text_field}' (columns: {', '.join(columns)})",
        )
        return
    wanted = [source.text_field] + ([source.id_field] if source.id_field in columns else [])
    number = 0
    for batch in parquet.iter_batches(columns=wanted, batch_size=1024):
        for record in batch.to_pylist():
            number += 1
            doc = source.to_document(record, path, number)
            if doc is not None:
                yield doc
