"""``llm-compare``: several checkpoints on the same test data, as an offline HTML report and JSON."""

from __future__ import annotations

import sys
from pathlib import Path

from llm_training.cli.common import add_format_flag, add_scoring_flags, parser, run
from llm_training.errors import UserError

DESCRIPTION = """\
Evaluate every model on the same test data (formats and metrics as in llm-evaluate) and write a
self-contained HTML report (a table and a bar chart per metric; no network needed to view it) to --output,
with the same numbers as JSON beside it (<output>.json)."""


def build_parser():
    p = parser("llm-compare", DESCRIPTION)
    p.add_argument("--models", nargs="+", required=True, help="Checkpoints (.pt) or exports to compare.")
    p.add_argument("--test-data", required=True, help="Test file: .txt, .jsonl or .json.")
    p.add_argument("--metrics", help="Comma-separated metrics (default: loss, perplexity, bits_per_byte, accuracy; "
                   "plus f1 on labelled data).")  # fmt: skip
    p.add_argument("--output", required=True, help="The HTML report to write (folders are created).")
    add_scoring_flags(p)
    add_format_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        from llm_training.eval.data import read_test_data
        from llm_training.eval.metrics import parse_metrics
        from llm_training.eval.runner import default_metrics, evaluate_checkpoint
        from llm_training.fileio import check_output_file, write_json, write_text
        from llm_training.report.compare import render

        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        for out in (args.output, args.output + ".json"):  # the report and its numbers
            check_output_file(out, "--output", [*args.models, args.test_data])
        missing = [m for m in args.models if not Path(m).exists()]  # a Hugging Face export is a folder
        if missing:
            raise UserError(f"checkpoint not found: {', '.join(missing)}")
        data = read_test_data(args.test_data)  # once, for every model
        metrics = parse_metrics(args.metrics) if args.metrics else default_metrics(data)
        results = []
        for model in args.models:
            results.append(
                evaluate_checkpoint(model, data, metrics, args.batch_size, args.device, args.model_format)
            )
            print(f"{model}: " + ", ".join(f"{m} {results[-1][m]:.4f}" for m in metrics))
        out = write_text(args.output, render(results, metrics, args.test_data))
        numbers = write_json(
            out.with_name(out.name + ".json"),
            {"test_data": args.test_data, "metrics": metrics, "models": results},
        )
        print(f"wrote {out} and {numbers}")
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
