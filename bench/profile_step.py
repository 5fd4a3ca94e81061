"""Where a training step's GPU time goes: torch.profiler over a few compiled steps of the Protocol 1 model,
the top CUDA kernels by total time. Used to decide what to optimise next.

    python bench/profile_step.py [--style gpt2] [--batch 32]
"""

from __future__ import annotations

import argparse

import torch

from llm_training.config import load_config
from llm_training.model.transformer import Transformer
from llm_training.train.device import resolve_runtime
from llm_training.train.optim import build_optimizer
from llm_training.train.step import train_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--style", default="gpt2")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    cfg = load_config(
        cli={"model.model_type": args.style, "model.num_layers": 12, "model.hidden_size": 768,
             "model.num_attention_heads": 12, "model.vocab_size": 50304, "model.max_seq_length": 1024,
             "training.optimizer": "adamw"},
        environ={}, default_file=None,
    )  # fmt: skip
    runtime = resolve_runtime(cfg)
    model = Transformer(cfg.model).to(runtime.device)
    optimizer = build_optimizer(model, cfg.training, runtime.device)
    compiled = torch.compile(model)
    data = torch.randint(0, 50304, (args.batch, 1025), device=runtime.device)
    micro = [{"input_ids": data[:, :-1], "labels": data[:, 1:]}]
    for _ in range(8):
        train_step(compiled, micro, optimizer, runtime, grad_clip=1.0)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            train_step(compiled, micro, optimizer, runtime, grad_clip=1.0)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
