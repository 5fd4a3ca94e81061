"""The main job: ``python -m llm_training.main`` and ``from llm_training import main; main()``."""

from __future__ import annotations

import sys
from pathlib import Path

from llm_training.cli.common import (
    add_resume_flags,
    add_set_flag,
    interrupted_message,
    parse_sets,
    parser,
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
    """Run the main job from Python. ``overrides`` are runtime overrides with dotted keys, e.g.
    ``main(**{'training.max_time': '30s'})``. Returns the TrainResult; raises UserError on bad input."""
    from llm_training.api.jobs import QUICKSTART, run_training
    from llm_training.config import load_config

    args = build_parser().parse_args([] if argv is None else argv)
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
    return run_training(cfg, resume_from=args.resume)


def report(result) -> str:
    first = f"{result.first_val_loss:.3f} -> " if result.first_val_loss is not None else ""
    return "\n".join(
        [
            "",
            f"done: {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.1f}s on {result.device} "
            f"({result.precision}), {result.num_parameters / 1e6:.2f}M parameters",
            f"validation loss {first}{result.val_loss:.3f}, perplexity {result.val_perplexity:.1f}, "
            f"{result.val_bpb:.3f} bits per byte",
            f"final checkpoint: {Path(result.final_checkpoint)}",
            "sample:",
            "  " + result.sample.strip().replace("\n", "\n  "),
        ]
    )


def cli_main(argv: list[str] | None = None) -> int:
    def body() -> int:
        arguments = sys.argv[1:] if argv is None else argv
        result = main(arguments)
        if result.status == "interrupted":
            print(interrupted_message(result, "python -m llm_training.main", arguments))
        else:
            print(report(result))
        return 0

    return run(body)
