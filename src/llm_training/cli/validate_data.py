"""``llm-validate-data``: check a prepared-data folder; one line per finding, exit 1 when a check FAILs."""

from __future__ import annotations

import sys

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


_THRESHOLD_HELP = {
    "min_quality": "A document whose quality score (0 to 1) is below this counts as low quality.",
    "max_low_quality_fraction": "FAIL when a larger share of the kept documents is below --min-quality.",
    "min_mean_quality": "FAIL when the mean quality score of the kept documents is lower than this.",
    "max_duplicate_fraction": "FAIL when a larger share of a split's documents repeats an earlier document exactly.",
    "max_token_share": "FAIL when a single token id is a larger share of a split's tokens (natural text: 2%% to 6%%).",
    "max_js_divergence": "FAIL when the Jensen-Shannon divergence (bits) of train and validation unigram distributions "
    "exceeds this and twice that of a same-size random sample of train (the sampling noise).",
    "max_bytes_per_token_ratio": "FAIL when one split's text bytes per token exceed the other's by more than this factor.",
    "outlier_z": "A document is a length outlier when its log length is this many robust deviations from the median.",
    "max_length_outlier_fraction": "WARN when a larger share of a split's documents are length outliers.",
}


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
    for key, text in _THRESHOLD_HELP.items():  # one flag per Thresholds field, its default from there
        p.add_argument(f"--{key.replace('_', '-')}", type=float, default=getattr(t, key), help=text)
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
        thresholds = Thresholds(**{key: getattr(args, key) for key in _THRESHOLD_HELP})
        prepared = open_prepared(args.data_dir)
        if args.json:  # the findings never replace a file of the data
            from pathlib import Path

            from llm_training.fileio import check_output_file, json_output

            check_output_file(
                args.json, "--json", [*Path(prepared.folder).iterdir()], json_output("checks", "findings")
            )
        findings = validate(prepared, checks, thresholds)
        for finding in findings:
            if not args.quiet or finding.status != "PASS":
                print(finding.line())
        result = findings_json(prepared, checks, thresholds, findings)
        counts = ", ".join(f"{n} {s}" for s, n in result["counts"].items() if n)
        print(f"{result['status']}: {prepared.folder} ({counts})")
        if args.json:
            from llm_training.fileio import write_json

            write_json(args.json, result)
        return 1 if result["status"] == "FAIL" else 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
