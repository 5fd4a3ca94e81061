"""What every command shares: config flags, ``--set``, and turning user errors into one line and exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from llm_training.errors import ConfigError, UserError, one_line, quoted


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows ``(default: X)`` only where it tells something: an option that takes a value and has one.
    A switch (store_true, --no-x) says in its sentence what it changes, and None would read as a value."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or action.nargs == 0
            or default in (None, argparse.SUPPRESS, "")
            or default == []
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def add_root_flag(p: argparse.ArgumentParser) -> None:
    """Where the commands that read runs (llm-logs, llm-dashboard) look for them."""
    p.add_argument(
        "--root", default=".", help="Folder searched for runs (output directories), 4 levels deep."
    )


def add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N].")


def add_format_flag(p: argparse.ArgumentParser) -> None:
    """``--format`` of the commands that load a model (checked by ``export.runtime.load_model``)."""
    p.add_argument("--format", dest="model_format", default="auto", metavar="FORMAT",
                   help="auto, checkpoint, torchscript, onnx, safetensors, hf or gguf. auto goes by the name: .pt "
                   "is a checkpoint (read without running code), .torchscript.pt/.ts TorchScript, .onnx, .gguf, "
                   ".safetensors, a folder Hugging Face. torchscript runs the archive's code: for files you trust.")  # fmt: skip


def add_scoring_flags(p: argparse.ArgumentParser) -> None:
    """What the commands that score a model on test data share."""
    p.add_argument("--batch-size", type=int, default=16, help="Sequences scored at once.")
    add_device_flag(p)


def add_set_flag(p: argparse.ArgumentParser, training: bool = True) -> None:
    """``--set KEY=VALUE``; with ``training`` also the switches that only a training run uses."""
    example = "model.num_layers=6" if training else "data.vocab_size=8192"
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"Set any config key on the command line, e.g. --set {example} (repeatable).",
    )
    if not training:
        return
    p.add_argument("--debug", dest="overrides", action="append_const", const="logging.debug=true",
                   help="Debug mode: DEBUG log lines and autograd anomaly detection (slow).")  # fmt: skip
    p.add_argument("--profile-steps", dest="overrides", action="append", metavar="N",
                   type=lambda n: f"logging.profile_steps={n}",
                   help="Record N training steps with torch.profiler (TensorBoard's profiler tab).")  # fmt: skip


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a training run's length, batch, learning rate and device (llm-train, llm-finetune)."""
    p.add_argument(
        "--num-epochs", type=int, help="Passes over the training data (ignored when a time budget is set)."
    )
    p.add_argument(
        "--batch-size",
        help="Sequences per micro-batch (per GPU when distributed), or auto: the largest that fits in GPU "
        "memory, with gradient accumulation keeping training.global_batch_size sequences a step.",
    )
    p.add_argument("--learning-rate", type=float, help="Peak learning rate after warm-up.")
    p.add_argument("--max-steps", type=int, help="Stop after this many optimizer steps.")
    p.add_argument(
        "--max-time", help="Training time budget, e.g. 70s, 15m or 2h; the learning-rate schedule fits it."
    )
    p.add_argument("--device", help="Device to train on: auto (CUDA when present), cpu, cuda or cuda:N.")


def training_values(args: argparse.Namespace) -> dict:
    """The config keys of ``add_training_flags``' flags (None where not given: lower layers stand)."""
    return {
        "training.num_epochs": args.num_epochs,
        "training.batch_size": args.batch_size,
        "training.learning_rate": args.learning_rate,
        "training.max_steps": args.max_steps,
        "training.max_time": args.max_time,
        "resources.device": args.device,
    }


def add_resume_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume",
        "--resume-from",
        dest="resume",
        metavar="PATH|auto",
        help="Continue training from a checkpoint (.pt), or 'auto': the newest valid checkpoint in "
        "<output-dir>/checkpoints (a fresh start when there is none).",
    )


def resume_command(prog: str, argv: list[str]) -> str:
    """The command line that continues an interrupted run: the same arguments with ``--resume auto``."""
    import shlex

    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--resume", "--resume-from"):
            skip = True
            continue
        if arg.startswith(("--resume=", "--resume-from=")):
            continue
        kept.append(arg)
    return shlex.join([*prog.split(), *kept, "--resume", "auto"])


def report(result) -> str:
    first = f"{result.first_val_loss:.3f} -> " if result.first_val_loss is not None else ""
    return "\n".join(
        [
            "",
            f"done: {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.1f}s on {result.device} "
            f"({result.precision}), {result.num_parameters / 1e6:.2f}M parameters",
            f"validation loss {first}{result.val_loss:.3f}, perplexity {result.val_perplexity:.1f}, "
            f"{result.val_bpb:.3f} bits per byte",
            *(f"note: {note}" for note in getattr(result, "notes", ())),
            *_time_line(getattr(result, "timings", None)),
            _final_line(result),
            "sample:",
            "  " + result.sample.strip().replace("\n", "\n  "),
        ]
    )


def _final_line(result) -> str:
    final = Path(result.final_checkpoint)
    why = getattr(result, "unsaved", {}).get(final.name)
    if why is None:
        return f"final checkpoint: {final}"
    return f"final checkpoint: NOT SAVED ({why}): {final} does not exist"


UNSAVED_EXIT = 1  # training ran, but its final (or preemption) checkpoint could not be written


def exit_status(result) -> int:
    """``UNSAVED_EXIT`` when the checkpoint a run's summary names was not saved, else 0."""
    return UNSAVED_EXIT if Path(result.final_checkpoint).name in getattr(result, "unsaved", {}) else 0


def _time_line(timings: dict | None) -> list[str]:
    """Where the job's time went: the time budget (training.max_time) counts training and the validations
    and saves between steps; start-up (data, model, processes), the final validation and saving are extra."""
    if not timings:
        return []
    parts = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items() if name != "total")
    total = f"{timings['total']:.1f}s in all: " if "total" in timings else ""
    return [f"time: {total}{parts}"]


def print_result(result, prog: str, argv: list[str]) -> int:
    """The run's summary (rank 0 only when several processes trained), or how to resume an interrupted one;
    returns the exit status: ``UNSAVED_EXIT`` when the checkpoint the summary names was not saved
    (``checkpoint.on_save_error: continue`` after a failed save), with a line on stderr, else 0."""
    import os

    if os.environ.get("RANK", "0") != "0":
        return 0
    final = Path(result.final_checkpoint)
    why = getattr(result, "unsaved", {}).get(final.name)
    if result.status == "interrupted":
        saved = f"could not save {final} ({why})" if why else f"saved {final}"
        print(f"stopped by {result.interrupted_by} at step {result.steps}; {saved}\n"
              f"resume with: {resume_command(prog, argv)}")  # fmt: skip
    else:
        print(report(result))
    if why is None:
        return 0
    print(f"error: {final} was not saved ({why}); the model of this run is not on disk", file=sys.stderr)
    return UNSAVED_EXIT


def parse_sets(items: list[str]) -> dict[str, str]:
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {quoted(item)}: expected KEY=VALUE, e.g. --set training.batch_size=8")
        values[key.strip()] = value
    return values


# optional modules -> the extra of pyproject.toml that installs them
EXTRAS = {
    **dict.fromkeys(["transformers", "safetensors", "onnx", "onnxscript", "onnxruntime", "gguf"], "export"),
    **dict.fromkeys(["fastapi", "uvicorn", "starlette", "prometheus_client", "httpx"], "serve"),
    **dict.fromkeys(["tensorboard", "pynvml", "psutil", "plotly"], "monitor"),
    **dict.fromkeys(["datasets", "pyarrow", "aiohttp"], "data"),
    "accelerate": "distributed",
    "peft": "finetune",
    "bitsandbytes": "finetune",
}


def missing_extra(exc: ImportError, extra: str | None = None) -> str | None:
    """The line that says which extra installs a missing optional module; None for any other import error.
    ``extra`` names the command's own extra where a module belongs to several (fastapi: serve, monitor)."""
    top = (exc.name or "").split(".")[0]
    if top not in EXTRAS:
        return None
    return f"the module {top!r} is not installed: pip install 'llm-training[{extra or EXTRAS[top]}]'"


def run(fn: Callable[[], int | None], extra: str | None = None) -> int:
    """Run a command body; a UserError becomes ``error: ...`` on stderr and exit status 2, a missing optional
    module one line naming the extra that installs it (exit status 1), and a full disk or a permission error
    that no caller closer to the file explained one line too."""
    from llm_training.fileio import HANDLED, storage_error

    try:
        return fn() or 0
    except UserError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)  # bounded, printable whatever it quotes
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in HANDLED:
            raise
        error = storage_error(exc)
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except ImportError as exc:
        line = missing_extra(exc, extra)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        import os

        rank = os.environ.get("RANK")
        if (
            rank in (None, "0")
            or "closed by peer" not in str(exc)
            and "DistBackendError" not in type(exc).__name__
        ):
            raise
        # another process of the run failed: it reports why; this one stops with a line, not a traceback
        print(f"error: process {rank} stopped because another process of the run failed", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
