"""``llm-validate-data``: check a prepared-data folder; one line per finding, exit 1 when a check FAILs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llm_training.cli.common import parser, run
from llm_training.data.inspect import CHECKS, Thresholds

DESCRIPTION = f"""\
Check a folder written by llm-prepare-data and print one line per finding: PASS, WARN, FAIL or SKIP, with
the numbers behind it.

Checks ({", ".join(CHECKS)}):
  integrity     always runs first: manifests agree with the tokenizer (fingerprint, size, end-of-text id);
                shard files exist, have num_tokens * itemsize bytes and the manifest's sha256; every id is
                below the vocabulary size; one end-of-text token per document; document tables consistent.
                If shards or tables cannot be read safely, the other checks are skipped.
  quality       mean quality score of the kept documents, and the share scoring below --min-quality.
  distribution  validation split not empty; bytes per token of train and validation within a factor; no
                token above a share of all tokens; Jensen-Shannon divergence of the splits' unigram
                distributions; document-length outliers (WARN only).
  duplicates    a validation document equal to a training document FAILs (contamination); exact
                duplicates within a split FAIL above --max-duplicate-fraction (WARN below it).

Exit status: 0 when nothing FAILs (WARNs allowed), 1 when a check FAILs, 2 for bad input (no such folder,
not a prepared folder, unknown check)."""


def build_parser():
    t = Thresholds()
    p = parser("llm-validate-data", DESCRIPTION)
    p.add_argument(
        "--data-dir",
        default="prepared_data",
        help="Prepared-data folder to check (or one of its manifests, e.g. prepared_data/train.json).",
    )
    p.add_argument(
        "--checks",
        default="all",
        help=f"Comma-separated checks to run: {', '.join(CHECKS)}, or all; integrity always runs.",
    )
    p.add_argument(
        "--min-quality",
        type=float,
        default=t.min_quality,
        help="A document whose quality score (0 to 1) is below this counts as low quality.",
    )
    p.add_argument(
        "--max-low-quality-fraction",
        type=float,
        default=t.max_low_quality_fraction,
        help="FAIL when a larger share of the kept documents is below --min-quality.",
    )
    p.add_argument(
        "--min-mean-quality",
        type=float,
        default=t.min_mean_quality,
        help="FAIL when the mean quality score of the kept documents is lower than this.",
    )
    p.add_argument(
        "--max-duplicate-fraction",
        type=float,
        default=t.max_duplicate_fraction,
        help="FAIL when a larger share of a split's documents repeats an earlier document exactly.",
    )
    p.add_argument(
        "--max-token-share",
        type=float,
        default=t.max_token_share,
        help="FAIL when a single token id is a larger share of a split's tokens (natural text: 2%% to 6%%).",
    )
    p.add_argument(
        "--max-js-divergence",
        type=float,
        default=t.max_js_divergence,
        help="FAIL when the Jensen-Shannon divergence (bits) of train and validation unigram distributions "
        "exceeds this and twice that of a same-size random sample of train (the sampling noise).",
    )
    p.add_argument(
        "--max-bytes-per-token-ratio",
        type=float,
        default=t.max_bytes_per_token_ratio,
        help="FAIL when one split's text bytes per token exceed the other's by more than this factor.",
    )
    p.add_argument(
        "--outlier-z",
        type=float,
        default=t.outlier_z,
        help="A document is a length outlier when its log length is this many robust deviations from the median.",
    )
    p.add_argument(
        "--max-length-outlier-fraction",
        type=float,
        default=t.max_length_outlier_fraction,
        help="WARN when a larger share of a split's documents are length outliers.",
    )
    p.add_argument(
        "--json", metavar="FILE", help="Also write the findings, thresholds and status to FILE as JSON."
    )
    p.add_argument(
        "--quiet", action="store_true", help="Print only WARN, FAIL and SKIP lines and the summary."
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from llm_training.data.inspect import findings_json, open_prepared, parse_checks, validate

        checks = parse_checks(args.checks)  # bad names fail before any reading
        thresholds = Thresholds(
            min_quality=args.min_quality,
            max_low_quality_fraction=args.max_low_quality_fraction,
            min_mean_quality=args.min_mean_quality,
            max_duplicate_fraction=args.max_duplicate_fraction,
            max_token_share=args.max_token_share,
            max_js_divergence=args.max_js_divergence,
            max_bytes_per_token_ratio=args.max_bytes_per_token_ratio,
            outlier_z=args.outlier_z,
            max_length_outlier_fraction=args.max_length_outlier_fraction,
        )
        prepared = open_prepared(args.data_dir)
        findings = validate(prepared, checks, thresholds)
        for finding in findings:
            if not args.quiet or finding.status != "PASS":
                print(finding.line())
        result = findings_json(prepared, checks, thresholds, findings)
        counts = ", ".join(f"{n} {s}" for s, n in result["counts"].items() if n)
        print(f"{result['status']}: {prepared.folder} ({counts})")
        if args.json:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return 1 if result["status"] == "FAIL" else 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
