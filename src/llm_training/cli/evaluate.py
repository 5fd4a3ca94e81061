"""``llm-evaluate``: metrics of a trained model on test data, printed and written as JSON."""

from __future__ import annotations

import sys

from llm_training.cli.common import add_format_flag, add_scoring_flags, parser, run
from llm_training.eval.metrics import METRICS

DESCRIPTION = """\
Score a checkpoint on test data and write the metrics as JSON.

Test data: a .txt file (plain text), or JSON Lines / a JSON list of records, all of one kind:
  {"text": ...}                                   plain text
  {"prompt": ..., "choices": [...], "answer": i}  multiple choice (answer: an index or the choice's text)
  {"text": ..., "label": ...}                     classification (the choices are all labels in the file)
  {"messages": [...]}, {"prompt": ..., "completion": ...}, {"instruction": ..., "output": ...},
  {"conversations": [...]}                        chat: rendered with the model's chat template (the one its
                                                  fine-tuning recorded, or --chat-template), scored on the
                                                  assistant's tokens only, as llm-finetune trains them
Labelled items are answered by the choice whose tokens have the highest total log-probability after the
prompt. Metrics:
""" + "\n".join(f"  {name:<14}{text}" for name, text in METRICS.items())


def build_parser():
    p = parser("llm-evaluate", DESCRIPTION)
    p.add_argument("--model-path", required=True, help="Checkpoint (.pt) or export (ONNX, TorchScript, ...).")
    p.add_argument("--test-data", required=True, help="Test file: .txt, .jsonl or .json (formats above).")
    p.add_argument(
        "--metrics",
        help="Comma-separated metric names (default: loss, perplexity, bits_per_byte and accuracy, and f1 "
        "on labelled data).",
    )
    p.add_argument("--output", help="Write the results here as JSON (folders are created).")
    p.add_argument(
        "--chat-template",
        help="Chat data: render with this template (chatml, a .jinja file or a model folder) instead of the "
        "model's own.",
    )
    add_scoring_flags(p)
    add_format_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        from llm_training.eval.runner import evaluate_checkpoint
        from llm_training.fileio import check_output_file, json_output, write_json

        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        if args.output:  # before the work: the results must not replace what they are computed from
            check_output_file(
                args.output, "--output", [args.model_path, args.test_data], json_output("model")
            )
        results = evaluate_checkpoint(args.model_path, args.test_data, args.metrics, args.batch_size, args.device,
                                      args.model_format, chat_template=args.chat_template)  # fmt: skip
        for key, value in results.items():
            if isinstance(value, float):
                print(f"{key:<14} {value:.4f}")
            elif key not in ("labels",):
                print(f"{key:<14} {value}")
        if args.output:
            print(f"wrote {write_json(args.output, results)}")
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
