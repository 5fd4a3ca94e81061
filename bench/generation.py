"""Protocol 5 (generation part) of ../shared/BENCHMARKS.md: new tokens/s with the KV cache against recomputing
the whole sequence for every new token, greedy, prompt 128 tokens, 256 new tokens, batch 1 and a larger batch.

    python bench/generation.py                       # CPU: a 6 x 384 Llama-style model (2 cores are slow)
    python bench/generation.py --shape gpt2-124m     # one GPU: the GPT-2 124M shape in bf16

Random weights (speed does not depend on them); every row runs the full 256 tokens (no end-of-text).
The comparison with Hugging Face ``generate`` on the same weights is ``bench/generation_hf.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch

from llm_training.config import ModelConfig
from llm_training.model.generate import Sampling, generate_tokens
from llm_training.model.transformer import Transformer

SHAPES = {
    "small": {"model_type": "llama", "num_layers": 6, "hidden_size": 384, "num_attention_heads": 6,
              "vocab_size": 16384, "max_seq_length": 512},
    "gpt2-124m": {"model_type": "gpt2", "num_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                  "vocab_size": 50304, "max_seq_length": 1024},
}  # fmt: skip


def measure(model, batch: int, prompt: int, new: int, use_cache: bool, autocast, repeats: int) -> float:
    """New tokens/s, the median of ``repeats`` timed runs after a short warm-up."""
    torch.manual_seed(0)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt)).tolist()
    sampling = Sampling(max_new_tokens=new, temperature=0)
    generate_tokens(
        model, prompts, Sampling(max_new_tokens=4, temperature=0), use_cache=use_cache, autocast=autocast
    )
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate_tokens(model, prompts, sampling, use_cache=use_cache, autocast=autocast)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        assert all(len(row) == new for row in out)
    return batch * new / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=SHAPES, default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each measure (median)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    shape = args.shape or ("gpt2-124m" if cuda else "small")
    batches = args.batches or ([1, 32] if cuda else [1, 8])
    device = torch.device("cuda" if cuda else "cpu")
    # bf16 weights on the GPU: autocast would cast every weight again at every token (10x slower here)
    model = (
        Transformer(ModelConfig(**SHAPES[shape])).to(device, torch.bfloat16 if cuda else torch.float32).eval()
    )
    autocast = None
    name = (
        torch.cuda.get_device_name()
        if cuda
        else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    )
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {name}, torch {torch.__version__}, shape {shape} "
          f"({model.num_parameters() / 1e6:.1f}M parameters), prompt {args.prompt}, {args.new} new tokens, greedy, median of {args.repeats}")  # fmt: skip
    with contextlib.suppress(KeyboardInterrupt):
        for batch in batches:
            cached = measure(model, batch, args.prompt, args.new, True, autocast, args.repeats)
            full = measure(model, batch, args.prompt, args.new, False, autocast, args.repeats)
            print(json.dumps({"batch": batch, "kv_cache_tokens_per_s": round(cached, 1),
                              "recompute_tokens_per_s": round(full, 1), "speedup": round(cached / full, 2)}),
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
