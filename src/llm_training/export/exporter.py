"""Exporting a checkpoint: what ``llm-export``, ``ModelExporter`` and ``Trainer.export`` run.

Every export is written into a hidden staging folder beside its destination, checked there, and only then
moved into place: a failed export or check leaves nothing behind and never touches an existing file. The
check runs the written model in the runtime that reads its format (onnxruntime, ``torch.jit.load``,
``transformers``, with ``peft`` for an adapter, the ``gguf`` reader, ``safetensors``) on the same tokens as
the checkpoint and compares logits; quantized exports (int8, fp16) are also scored on validation text and
the perplexity change is reported and bounded. A check that fails is an error.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llm_training.config import ModelConfig, model_config_json
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import UserError
from llm_training.export.quiet import quiet
from llm_training.fileio import (
    check_output_dir,
    check_output_file,
    disk_error,
    missing_dirs,
    remove_empty,
    replace_dir,
    staging_dir,
)
from llm_training.model.transformer import Transformer

log = logging.getLogger("llm_training.export")

# format -> what ends the name of its output (hf: a folder)
FORMATS = {
    "onnx": ".onnx",
    "torchscript": ".torchscript.pt",
    "safetensors": ".safetensors",
    "hf": "_hf",
    "gguf": ".gguf",
    "peft": "_peft",  # a folder: base/ (a Hugging Face model) and adapter/ (its LoRA adapter)
}
FOLDERS = ("hf", "peft")
ALIASES = {"huggingface": "hf", "transformers": "hf", "jit": "torchscript", "ts": "torchscript", "adapter": "peft",
           "lora": "peft"}  # fmt: skip
QUANTIZE = {  # format -> what --quantize accepts there
    "onnx": ("none", "int8", "fp16"),
    "torchscript": ("none", "fp16"),
    "safetensors": ("none", "fp16"),
    "hf": ("none", "fp16"),
    "gguf": ("none", "fp16", "int8"),
    "peft": ("none",),
}
# largest logit difference allowed, as a share of (1 + the largest logit): fp32 formats differ only by the
# order of floating-point sums; fp16 weights change each logit by about 1e-3 of its size
TOLERANCE = {"none": 1e-3, "fp16": 3e-2}


class ExportCheckError(UserError):
    """The written model does not compute what the checkpoint computes."""


@dataclass
class ExportOptions:
    format: str = "onnx"
    output: str | Path | None = None  # file (folder for hf); None: exports/<checkpoint name><suffix>
    output_dir: str | Path | None = None  # instead of output: a folder (made if missing), the file named as
    # export_all names it (model.onnx, model.safetensors, hf/, ...)
    quantize: str = "none"  # none, int8, fp16 (see QUANTIZE)
    past: bool = True  # ONNX: inputs and outputs for past keys and values (fast generation), as optimum does
    pruning: object = None  # see export.prune.parse_pruning
    overwrite: bool = False
    validation_data: str | Path | None = None  # text for the perplexity check; None: the built-in sample
    check_tokens: int = 16384  # at most this many validation tokens are scored
    max_perplexity_increase: float = 0.05  # relative; a larger change fails the check of a quantized export


@dataclass
class ExportResult:
    format: str
    export_path: Path
    files: list[Path]
    size_bytes: int
    source_bytes: int  # the model's fp32 weights, for the size ratio
    quantize: str
    check: dict
    pruning: dict | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["export_path"], d["files"] = str(self.export_path), [str(f) for f in self.files]
        return d


@dataclass
class _Validation:
    tokens: list[int]
    name: str  # where the text came from
    perplexity: float | None = None  # of the (pruned) checkpoint: the reference of every quantized export


@dataclass
class _Source:
    """The checkpoint's model as every export of one command starts from it, with its validation text
    tokenized (and scored) once."""

    model: Transformer
    tokenizer: Tokenizer
    path: Path
    step: int
    pruning: dict | None = None
    chat_template: str | None = None  # of a fine-tuned chat model: written into Hugging Face and GGUF exports
    validation: dict[str, _Validation] = field(default_factory=dict)  # by validation_data


def normalise_format(name: str) -> str:
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in FORMATS:
        raise UserError(f"unknown export format {name!r}; valid: {', '.join(FORMATS)}")
    return key


def check_options(options: ExportOptions) -> tuple[str, str]:
    """The format and the quantization, normalised; unknown or mismatched ones are refused."""
    fmt = normalise_format(options.format)
    quantize = (options.quantize or "none").lower()
    if quantize not in QUANTIZE[fmt]:
        raise UserError(
            f"--quantize {quantize!r} is not available for {fmt}; valid there: {', '.join(QUANTIZE[fmt])}"
        )
    if fmt == "peft" and options.pruning is not None:  # pruning the merged weights has no adapter form
        raise UserError(
            "--prune does not apply to --format peft (the adapter and its base); export --format hf"
        )
    return fmt, quantize


def default_output(checkpoint: Path, fmt: str, folder: Path | None = None, stem: str | None = None) -> Path:
    """``exports/<checkpoint name><suffix>``; a Hugging Face export is a folder ``<name>_hf`` (``hf`` when
    the name is ``model``, as in ``--output-dir``), an adapter export likewise ``<name>_peft`` or ``peft``."""
    stem = stem or checkpoint.stem
    name = fmt if fmt in FOLDERS and stem == "model" else stem + FORMATS[fmt]
    return (folder if folder is not None else Path("exports")) / name


def _target(checkpoint: Path, fmt: str, options: ExportOptions) -> Path:
    """Where the export goes: ``output``, or a file inside ``output_dir`` (or inside ``output`` when that is
    an existing folder or ends with a slash; a Hugging Face export is itself a folder)."""
    if options.output is not None and options.output_dir is not None:
        raise UserError("give --output (a file) or --output-dir (a folder), not both")
    if options.output_dir is not None:
        return default_output(checkpoint, fmt, Path(options.output_dir), "model")
    if not options.output:
        return default_output(checkpoint, fmt)
    target = Path(options.output)
    folder = str(options.output).endswith(("/", os.sep)) or (target.suffix == "" and target.is_dir())
    return default_output(checkpoint, fmt, folder=target) if folder and fmt not in FOLDERS else target


def _check_validation_path(validation_data) -> None:
    if validation_data is not None and not Path(validation_data).is_file():
        raise UserError(
            f"--validation-data {validation_data}: file not found (give plain text or .jsonl records with 'text')"
        )


def _refuse_existing(fmt: str, target: Path, overwrite: bool, inputs: list) -> None:
    """Every path an export to ``target`` writes must be free, unless overwriting; never the checkpoint or
    the validation data it reads, a link, the current folder or a folder that holds an input, even then."""
    if fmt == "safetensors":
        paths = [target, target.parent / "config.json", target.parent / "tokenizer.json"]
    elif fmt == "onnx":
        paths = [target, target.parent / (target.name + ".data")]
    else:
        paths = [target]
    for path in paths:
        if fmt in FOLDERS:  # a folder, replaced whole only after the new one is complete
            check_output_dir(path, overwrite=True, inputs=inputs, label="--output")
        else:
            check_output_file(path, "--output", inputs)
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} exists; pass --overwrite (overwrite=True) to replace it")


def load_source(
    checkpoint: str | Path, pruning=None, validation_data=None, check_tokens: int = 16384
) -> _Source:
    from llm_training.export.prune import magnitude_prune, parse_pruning
    from llm_training.train.artifacts import load_trained

    spec = parse_pruning(pruning)  # bad options fail before the checkpoint is read
    _check_validation_path(validation_data)
    trained = load_trained(checkpoint, "cpu")
    source = _Source(trained.model.float().eval(), trained.tokenizer, Path(checkpoint), trained.step,
                     chat_template=trained.chat_template)  # fmt: skip
    _validation(source, validation_data, check_tokens)  # unreadable text fails before anything is built
    if spec is not None:
        before = _perplexity(source.model, _validation(source, validation_data, check_tokens))
        report = magnitude_prune(source.model, *spec)
        after = _reference_perplexity(source, validation_data, check_tokens)
        source.pruning = {
            **report.as_dict(),
            "perplexity_before": round(before, 4),
            "perplexity_after": round(after, 4),
        }
        log.info("pruned to %.1f%% sparsity of the hidden matrices (%.1f%% of all weights); perplexity %.3f -> %.3f",
                 100 * report.pruned_sparsity, 100 * report.overall_sparsity, source.pruning["perplexity_before"],
                 source.pruning["perplexity_after"])  # fmt: skip
    return source


def export_checkpoint(
    checkpoint: str | Path, options: ExportOptions, source: _Source | None = None
) -> ExportResult:
    """Export ``checkpoint`` as ``options`` say, check it, and move it into place; see the module docstring."""
    fmt, quantize = check_options(options)
    checkpoint = Path(checkpoint)
    target = _target(checkpoint, fmt, options)
    _refuse_existing(fmt, target, options.overwrite, [checkpoint, options.validation_data])
    from llm_training.export.runtime import TORCHSCRIPT_SUFFIXES

    if fmt == "torchscript" and not target.name.lower().endswith(TORCHSCRIPT_SUFFIXES):
        log.warning("%s: the other commands read a TorchScript export by its name (.torchscript.pt, .ts) or "
                    "with --format torchscript; under this name they refuse it as a checkpoint", target)  # fmt: skip
    started = time.perf_counter()
    source = source or load_source(checkpoint, options.pruning, options.validation_data, options.check_tokens)
    images = getattr(source.model, "vision_cfg", None) is not None
    if images and (fmt != "safetensors" or quantize != "none"):  # the other formats hold a language model
        raise UserError(
            f"{checkpoint} is a text-and-image model: it exports as --format safetensors (fp32) only"
        )
    made = missing_dirs(target)
    staging = staging_dir(target)  # a fresh folder: nothing there before is followed or removed
    try:
        staged = staging / target.name
        log.info(
            "exporting %s to %s (%s)", checkpoint, target, fmt if quantize == "none" else f"{fmt}, {quantize}"
        )
        if images:
            from llm_training.multimodal.export import check_weights, write_weights

            write_weights(source.model, source.tokenizer, staged)
            check = check_weights(source.model, staged)
        else:
            with quiet():
                _write(fmt, quantize, options, source, staged, target)
            log.info("checking %s with %s", target.name, _runtime_name(fmt))
            check = _check(fmt, quantize, options, source, staged)
        # again just before the move: what appeared at the target during the work is refused too
        _refuse_existing(fmt, target, options.overwrite, [checkpoint, options.validation_data])
        files = _move_into_place(staging, target)
    except BaseException as exc:  # a full disk or permissions: one line; no staging or new empty folder left
        shutil.rmtree(staging, ignore_errors=True)
        remove_empty(made)
        error = disk_error(exc, target) if isinstance(exc, Exception) else None
        if error is None:
            raise
        raise error from None
    shutil.rmtree(staging, ignore_errors=True)  # emptied by the move
    size = sum(_size(f) for f in files)
    source_bytes = 4 * sum(p.numel() for p in source.model.parameters())  # parameters() lists tied ones once
    return ExportResult(fmt, target, files, size, source_bytes, quantize, check, source.pruning,
                        round(time.perf_counter() - started, 2))  # fmt: skip


def export_all(
    checkpoint: str | Path, formats: list[str], output_dir: str | Path, **options
) -> list[ExportResult]:
    """Several formats into one folder (``model.onnx``, ``model.torchscript.pt``, ``model.safetensors`` with
    ``config.json`` and ``tokenizer.json``, ``hf/``, ``model.gguf``), the checkpoint read once."""
    names = [normalise_format(f) for f in formats]
    if not names:
        raise UserError("--formats: name at least one format; valid: " + ", ".join(FORMATS))
    quantize = (options.get("quantize") or "none").lower()
    plain = [f for f in dict.fromkeys(names) if quantize not in QUANTIZE[f]]
    if plain and quantize != "none":
        log.warning("--quantize %s: %s %s no %s; written in fp32", quantize, ", ".join(plain),
                    "has" if len(plain) == 1 else "have", quantize)  # fmt: skip
    plans = []
    for fmt in dict.fromkeys(names):
        opts = ExportOptions(format=fmt, output=default_output(Path(checkpoint), fmt, Path(output_dir), "model"),
                             **{**options, "quantize": quantize if quantize in QUANTIZE[fmt] else "none"})  # fmt: skip
        check_options(opts)
        plans.append(opts)
    for opts in plans:  # refuse before anything is written
        _refuse_existing(opts.format, Path(opts.output), opts.overwrite, [checkpoint, opts.validation_data])
    first = plans[0]
    source = load_source(checkpoint, first.pruning, first.validation_data, first.check_tokens)
    return [export_checkpoint(checkpoint, opts, source) for opts in plans]


# ------------------------------------------------------------------------------------------------- writing


def _write(
    fmt: str, quantize: str, options: ExportOptions, source: _Source, path: Path, target: Path
) -> None:
    model, tokenizer = source.model, source.tokenizer
    config = model_config_json(model.cfg)
    if fmt == "onnx":
        from llm_training.export.onnx import (
            META_CONFIG,
            META_TOKENIZER,
            convert_fp16,
            export_onnx,
            quantize_int8,
        )

        metadata = {
            META_CONFIG: config,
            META_TOKENIZER: tokenizer.to_str(),
            "llm_training.step": str(source.step),
        }
        if quantize == "none":
            export_onnx(model, path, metadata, past=options.past)
            return
        plain = path.parent / ("fp32-" + path.name)
        export_onnx(model, plain, metadata, past=options.past)
        (quantize_int8 if quantize == "int8" else convert_fp16)(plain, path)
        for leftover in (plain, plain.parent / (plain.name + ".data")):
            leftover.unlink(missing_ok=True)
    elif fmt == "torchscript":
        from llm_training.export.torchscript import export_torchscript

        export_torchscript(
            _as(model, quantize), path, {"config.json": config, "tokenizer.json": tokenizer.to_str()}
        )
    elif fmt == "safetensors":
        from llm_training.export.weights import save_weights

        save_weights(model, tokenizer, path, config, half=quantize == "fp16")
    elif fmt == "hf":
        from llm_training.export.hf import save_hf

        save_hf(_as(model, quantize), tokenizer, path, chat_template=source.chat_template)
    elif fmt == "peft":
        from llm_training.export.adapter import save_peft

        save_peft(source.path, tokenizer, path, target, source.chat_template)
    else:
        from llm_training.export.gguf import save_gguf

        dtype = {"none": "f32", "fp16": "f16", "int8": "q8_0"}[quantize]
        save_gguf(model, tokenizer, path, dtype, source.path.stem, chat_template=source.chat_template)


def _as(model: Transformer, quantize: str) -> Transformer:
    """fp16 copy for the formats that store the model's own dtype."""
    if quantize != "fp16":
        return model
    import copy

    return copy.deepcopy(model).half()


def _move_into_place(staging: Path, target: Path) -> list[Path]:
    moved = []
    for item in sorted(staging.iterdir()):
        _normal_modes(item)
        final = target.parent / item.name
        if item.is_dir():  # a Hugging Face folder: marked as ours, the old one removed only after the swap
            replace_dir(item, final, "llm-export")
        else:
            os.replace(item, final)
        moved.append(final)
    return moved


def _normal_modes(path: Path) -> None:
    """Files 0666 and folders 0777 less the umask, as ``cp`` makes them: writers that go through a temporary
    file (safetensors, ``tempfile.mkstemp``) leave 0600, which another user (a container's) cannot read."""
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    try:  # Linux shows it; setting and restoring it would race with other threads creating files
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


# ------------------------------------------------------------------------------------------------ checking


def _runtime_for(fmt: str, path: Path, cfg: ModelConfig):
    """The exported model as run by the runtime that reads its format: an ``nn.Module`` giving logits."""
    from llm_training.export.runtime import RuntimeModule, load_model

    if fmt == "peft":
        from llm_training.export.adapter import load_peft

        adapted = load_peft(path)
        return RuntimeModule(cfg, lambda ids: adapted(input_ids=ids).logits)
    if fmt != "hf":  # the format just written, not one guessed from the name the user chose (s.bin)
        return load_model(path, kind=fmt).module
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hf = AutoModelForCausalLM.from_pretrained(str(path)).float().eval()
    return RuntimeModule(cfg, lambda ids: hf(input_ids=ids).logits)


@torch.no_grad()
def _check(fmt: str, quantize: str, options: ExportOptions, source: _Source, path: Path) -> dict:
    runtime = _runtime_for(fmt, path, source.model.cfg)
    validation = _validation(source, options.validation_data, options.check_tokens)
    # two rows of the validation tokens (a ramp of ids where the text is too short)
    width = min(source.model.cfg.max_seq_length, 64, max(1, len(validation.tokens) // 2))
    if len(validation.tokens) >= 2 * width:
        ids = torch.tensor(validation.tokens[: 2 * width]).view(2, width)
    else:
        ids = torch.arange(2 * width).remainder(source.model.cfg.vocab_size).view(2, width)
    reference = source.model(ids).float()
    got = runtime(ids).float()
    if got.shape != reference.shape:
        raise ExportCheckError(
            f"{fmt} export gives logits of shape {tuple(got.shape)}, expected {tuple(reference.shape)}"
        )
    diff = float((got - reference).abs().max())
    scale = 1.0 + float(reference.abs().max())
    same_top = float((got.argmax(-1) == reference.argmax(-1)).float().mean())
    check = {"runtime": _runtime_name(fmt), "tokens_compared": int(ids.numel()), "max_logit_diff": diff,
             "largest_logit": scale - 1, "top1_agreement": round(same_top, 4)}  # fmt: skip
    if quantize in TOLERANCE:
        check["tolerance"] = TOLERANCE[quantize] * scale
        if not diff <= check["tolerance"]:  # also catches NaN
            raise ExportCheckError(
                f"{fmt} export check failed: logits differ by up to {diff:.3g} from the checkpoint's "
                f"(allowed {check['tolerance']:.3g}); nothing was written"
            )
    if quantize != "none":
        before = _reference_perplexity(source, options.validation_data, options.check_tokens)
        after = _perplexity(runtime, validation)
        change = after / before - 1
        check.update(perplexity_before=round(before, 4), perplexity_after=round(after, 4),
                     perplexity_change=round(change, 5), validation_tokens=len(validation.tokens) - 1,
                     validation_text=validation.name)  # fmt: skip
        if not change <= options.max_perplexity_increase:
            raise ExportCheckError(
                f"{fmt} {quantize} export check failed: perplexity {before:.3f} -> {after:.3f} "
                f"({100 * change:+.1f}%, allowed +{100 * options.max_perplexity_increase:.1f}%); nothing was written"
            )
    return check


def _runtime_name(fmt: str) -> str:
    return {"onnx": "onnxruntime", "torchscript": "torch.jit.load", "safetensors": "safetensors",
            "hf": "transformers", "gguf": "gguf reader", "peft": "transformers + peft"}[fmt]  # fmt: skip


def _validation(source: _Source, validation_data, limit: int) -> _Validation:
    """The first ``limit`` tokens of the validation text (``validation_data``, else the built-in sample),
    tokenized once per command."""
    key = str(validation_data)
    if key not in source.validation:
        from llm_training.eval.data import TextSet, read_test_data

        if validation_data is not None:
            data = read_test_data(validation_data)
            if not isinstance(data, TextSet):
                raise UserError(
                    f"{validation_data}: validation text must be plain text or records with 'text'"
                )
            documents, name = data.documents, str(validation_data)
        else:
            from llm_training.data.sources import read_documents, sample_data_path

            documents = [d.text for d in read_documents(str(sample_data_path()))]
            name = "built-in sample (Python Language Reference)"
        from llm_training.eval.metrics import token_stream

        source.validation[key] = _Validation(token_stream(source.tokenizer, documents[:2000], limit), name)
    return source.validation[key]


def _perplexity(model, validation: _Validation) -> float:
    from llm_training.eval.metrics import score_tokens, text_metrics

    return text_metrics(score_tokens(model, validation.tokens, batch_size=8), 1)["perplexity"]


def _reference_perplexity(source: _Source, validation_data, limit: int) -> float:
    """The checkpoint model's perplexity (after pruning), computed once for all its quantized exports."""
    validation = _validation(source, validation_data, limit)
    if validation.perplexity is None:
        validation.perplexity = _perplexity(source.model, validation)
    return validation.perplexity
