"""Protocol 2 of ../shared/BENCHMARKS.md: validation bits per byte reached within 218 s on one GPU.

    python bench/speedrun.py prepare            # on any machine: ../shared/corpora -> .bench_data/speedrun
    python bench/speedrun.py train [CONFIG...]  # on the GPU: llm-train --config CONFIG on that data

Split: a document is validation when the first byte of sha256(f"{corpus}/{id}") is below 8 (corpus = the
file name before the first dot). Preparation keeps every document (no quality filter, no deduplication, so
the validation set is the protocol's) and trains a 16,384-token byte-level BPE on the training documents.
Time: from the training process's start to its final checkpoint on disk (compilation included, data
preparation excluded). The final model is evaluated on every validation token.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".bench_data" / "speedrun"


def held_out(doc_id: str) -> bool:
    return hashlib.sha256(doc_id.encode()).digest()[0] < 8


def prepare() -> None:
    from llm_training.data.prepare import prepare_documents
    from llm_training.data.sources import Document

    docs = []
    for path in sorted((REPO.parent / "shared" / "corpora").glob("*.jsonl.gz")):
        corpus = path.name.split(".")[0]
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            docs += [Document(f"{corpus}/{r['id']}", r["text"]) for r in map(json.loads, handle)]
    held = [d for d in docs if held_out(d.id)]
    print(f"{len(docs) - len(held)} training and {len(held)} validation documents; validation "
          f"{sum(len(d.text.encode()) for d in held):,} bytes before cleaning")  # fmt: skip
    result = prepare_documents(docs, DATA, vocab_size=16384, split_fn=held_out, tokenizer_sample_bytes=10**9)
    r = result.report
    print(f"prepared: train {r['train_tokens']:,} tokens / {r['train_bytes']:,} bytes, validation "
          f"{r['validation_tokens']:,} tokens / {r['validation_bytes']:,} bytes in {r['seconds']:.1f}s")  # fmt: skip


def train(configs: list[str]) -> None:
    for config in configs:
        out = Path("/tmp/speedrun") / Path(config).stem
        command = [sys.executable, "-m", "llm_training.cli.train", "--config", config,
                   "--data-dir", str(DATA), "--output-dir", str(out), "--set", "logging.progress_bar=false"]  # fmt: skip
        (out / "metrics.jsonl").unlink(missing_ok=True)
        started = time.time()
        proc = subprocess.run(command, capture_output=True, text=True)
        final = out / "checkpoints" / "model_final.pt"
        if proc.returncode != 0 or not final.is_file():
            print(f"{config}: failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
            continue
        seconds = final.stat().st_mtime - started
        lines = [x for x in proc.stdout.splitlines() + proc.stderr.splitlines() if x.strip()]
        evals = [
            x for x in lines if "validation loss" in x or x.startswith("done:") or x.startswith("training ")
        ]
        print(f"== {config}: final checkpoint {seconds:.1f} s after the process started (target <= 218 s)")
        for line in evals:
            print("  " + line)
        steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        if steps:  # the train loss against the validation loss shows how far the epochs overfit
            speeds = sorted(r["tokens_per_second"] for r in steps)
            last = steps[-1]
            print(f"  last logged train loss {last['loss']:.4f} at step {last['step']} (epoch {last['epoch']}), "
                  f"median {speeds[len(speeds) // 2]:,.0f} tokens/s")  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["prepare"]:
        prepare()
    elif sys.argv[1:2] == ["train"]:
        train(sys.argv[2:] or [str(REPO / "config" / "speedrun.yaml")])
    else:
        raise SystemExit(__doc__)
