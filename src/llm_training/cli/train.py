"""``llm-train``: train from a config, on prepared data or raw text."""

from __future__ import annotations

import sys
from pathlib import Path

from llm_training.cli.common import (
    add_resume_flags,
    add_set_flag,
    add_training_flags,
    parse_sets,
    parser,
    print_result,
    run,
    training_values,
)
from llm_training.cli.launch import add_launch_flags, launch, should_launch
from llm_training.errors import DataError

DESCRIPTION = """\
Train a language model. --data-dir takes prepared data (a folder with train.json, validation.json and
vocab.json) or a folder of raw .txt/.jsonl/.json files, which is prepared into <output-dir>/prepared_data."""


def build_parser():
    p = parser("llm-train", DESCRIPTION)
    p.add_argument(
        "--config", help="YAML config file, layered over config/default.yaml and under environment and flags."
    )
    p.add_argument("--data-dir", help="Prepared data folder, or a folder of raw text files to prepare first.")
    p.add_argument(
        "--output-dir", help="Run directory for checkpoints/, logs/ and metrics (default: current directory)."
    )
    add_training_flags(p)
    add_resume_flags(p)
    add_launch_flags(p)
    add_set_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        from llm_training.api.jobs import run_training
        from llm_training.config import load_config

        arguments = sys.argv[1:] if argv is None else argv
        args = build_parser().parse_args(arguments)
        if should_launch(args):  # a bad config or a missing folder fails once, here, not in every worker
            checked = load_config(
                args.config, cli={"data.data_dir": args.data_dir, **parse_sets(args.overrides)}
            )
            if checked.data.data_dir and not Path(checked.data.data_dir).exists():
                raise DataError(f"data directory not found: {checked.data.data_dir}")
            return launch(args, arguments, "llm_training.cli.train")
        cli = {
            "data.data_dir": args.data_dir,
            "output_dir": args.output_dir,
            **training_values(args),
            "resources.distributed_backend": args.distributed_backend,
            **parse_sets(args.overrides),
        }
        cfg = load_config(args.config, cli=cli)
        result = run_training(cfg, resume_from=args.resume)
        return print_result(result, "llm-train", arguments)

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
