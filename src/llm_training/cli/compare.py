"""``llm-compare``: several checkpoints on the same test data, as an offline HTML report and JSON."""

from __future__ import annotations

import sys
from pathlib import Path

from llm_training.cli.common import add_format_flag, add_scoring_flags, parser, run
from llm_training.errors import UserError

DESCRIPTION = """\
Evaluate every model on the same test data (formats and metrics as in llm-evaluate) and write a
self-contained HTML report (a table and a bar chart per metric; no network needed to view it) to --output,
with the same numbers as JSON beside it (<output>.json).

Models are ranked by bits per byte on plain text (comparable across tokenizers; loss and perplexity are
not, and are not compared when the tokenizers differ) and by accuracy on labelled data. Each score's noise
is estimated by a bootstrap over blocks of the test text (about 1 KB each) or over the labelled items:
models whose difference from the best is within 1.96 standard errors of the difference are reported as
indistinguishable, and no single best is named among them."""


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
        from llm_training.eval.noise import compare_metric, ranking_metric
        from llm_training.eval.runner import default_metrics, evaluate_checkpoint
        from llm_training.fileio import check_output_file, html_output, json_output, write_json, write_text
        from llm_training.report.compare import ranking_line, render, verdict_line

        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        # the report and its numbers
        check_output_file(args.output, "--output", [*args.models, args.test_data], html_output)
        check_output_file(args.output + ".json", "--output", [*args.models, args.test_data],
                          json_output("models", "metrics"))  # fmt: skip
        missing = [m for m in args.models if not Path(m).exists()]  # a Hugging Face export is a folder
        if missing:
            raise UserError(f"checkpoint not found: {', '.join(missing)}")
        data = read_test_data(args.test_data)  # once, for every model
        metrics = parse_metrics(args.metrics) if args.metrics else default_metrics(data)
        results, units = [], []
        for model in args.models:
            results.append(
                evaluate_checkpoint(
                    model, data, metrics, args.batch_size, args.device, args.model_format, units=True
                )  # fmt: skip
            )
            units.append(results[-1].pop("units", {}))  # per block or item: for the noise estimate only
            print(f"{model}: " + ", ".join(f"{m} {results[-1][m]:.4f}" for m in metrics))
        verdicts = [compare_metric(m, results, units) for m in metrics] if len(results) > 1 else []
        ranked_by = ranking_metric(results, metrics) if verdicts else None
        ranking = [ranking_line(v) for v in verdicts if v["metric"] == ranked_by]
        for line in [*ranking, *(verdict_line(v) for v in verdicts)]:
            print(line)
        out = write_text(args.output, render(results, metrics, args.test_data, verdicts, ranked_by))
        summary = {"test_data": args.test_data, "metrics": metrics, "models": results, "ranked_by": ranked_by,
                   "comparison": verdicts}  # fmt: skip
        numbers = write_json(out.with_name(out.name + ".json"), summary)
        print(f"wrote {out} and {numbers}")
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
