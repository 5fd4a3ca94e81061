"""Protocol 5 (generation part) of ../shared/BENCHMARKS.md against Hugging Face ``generate``: new tokens/s,
greedy, prompt 128 tokens, 256 new tokens, batch 1 and 32, bf16 on one GPU, median of 3, on the same weights:
the model is exported with ``save_hf`` and loaded by ``transformers``' ``AutoModelForCausalLM``.

    python bench/generation_hf.py                 # GPT-2 124M shape and a Llama-style 124M
    python bench/generation_hf.py --shapes gpt2-124m --batches 1

Random weights (speed does not depend on them); every row generates all 256 tokens (``min_new_tokens`` for
Hugging Face, no end-of-text id for ours). Ours runs ``generate_tokens`` with the KV cache and CUDA graphs for
the decoding steps, as it is by default and with ``compile=True`` (the step compiled by ``torch.compile``
before it is recorded; the time of the first, compiling call is reported apart). The first token ids of both are compared as a sanity check:
bf16 rounding lets greedy paths part after a while, so only the start must agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from llm_training.config import ModelConfig
from llm_training.data.tokenizer import Tokenizer
from llm_training.export.hf import save_hf
from llm_training.model.generate import Sampling, generate_tokens
from llm_training.model.transformer import Transformer

SHAPES = {
    "gpt2-124m": {"model_type": "gpt2", "num_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                  "vocab_size": 50304, "max_seq_length": 1024, "bias": True},
    "llama-124m": {"model_type": "llama", "num_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                   "vocab_size": 50304, "max_seq_length": 1024},
}  # fmt: skip


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import transformers

    tokenizer = Tokenizer.train(["a small text to give the export a tokenizer file " * 50], 300)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; prompt {args.prompt}, {args.new} new tokens, greedy, bf16, "
          f"median of {args.repeats}")  # fmt: skip
    for shape in args.shapes:
        bench_shape(shape, args, tokenizer)
        torch.cuda.empty_cache()


def bench_shape(shape: str, args, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda")
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(**SHAPES[shape])).eval()
    with tempfile.TemporaryDirectory() as folder:
        save_hf(ours, tokenizer, folder)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    ours = ours.to(device, torch.bfloat16)
    for batch in args.batches:
        torch.manual_seed(1)
        prompts = torch.randint(0, ours.cfg.vocab_size, (batch, args.prompt), device=device)
        sampling = Sampling(max_new_tokens=args.new, temperature=0)
        out: dict = {}

        def run_ours(prompts=prompts, sampling=sampling, out=out):
            out["ours"] = generate_tokens(ours, prompts.tolist(), sampling)

        def run_compiled(prompts=prompts, sampling=sampling, out=out):
            out["compiled"] = generate_tokens(ours, prompts.tolist(), sampling, compile=True)

        def run_hf(prompts=prompts, out=out):
            with torch.no_grad():
                out["hf"] = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                        max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0)  # fmt: skip

        timed(run_ours), timed(run_hf)  # warm-up: kernels, allocator, graphs
        compile_s = timed(run_compiled)  # the first call compiles the decoding step for this batch shape
        ours_s = statistics.median(timed(run_ours) for _ in range(args.repeats))
        compiled_s = statistics.median(timed(run_compiled) for _ in range(args.repeats))
        hf_s = statistics.median(timed(run_hf) for _ in range(args.repeats))
        hf_new = out["hf"][:, args.prompt :].tolist()
        agree = sum(a[:8] == b[:8] for a, b in zip(out["ours"], hf_new, strict=True)) / batch
        tokens = batch * args.new
        print(json.dumps({"shape": shape, "batch": batch, "ours_tokens_per_s": round(tokens / ours_s, 1),
                          "hf_generate_tokens_per_s": round(tokens / hf_s, 1), "speedup": round(hf_s / ours_s, 2),
                          "ours_compiled_tokens_per_s": round(tokens / compiled_s, 1),
                          "compiled_speedup": round(hf_s / compiled_s, 2), "first_call_with_compile_s": round(compile_s, 1),
                          "first_8_tokens_agree": round(agree, 3)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
