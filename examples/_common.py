"""What the examples share: a --tiny switch (the sizes CI runs them at), an output folder, and the built-in
sample text split into a training file and a held-out test file."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from llm_training.data.sources import sample_data_path


def arguments(name: str, description: str, extra=None) -> argparse.Namespace:
    """The shared flags; ``extra(parser)`` adds an example's own."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="A few steps of a very small model (a smoke test).")
    p.add_argument("--out", default=f"examples_output/{name}", help="Folder for everything this writes.")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def model_keys(tiny: bool) -> dict:
    """Dotted config keys of a model that trains in minutes on a laptop CPU (or seconds with --tiny)."""
    if tiny:
        return {"model.num_layers": 2, "model.hidden_size": 64, "model.num_attention_heads": 4,
                "model.max_seq_length": 64}  # fmt: skip
    return {"model.num_layers": 4, "model.hidden_size": 256, "model.num_attention_heads": 4,
            "model.max_seq_length": 256}  # fmt: skip


def split_sample(out: Path, held_out: int = 20) -> tuple[Path, Path]:
    """The built-in sample (Python's reference documentation) as train.jsonl and test.jsonl."""
    with gzip.open(sample_data_path(), "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    train, test = out / "train.jsonl", out / "test.jsonl"
    for path, part in ((train, records[:-held_out]), (test, records[-held_out:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return train, test


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
