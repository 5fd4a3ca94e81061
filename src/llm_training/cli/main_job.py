"""The main job: ``python -m llm_training.main`` and ``from llm_training import main; main()``."""

from __future__ import annotations

import sys

from llm_training.cli.common import (
    add_resume_flags,
    add_set_flag,
    exit_status,
    parse_sets,
    parser,
    print_result,
    run,
)

DESCRIPTION = """\
Prepare text, train a language model on it, save checkpoints and logs, and print what it achieved with a
sample of generated text. With no arguments it trains on the built-in sample (the Python Language
Reference) for a short time budget and writes ./checkpoints/, ./logs/, ./metrics.jsonl and ./config.yaml."""


def build_parser():
    p = parser("python -m llm_training.main", DESCRIPTION)
    p.add_argument(
        "--input-file",
        help="Raw text to train on (.txt, .jsonl, .json, optionally .gz); default: the built-in sample.",
    )
    p.add_argument(
        "--output-dir",
        help="Run directory for checkpoints/, logs/, prepared data and metrics (default: current directory).",
    )
    p.add_argument(
        "--config", help="YAML config file, layered over config/default.yaml and under environment and flags."
    )
    add_resume_flags(p)
    p.add_argument(
        "--max-time", help="Training time budget, e.g. 70s, 15m or 2h; the learning-rate schedule fits it."
    )
    p.add_argument("--device", help="Device to train on: auto (CUDA when present), cpu, cuda or cuda:N.")
    add_set_flag(p)
    return p


def main(argv: list[str] | None = None, **overrides):
    """Run the main job from Python, printing what the command prints (the summary and a sample).
    ``overrides`` are runtime overrides with dotted keys, e.g. ``main(**{'training.max_time': '30s'})``.
    Returns the TrainResult; raises UserError on bad input."""
    from llm_training.api.jobs import QUICKSTART, run_training
    from llm_training.config import load_config

    arguments = [] if argv is None else list(argv)
    args = build_parser().parse_args(arguments)
    cli = {
        "data.input_file": args.input_file,
        "output_dir": args.output_dir,
        "training.max_time": args.max_time,
        "resources.device": args.device,
        **parse_sets(args.overrides),
    }
    cfg = load_config(args.config, cli=cli, overrides=overrides)
    if not cfg.data.input_file and not cfg.data.data_dir:
        # quick-start budget sits just above the hard-coded defaults: any file, variable or flag wins over it
        cfg = load_config(args.config, cli=cli, overrides=overrides, preset=QUICKSTART)
    result = run_training(cfg, resume_from=args.resume)
    print_result(result, "python -m llm_training.main", arguments)
    return result


def cli_main(argv: list[str] | None = None) -> int:
    def body() -> int:
        return exit_status(main(sys.argv[1:] if argv is None else argv))

    return run(body)
