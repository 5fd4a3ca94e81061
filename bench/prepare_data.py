"""Protocol 4 of ../shared/BENCHMARKS.md: data preparation speed and memory.

`llm-prepare-data` on the four corpora (21.9 MB of text) with quality filtering and deduplication on and a
16,384-token BPE, timed end to end as a user runs it (process start to exit), with the stage breakdown from
prepare_report.json and the peak resident memory of the whole process tree. In the same run, the references:
Hugging Face `tokenizers` BPE training on all the text, its `encode_batch`, and tiktoken's raw encoder with
the original GPT-2 vocabulary (../shared/tokenizers/gpt2) on 2 threads. With --big-gb N, a synthetic input
of N GB (the corpora repeated, each copy's documents given new ids and a changed first word, so nothing is
an exact copy) checks that memory does not grow with the input.

    python bench/prepare_data.py --runs 3 [--big-gb 1] > bench/results/prepare_data.txt
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CORPORA = sorted((SHARED / "corpora").glob("*.jsonl.gz"))


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            with open(f"/proc/{current}/task/{current}/children") as handle:
                stack.extend(int(c) for c in handle.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def run_prepare(args: list[str], out: Path) -> dict:
    command = [sys.executable, "-m", "llm_training.cli.prepare_data", *args, "--output", str(out), "--quiet"]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"llm-prepare-data failed ({proc.returncode}): {stderr.strip()}")
    report = json.loads((out / "prepare_report.json").read_text())
    return {"seconds": seconds, "peak_rss": peak, "report": report, "stdout": stdout.strip()}


def corpus_texts() -> list[str]:
    texts = []
    for path in CORPORA:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            texts.extend(json.loads(line)["text"] for line in handle)
    return texts


def references(texts: list[str]) -> list[str]:
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers, trainers

    from llm_training.data.tokenizer import Tokenizer

    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    lines = []
    started = time.perf_counter()
    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=16384,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer=trainer)
    seconds = time.perf_counter() - started
    lines.append(
        f"  HF tokenizers BPE training, all {mb:.1f} MB, 16,384 tokens: {seconds:.2f} s ({mb / seconds:.1f} MB/s)"
    )
    started = time.perf_counter()
    hf.encode_batch(texts, add_special_tokens=False)
    seconds = time.perf_counter() - started
    lines.append(f"  HF tokenizers encode_batch with that BPE: {seconds:.2f} s ({mb / seconds:.1f} MB/s)")
    gpt2 = Tokenizer.load(SHARED / "tokenizers" / "gpt2")
    raw = gpt2._fast_encoding()  # the tiktoken.Encoding built from the original GPT-2 files
    started = time.perf_counter()
    raw.encode_ordinary_batch(texts, num_threads=2)
    seconds = time.perf_counter() - started
    lines.append(
        f"  tiktoken raw encoder, GPT-2 vocabulary, 2 threads: {seconds:.2f} s ({mb / seconds:.1f} MB/s)"
    )
    started = time.perf_counter()
    gpt2.encode_batch(texts, num_threads=2)
    seconds = time.perf_counter() - started
    lines.append(
        f"  llm_training Tokenizer.encode_batch, GPT-2 vocabulary, 2 threads: {seconds:.2f} s ({mb / seconds:.1f} MB/s)"
    )
    return lines


def make_big(path: Path, gigabytes: float) -> int:
    texts = corpus_texts()
    target, written, copy = gigabytes * 1e9, 0, 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target:
            for index, text in enumerate(texts):
                line = json.dumps({"id": f"{copy}-{index}", "text": f"Copy{copy} {text}"}) + "\n"
                handle.write(line)
                written += len(line)
            copy += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--big-gb", type=float, default=0.0, help="also prepare a synthetic input this large")
    args = parser.parse_args()
    if not CORPORA:
        raise SystemExit(f"no corpora in {SHARED / 'corpora'}")
    import tiktoken
    import tokenizers

    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}, "
        f"tokenizers {tokenizers.__version__}, tiktoken {tiktoken.__version__}"
    )
    flags = ["--input", str(SHARED / "corpora" / "*.jsonl.gz"), "--vocab-size", "16384",
             "--min-quality", "0.5", "--deduplicate"]  # fmt: skip
    print("command: llm-prepare-data --input '../shared/corpora/*.jsonl.gz' --vocab-size 16384 "
          "--min-quality 0.5 --deduplicate --output <tmp>")  # fmt: skip
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            result = run_prepare(flags, Path(tmp) / f"run{i}")
            runs.append(result)
            r = result["report"]
            stages = ", ".join(f"{k} {v:.2f}s" for k, v in r["stages_seconds"].items())
            kept_mb = (r["train_bytes"] + r["validation_bytes"]) / 1e6
            encode = r["stages_seconds"]["encode_train"] + r["stages_seconds"]["encode_validation"]
            print(
                f"run {i + 1}: {r['bytes_read'] / 1e6:.1f} MB in {result['seconds']:.2f} s end to end = "
                f"{r['bytes_read'] / 1e6 / result['seconds']:.2f} MB/s; encoding stage {kept_mb / encode:.1f} MB/s "
                f"({kept_mb:.1f} MB kept); peak memory {result['peak_rss'] / 2**20:.0f} MiB; stages: {stages}"
            )
        r = runs[0]["report"]
        print(
            f"  dropped: {r['dropped']}; kept train {r['train_documents']:,} / validation {r['validation_documents']:,} documents"
        )
        speeds = [x["report"]["bytes_read"] / 1e6 / x["seconds"] for x in runs]
        encode_speeds = [
            (x["report"]["train_bytes"] + x["report"]["validation_bytes"]) / 1e6
            / (x["report"]["stages_seconds"]["encode_train"] + x["report"]["stages_seconds"]["encode_validation"])
            for x in runs
        ]  # fmt: skip
        print(
            f"median: end to end {statistics.median(speeds):.2f} MB/s (target >= 5), encoding stage "
            f"{statistics.median(encode_speeds):.1f} MB/s (target >= 12), peak memory "
            f"{statistics.median(x['peak_rss'] for x in runs) / 2**20:.0f} MiB"
        )
        print("references, same machine, same text:")
        for line in references(corpus_texts()):
            print(line)
        if args.big_gb:
            big = Path(tmp) / "big.jsonl"
            size = make_big(big, args.big_gb)
            for extra, label in (([], "quality filter only"), (["--deduplicate"], "with deduplication")):
                result = run_prepare(
                    ["--input", str(big), "--vocab-size", "16384", "--min-quality", "0.5", *extra],
                    Path(tmp) / "big_out",
                )
                r = result["report"]
                print(
                    f"big input ({label}): {size / 1e9:.2f} GB, {r['documents_read']:,} documents in "
                    f"{result['seconds']:.0f} s ({size / 1e6 / result['seconds']:.1f} MB/s), peak memory "
                    f"{result['peak_rss'] / 2**20:.0f} MiB (target < 2048); dropped {r['dropped']}"
                )


if __name__ == "__main__":
    main()
