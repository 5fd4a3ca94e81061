"""``llm-prepare-data`` (and ``scripts/prepare_data.py``): raw text to token shards, manifests and a report."""

from __future__ import annotations

import sys

from llm_training.cli.common import add_set_flag, parse_sets, parser, run

DESCRIPTION = """\
Prepare raw text for training: read, clean, score quality, deduplicate, train (or load) a byte-level BPE
tokenizer, and write memory-mapped token shards with train.json / validation.json manifests, vocab.json and
prepare_report.json (what was read, dropped and why, kept; stage timings).

Inputs: a file, a folder (recursively), a glob ('data/*.jsonl.gz'), an http(s):// or s3:// URL, or a
Hugging Face dataset as hf://NAME?config=C&split=S (or a folder saved with Dataset.save_to_disk).
Several machines: give each --num-shards N --shard-index i and the same --tokenizer (make one with
--tokenizer-only), then combine the outputs with --merge DIR DIR ... --output DIR."""


def build_parser():
    p = parser("llm-prepare-data", DESCRIPTION)
    p.add_argument("--input", help="What to read: file, folder, glob, URL or hf://dataset.")
    p.add_argument(
        "--output",
        default="prepared_data",
        help="Folder to write, replaced only once the new one is complete. An existing folder is replaced "
        "only when this tool wrote everything in it (else see --overwrite); never the input's folder.",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace --output even when it holds files this tool did not write, or is a file.",
    )
    p.add_argument(
        "--format",
        choices=["txt", "jsonl", "json", "csv", "parquet"],
        help="Input format; by default from each file's extension (.gz and .zst are decompressed).",
    )
    p.add_argument("--vocab-size", type=int, help="Size of the byte-level BPE vocabulary to train.")
    p.add_argument("--max-length", type=int, help="Maximum sequence length recorded for training.")
    p.add_argument(
        "--min-quality",
        type=float,
        help="Drop documents whose quality score (0 to 1, see the README) is below this.",
    )
    p.add_argument(
        "--deduplicate", action="store_true", default=None, help="Drop exact and near-duplicate documents."
    )
    p.add_argument(
        "--dedup-threshold", type=float, help="Word 5-gram Jaccard similarity that makes a near duplicate."
    )
    p.add_argument("--text-field", help="Field (JSON, CSV column, parquet column) holding the text.")
    p.add_argument("--validation-fraction", type=float, help="Share of documents held out for validation.")
    p.add_argument("--seed", type=int, help="Seed of the train/validation split.")
    p.add_argument("--workers", type=int, help="Processes and threads to use; 0 means one per core.")
    p.add_argument(
        "--tokenizer",
        help="Use this tokenizer instead of training one: tokenizer.json, vocab.json + merges.txt, "
        "encoder.json + vocab.bpe, or a folder holding one of them.",
    )
    p.add_argument("--tokenizer-only", action="store_true", help="Only train the tokenizer (for sharding).")
    p.add_argument(
        "--on-error",
        choices=["skip", "fail"],
        help="Bad records: skip and count them in the report (default), or stop at the first.",
    )
    p.add_argument("--max-document-bytes", type=int, help="Lines longer than this are skipped and reported.")
    p.add_argument("--num-shards", type=int, default=1, help="Machines sharing the work.")
    p.add_argument("--shard-index", type=int, default=0, help="Which of --num-shards this run is (from 0).")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="Merge these sharded outputs into --output.")
    p.add_argument("--config", help="YAML config file whose data section supplies defaults.")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    add_set_flag(p, training=False)
    return p


_FLAG_KEYS = {
    "format": "format",
    "vocab_size": "vocab_size",
    "max_length": "max_seq_length",
    "min_quality": "min_quality",
    "deduplicate": "deduplicate",
    "dedup_threshold": "dedup_threshold",
    "text_field": "text_field",
    "validation_fraction": "validation_fraction",
    "seed": "seed",
    "workers": "workers",
    "tokenizer": "tokenizer",
    "on_error": "on_error",
    "max_document_bytes": "max_document_bytes",
}


def _summary(report: dict, output: str, notes: tuple = ()) -> str:
    lines = [
        f"read {report['documents_read']:,} documents ({report['bytes_read'] / 1e6:,.1f} MB) "
        f"in {report['seconds']:.1f}s ({report['mb_per_second']:.1f} MB/s)"
    ]
    dropped = {**report.get("dropped", {}), **report.get("problems", {}).get("counts", {})}
    if dropped:
        lines.append("dropped: " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in dropped.items()))
    if "train_documents" in report:
        lines.append(
            f"kept: train {report['train_documents']:,} documents / {report['train_tokens']:,} tokens, "
            f"validation {report['validation_documents']:,} / {report['validation_tokens']:,}; "
            f"vocabulary {report['vocab_size']:,}"
        )
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in report.get("stages_seconds", {}).items())
    if stages:
        lines.append(f"stages: {stages}")
    lines += [f"note: {note}" for note in notes if note]
    lines.append(f"wrote {output} (details in {output}/prepare_report.json)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from llm_training.api.data import options_from_config, source_from_config
        from llm_training.config import load_config
        from llm_training.data.merge import merge_prepared
        from llm_training.data.prepare import prepare
        from llm_training.errors import ConfigError
        from llm_training.monitor.console import StageProgress

        if args.merge:
            report = merge_prepared(args.merge, args.output, args.overwrite)
            print(
                f"merged {len(args.merge)} folders into {args.output}: train {report['train_documents']:,} "
                f"documents / {report['train_tokens']:,} tokens, validation {report['validation_documents']:,}"
            )
            return 0
        if not args.input:
            raise ConfigError("--input is required (a file, folder, glob, URL or hf://dataset), or --merge")
        cli = {f"data.{key}": getattr(args, flag) for flag, key in _FLAG_KEYS.items()}
        cli.update(parse_sets(args.overrides))
        cfg = load_config(args.config, cli={k: v for k, v in cli.items() if v is not None})
        from llm_training.multimodal.data import is_image_text, prepare_from_config, summary

        if is_image_text(args.input):  # captions with image paths or URLs
            print(
                summary(
                    prepare_from_config(cfg, args.input, args.output, overwrite=args.overwrite), args.output
                )
            )
            return 0
        source = source_from_config(cfg.data, args.input, on_error="skip")
        options = options_from_config(
            cfg.data,
            source=source.describe(),
            num_shards=args.num_shards,
            shard_index=args.shard_index,
            tokenizer_only=args.tokenizer_only,
        )
        progress = StageProgress(not args.quiet)
        try:
            result = prepare(source, args.output, options, on_progress=progress, overwrite=args.overwrite)
        finally:
            progress.close()
        from llm_training.data.notes import DEFAULT_MAX_LENGTH, context_note, vocabulary_note

        asked_length = cfg.data.max_seq_length
        context = context_note(
            asked_length if args.max_length is not None or asked_length != DEFAULT_MAX_LENGTH else None,
            cfg.training.seq_length or cfg.model.max_seq_length,
            "--max-length",
        )
        print(_summary(result.report, args.output, (vocabulary_note(result.report), context)))
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
