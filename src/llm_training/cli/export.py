"""``llm-export``: a checkpoint to ONNX, TorchScript, safetensors, a Hugging Face folder (with a peft adapter) or
GGUF, checked."""

from __future__ import annotations

import sys

from llm_training.cli.common import parser, run

DESCRIPTION = """\
Export a checkpoint, then check the export by running it (onnxruntime, torch.jit.load, safetensors,
transformers, peft, the gguf reader) on the same tokens as the checkpoint: the largest logit difference is
reported, and a quantized export (int8, fp16) is also scored on validation text (--validation-data, else the
built-in sample); a difference beyond tolerance or a perplexity rise beyond --max-perplexity-increase is an
error and nothing is written. Existing files are kept unless --overwrite.

Formats (--quantize values):
  onnx         model.onnx, dynamic batch and sequence, past keys/values unless --no-past; config and
               tokenizer inside (none, int8, fp16)
  torchscript  model.torchscript.pt, traced; config and tokenizer inside (none, fp16)
  safetensors  model.safetensors + config.json + tokenizer.json beside it (none, fp16)
  hf           a folder for transformers' AutoModelForCausalLM and AutoTokenizer (none, fp16)
  gguf         model.gguf for llama.cpp, llama or gpt2 architecture (none=f32, fp16, int8=q8_0)
  peft         of a LoRA fine-tuning (--lora-rank): a folder with base/ (the frozen weights, an hf folder)
               and adapter/ (adapter_config.json, adapter_model.safetensors) for peft.PeftModel (none)
"""


def build_parser():
    p = parser("llm-export", DESCRIPTION)
    p.add_argument("--checkpoint", required=True, help="Checkpoint (.pt) to export.")
    one = p.add_mutually_exclusive_group()
    one.add_argument("--format", help="One format (see above); with --output or --output-dir.")
    one.add_argument("--formats", help="Comma-separated formats; with --output-dir.")
    p.add_argument(
        "--output",
        help="Output file (a folder for hf; an existing folder or a name ending in / gets the file inside). "
        "Default: exports/<checkpoint name>.<ext>.",
    )
    p.add_argument(
        "--output-dir",
        help="Folder (made if missing) for --formats or --format: model.onnx, model.gguf, hf/, ...",
    )
    p.add_argument("--quantize", default="none", help="none, int8 or fp16 (which formats take which: above).")
    p.add_argument(
        "--with-past",
        dest="past",
        action="store_true",
        default=True,
        help="ONNX: past key/value inputs and outputs for fast generation (the default).",
    )
    p.add_argument("--no-past", dest="past", action="store_false", help="ONNX: input_ids -> logits only.")
    p.add_argument(
        "--prune", type=float, metavar="SPARSITY", help="Magnitude-prune hidden matrices to this share."
    )
    p.add_argument(
        "--prune-scope", default="layer", choices=("layer", "global"), help="Per matrix or global."
    )
    p.add_argument("--validation-data", help="Text (.txt, .jsonl with 'text') for the perplexity check.")
    p.add_argument("--max-perplexity-increase", type=float, default=0.05, help="Allowed relative rise.")
    p.add_argument("--overwrite", action="store_true", help="Replace existing output files.")
    p.add_argument("--json", help="Also write the results (sizes, checks) to this JSON file.")
    return p


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        import logging

        from llm_training.errors import UserError
        from llm_training.export.exporter import ExportOptions, export_all, export_checkpoint

        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        if args.json:  # before the work: never the checkpoint, a link or a file of the user's
            from llm_training.fileio import check_output_file, json_output

            check_output_file(
                args.json, "--json", [args.checkpoint], json_output("format", "export_path", kind=list)
            )
        pruning = {"sparsity": args.prune, "scope": args.prune_scope} if args.prune is not None else None
        common = dict(quantize=args.quantize, pruning=pruning, overwrite=args.overwrite,
                      validation_data=args.validation_data, max_perplexity_increase=args.max_perplexity_increase)  # fmt: skip
        if args.formats:
            if args.output:
                raise UserError("--formats writes to --output-dir; --output names the file of one --format")
            results = export_all(args.checkpoint, args.formats.split(","), args.output_dir or "exports",
                                 past=args.past, **common)  # fmt: skip
        else:
            options = ExportOptions(format=args.format or "onnx", output=args.output, output_dir=args.output_dir,
                                    past=args.past, **common)  # fmt: skip
            results = [export_checkpoint(args.checkpoint, options)]
        for r in results:
            kind = r.format if r.quantize == "none" else f"{r.format} {r.quantize}"
            line = (f"{kind:<17} {r.export_path}  {r.size_bytes / 1e6:.2f} MB "
                    f"({100 * r.size_bytes / max(1, r.source_bytes):.0f}% of fp32 weights)  "
                    f"max logit diff {r.check['max_logit_diff']:.2e}")  # fmt: skip
            if "perplexity_change" in r.check:
                c = r.check
                line += f"  perplexity {c['perplexity_before']:.3f} -> {c['perplexity_after']:.3f} ({100 * c['perplexity_change']:+.2f}%)"
            print(line)
            if r.pruning:
                print(f"{'':<17} pruned: {100 * r.pruning['pruned_sparsity']:.1f}% of hidden weights "
                      f"({100 * r.pruning['overall_sparsity']:.1f}% of all)")  # fmt: skip
        if args.json:
            from llm_training.fileio import write_json

            write_json(args.json, [r.as_dict() for r in results])
        return 0

    return run(body)


if __name__ == "__main__":
    sys.exit(main())
