"""``llm-analyze-data``: a self-contained HTML page of statistics and plots of prepared data."""

from __future__ import annotations

import sys
from pathlib import Path

from llm_training.cli.common import parser, run

DESCRIPTION = """\
Write one HTML page about a folder written by llm-prepare-data: a summary table (documents, tokens, bytes,
bytes per token, vocabulary), the document length histogram, token frequencies (rank/frequency plot and the
top tokens decoded), quality scores (kept documents against all scored ones and the --min-quality line),
and deduplication and filtering (documents dropped by reason, read problems, near-duplicate examples,
duplicates and train/validation overlap among the prepared documents).

The page is self-contained and works offline: inline CSS and SVG plots, no scripts, no URLs.
Plots and tables are of the split whose manifest --data-file names (train for a folder); the summary covers
both splits."""


def build_parser():
    p = parser("llm-analyze-data", DESCRIPTION)
    p.add_argument(
        "--data-file",
        default="prepared_data/train.json",
        help="A manifest of prepared data (train.json or validation.json), or the prepared folder itself.",
    )
    p.add_argument(
        "--output",
        default="stats/analysis.html",
        help="HTML file to write; missing parent folders are created.",
    )
    p.add_argument("--top-tokens", type=int, default=30, help="How many of the most frequent tokens to list.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from llm_training.data.inspect import analyze, open_prepared
        from llm_training.errors import UserError
        from llm_training.fileio import check_output_file, html_output, write_text
        from llm_training.report.html import render

        if args.top_tokens < 1:
            raise UserError(f"--top-tokens must be at least 1, got {args.top_tokens}")
        prepared = open_prepared(args.data_file)
        check_output_file(
            args.output, "--output", [args.data_file, *Path(prepared.folder).iterdir()], html_output
        )
        page = render(analyze(prepared, top_k=args.top_tokens))
        output = Path(args.output)
        try:
            write_text(output, page)
        except OSError as exc:  # a full disk or permissions are explained by write_text
            raise UserError(f"cannot write {output}: {exc.strerror or exc}") from None
        print(f"wrote {output} ({len(page) / 1e3:,.0f} kB): {prepared.folder}, split {prepared.selected}")
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
