"""Protocol 3 of BENCHMARKS.md: validation bits per byte after a fixed CPU training budget on Shakespeare.

Data: the modern-spelling plays (ids ending ``_gut``) of ../shared/corpora/shakespeare.jsonl.gz; a play is
validation when the first byte of sha256(id) is below 20. Training: the recipe in config/cpu_shakespeare.yaml
for ``--max-time`` seconds (default 70), then the whole validation set is scored.
Peer: nanoGPT's CPU recipe, 2.759 bpb in 68.8 s on 2 cores. Target: at most 2.30.

    python bench/cpu_quality.py [--config config/cpu_shakespeare.yaml] [--max-time 70s] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from llm_training.config import load_config
from llm_training.data.prepare import prepare_documents
from llm_training.data.sources import Document
from llm_training.train.loop import train

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpora" / "shakespeare.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "config" / "cpu_shakespeare.yaml"))
    parser.add_argument("--max-time", default="70s")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument(
        "--runs", type=int, default=1, help="repeat training and report each run and the median"
    )
    args = parser.parse_args()
    if not CORPUS.is_file():
        sys.exit(f"corpus not found: {CORPUS}")

    with gzip.open(CORPUS, "rt", encoding="utf-8") as handle:
        docs = [Document(r["id"], r["text"]) for r in map(json.loads, handle) if r["id"].endswith("_gut")]
    held = {d.id for d in docs if hashlib.sha256(d.id.encode()).digest()[0] < 20}
    overrides = dict(s.split("=", 1) for s in args.sets)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            args.config,
            cli={
                "output_dir": tmp,
                "training.max_time": args.max_time,
                "logging.progress_bar": "false",
                **overrides,
            },
            default_file=None,
        )
        started = time.perf_counter()
        prepared = prepare_documents(
            docs, Path(tmp) / "data", vocab_size=cfg.data.vocab_size, split_fn=held.__contains__
        )
        prep_seconds = time.perf_counter() - started
        results = []
        for _ in range(args.runs):
            results.append(train(cfg, prepared.output_dir))

    r = prepared.report
    result = sorted(results, key=lambda x: x.val_bpb)[len(results) // 2]
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    sets = " ".join("--set " + s for s in args.sets)
    print(
        f"command: python bench/cpu_quality.py --config {Path(args.config).relative_to(REPO)} --max-time {args.max_time} --runs {args.runs} {sets}"
    )
    print(
        f"data: {len(docs)} plays, validation {r['validation_documents']} plays / {r['validation_bytes']:,} bytes; "
        f"train {r['train_tokens']:,} tokens, BPE vocabulary {r['vocab_size']}; preparation {prep_seconds:.1f}s (not counted)"
    )
    m = cfg.model
    print(
        f"model: {m.model_type}, {m.num_layers} layers, width {m.hidden_size}, {m.num_attention_heads} heads, context {m.max_seq_length}, "
        f"{result.num_parameters / 1e6:.2f}M parameters; {cfg.training.optimizer}, batch {cfg.training.batch_size}, lr {cfg.training.learning_rate}"
    )
    for i, x in enumerate(results, 1):
        print(
            f"run {i}: {x.steps} steps, {x.tokens:,} tokens in {x.seconds:.1f}s ({x.tokens / x.seconds:,.0f} tokens/s), "
            f"validation loss {x.val_loss:.4f}, {x.val_bpb:.4f} bits per byte"
        )
    print(
        f"median: {result.val_bpb:.4f} bits per byte on all {result.metrics['val_tokens']:,} validation tokens "
        f"after {result.seconds:.1f}s of training  [target <= 2.30; nanoGPT CPU recipe 2.759 in 68.8 s]"
    )


if __name__ == "__main__":
    main()
