"""``llm-finetune``: fine-tune a pretrained model (a Hugging Face folder or a checkpoint) on chat data."""

from __future__ import annotations

import argparse
import sys

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
from llm_training.config import FINETUNE_METHODS

DESCRIPTION = """\
Fine-tune a pretrained model on chat or instruction data (JSON Lines or a JSON list: messages, sharegpt,
prompt/completion, alpaca or text records). The data is encoded with the model's tokenizer and chat template
into <output-dir>/prepared_chat; the loss counts the assistant's replies only. Defaults suit fine-tuning
(AdamW, learning rate 5e-5 with warm-up, one epoch); every training flag and --set key works as in llm-train.
--method dpo or simpo trains on preference pairs instead (prompt/chosen/rejected records, in
<output-dir>/prepared_preference; DPO's reference log-probs are scored once and cached there).

examples:
  llm-finetune --model ./Qwen2.5-0.5B-Instruct --data chat.jsonl --output-dir runs/sft --max-steps 200
  llm-finetune --model runs/sft/checkpoints/model_final.pt --data prefs.jsonl --method dpo --output-dir runs/dpo
  llm-finetune --num-gpus 4 --model ./Qwen2.5-0.5B-Instruct --data chat.jsonl --output-dir runs/sft"""


def build_parser():
    p = parser("llm-finetune", DESCRIPTION)
    p.add_argument("--model", required=True, help="Hugging Face model folder (gpt2, llama, mistral, qwen2, "
                   "qwen3) with its tokenizer, or a .pt checkpoint of this project.")  # fmt: skip
    p.add_argument(
        "--data",
        required=True,
        help="Chat or instruction file (.jsonl, .json, .jsonl.gz); preference pairs for dpo and simpo.",
    )
    p.add_argument("--output-dir", help="Run directory (default: current directory).")
    p.add_argument("--method", choices=sorted(FINETUNE_METHODS), help="sft: supervised fine-tuning on the "
                   "assistant's replies (default); dpo: direct preference optimisation on chosen/rejected pairs "
                   "against the starting model; simpo: reference-free preference optimisation (SimPO).")  # fmt: skip
    p.add_argument("--beta", type=float, help="dpo and simpo: how far the rewards are scaled (default 0.1 for "
                   "dpo, 2.0 for simpo); --set finetune.gamma=G: simpo's target margin (default beta / 2).")  # fmt: skip
    p.add_argument("--chat-template", help="chatml, a .jinja file or a model folder; default: the model's own "
                   "(a base model without one needs --chat-template chatml).")  # fmt: skip
    p.add_argument(
        "--train-on-prompt", action="store_true", help="Train on every token, not only the replies."
    )
    p.add_argument("--max-length", type=int, help="Tokens an example at most (longer ones are truncated); "
                   "default: the model's context, at most 2048.")  # fmt: skip
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, help="Pack examples into full windows "
                   "of training.seq_length (default: --max-length) with attention kept inside each example, "
                   "instead of padding each batch (finetune.packing, default off; --batch-size then counts windows).")  # fmt: skip
    p.add_argument(
        "--config", help="YAML config file (training, logging, ... keys) over the fine-tuning defaults."
    )
    p.add_argument("--lora-rank", type=int, help="Train LoRA adapters of this rank on frozen weights (needs "
                   "peft); every command reads the result with the adapters merged. Default 0: every weight.")  # fmt: skip
    p.add_argument(
        "--lora-alpha", type=float, help="LoRA scale numerator: adapters scale by alpha / rank (16)."
    )
    p.add_argument("--lora-dropout", type=float, help="Dropout on the adapters' input (0.05).")
    p.add_argument("--qlora", action="store_true", help="QLoRA: the adapted layers' frozen weights in 4-bit "
                   "NF4 (needs bitsandbytes; LoRA of rank 16 unless --lora-rank says otherwise).")  # fmt: skip
    p.add_argument("--lora-targets", help="Layers adapted, comma-separated: qkv, proj, up, down, lm_head "
                   "(default: qkv,proj,up,down).")  # fmt: skip
    add_training_flags(p)
    add_resume_flags(p)
    add_launch_flags(p)
    add_set_flag(p)
    return p


def config_values(args) -> dict:
    return {
        "output_dir": args.output_dir,
        "finetune.method": args.method,
        "finetune.beta": args.beta,
        "finetune.chat_template": args.chat_template,
        "finetune.train_on_prompt": args.train_on_prompt or None,
        "finetune.max_length": args.max_length,
        "finetune.packing": args.packing,
        "finetune.lora_rank": args.lora_rank,
        "finetune.lora_alpha": args.lora_alpha,
        "finetune.lora_dropout": args.lora_dropout,
        "finetune.lora_targets": args.lora_targets,
        "finetune.qlora": args.qlora or None,
        **training_values(args),
        "resources.distributed_backend": args.distributed_backend,
        **parse_sets(args.overrides),
    }


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        from llm_training.api.finetune import finetune_config, run_finetune

        arguments = sys.argv[1:] if argv is None else argv
        args = build_parser().parse_args(arguments)
        cfg = finetune_config(args.config, config_values(args))
        if should_launch(args):
            return launch_workers(args, arguments, cfg)
        result = run_finetune(cfg, args.model, args.data, resume_from=args.resume)
        return print_result(result, "llm-finetune", arguments)

    return run(body)


def launch_workers(args, arguments: list[str], cfg) -> int:
    """--num-gpus/--nnodes: the inputs checked and the data prepared here, once (api/finetune_launch.py
    says why), then the workers started, each loading the model."""
    from llm_training.api.finetune_launch import prepare_before_launch
    from llm_training.cli.launch import check

    check(args)  # an impossible launch (more GPUs than there are) fails before the data is prepared
    # With several nodes every node checks, and rank 0 prepares after the rendezvous: preparing here would
    # keep node 0 from the rendezvous while the other nodes' wait for it (--rdzv-timeout) runs
    line = prepare_before_launch(cfg, args.model, args.data, args.resume, prepare=args.nnodes == 1)
    if line:
        print(line, flush=True)
    return launch(args, arguments, "llm_training.cli.finetune")


if __name__ == "__main__":
    sys.exit(main())
