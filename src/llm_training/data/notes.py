"""What a job did other than it was asked, and why: lines for the commands' summaries."""

from __future__ import annotations

from pathlib import Path

from llm_training.config import DataConfig
from llm_training.limits import read_json_file

DEFAULT_MAX_LENGTH = DataConfig.max_seq_length  # the built-in value: one the user did not choose is not noted


def vocabulary_note(report: dict) -> str | None:
    """A trained vocabulary smaller than asked: BPE had no more pairs to merge in the text it learned from."""
    asked, got = report.get("vocab_size_asked"), report.get("vocab_size")
    if not asked or not got or got >= asked:
        return None
    return (
        f"vocabulary: {got:,} tokens, not the {asked:,} asked: byte-level BPE adds a token only for a pair "
        f"seen at least twice in the training text, and this text had no more (more text gives more)"
    )


def context_note(
    max_length: int | None, context: int | None, flag: str = "data.max_seq_length"
) -> str | None:
    """A max length recorded with the data that training does not use: training windows are the model's
    context (model.max_seq_length, or training.seq_length)."""
    if max_length is None or max_length == context:
        return None
    used = f"{context:,}" if context else "model.max_seq_length"
    return (
        f"{flag} {max_length:,} is recorded in the manifests; training windows are the model's context, "
        f"{used} tokens (to train on {max_length:,}: --set model.max_seq_length={max_length})"
    )


def job_notes(cfg, data_dir: str | Path) -> list[str]:
    """The notes of a training job on prepared ``data_dir`` (its report says what vocabulary was asked)."""
    try:
        report = read_json_file(Path(data_dir) / "prepare_report.json")
    except (OSError, ValueError):
        report = {}
    length = cfg.data.max_seq_length
    notes = [
        vocabulary_note(report if isinstance(report, dict) else {}),
        context_note(
            length if length != DEFAULT_MAX_LENGTH else None,
            cfg.training.seq_length or cfg.model.max_seq_length,
        ),
    ]
    return [note for note in notes if note]
