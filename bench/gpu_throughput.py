"""Protocol 1 of ../shared/BENCHMARKS.md: GPU training throughput of whole steps (forward, backward, optimizer).

GPT-2 124M shape (12 layers, 12 heads, width 768, vocabulary 50,304, context 1,024, no dropout, tied
embeddings) and the Llama-style shape of the same size, bf16 autocast, torch.compile, fused AdamW, through the
project's own `train_step` and optimizer builder. Random token ids (throughput does not depend on them).
Reports tokens/s over 30 timed steps after 10 warm-up steps, peak GPU memory, and MFU:

    MFU = tokens/s x flops_per_token / peak,  flops_per_token = 6 x (non-embedding parameters + lm head)
          + 12 x layers x width x context  (PaLM, appendix B),  peak = 989.4 TFLOP/s (H100 SXM dense bf16)

    python bench/gpu_throughput.py [--batch 16 32] [--styles gpt2 llama] [--attention auto cudnn flash]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
import torch._inductor.config

from llm_training.config import load_config
from llm_training.model.transformer import Transformer
from llm_training.train.device import resolve_runtime
from llm_training.train.optim import build_optimizer
from llm_training.train.step import train_step

PEAK_FLOPS = 989.4e12


def attention_backend(name: str):
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[name])


def measure(
    style: str,
    batch: int,
    attention: str,
    steps: int,
    warmup: int,
    compile_mode: str,
    fp32_loss: bool = True,
    loss_chunk: int = 0,
) -> str:
    cfg = load_config(
        cli={
            "model.model_type": style,
            "model.num_layers": 12,
            "model.hidden_size": 768,
            "model.num_attention_heads": 12,
            "model.vocab_size": 50304,
            "model.max_seq_length": 1024,
            "model.dropout": 0.0,
            "model.loss_chunk_tokens": loss_chunk,
            "training.optimizer": "adamw",
            "training.learning_rate": 6e-4,
            "training.batch_size": batch,
        },
        environ={},
        default_file=None,
    )
    runtime = resolve_runtime(cfg)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(runtime.device)
    model.loss_in_fp32 = fp32_loss
    optimizer = build_optimizer(model, cfg.training, runtime.device)
    compiled = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
    data = torch.randint(0, 50304, (batch, 1025), device=runtime.device)
    micro = [{"input_ids": data[:, :-1], "labels": data[:, 1:]}]
    torch.cuda.reset_peak_memory_stats()
    with attention_backend(attention):
        started = time.perf_counter()
        for _ in range(warmup):
            train_step(compiled, micro, optimizer, runtime, grad_clip=1.0)
        torch.cuda.synchronize()
        compile_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(steps):
            loss, _ = train_step(compiled, micro, optimizer, runtime, grad_clip=1.0)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    tokens_per_second = steps * batch * 1024 / seconds
    mfu = tokens_per_second * model.flops_per_token() / PEAK_FLOPS
    peak = torch.cuda.max_memory_allocated() / 2**30
    del compiled, model, optimizer
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return (
        f"{style:5s} batch {batch:3d} attention {attention:6s} compile {compile_mode:8s} "
        f"loss {'fp32' if fp32_loss else 'bf16'}{f' in chunks of {loss_chunk}' if loss_chunk else ''}"
        f"{' coordinate-descent' if torch._inductor.config.coordinate_descent_tuning else ''}: "
        f"{tokens_per_second:9,.0f} tokens/s, MFU {mfu:.1%}, peak memory {peak:.1f} GiB, "
        f"loss {loss.item():.2f}, warm-up+compile {compile_seconds:.0f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--styles", nargs="+", default=["gpt2", "llama"])
    parser.add_argument("--attention", nargs="+", default=["auto"])
    parser.add_argument("--compile-mode", nargs="+", default=["default"])
    parser.add_argument("--bf16-loss", action="store_true", help="cross-entropy on bf16 logits (no upcast)")
    parser.add_argument("--loss-chunk", type=int, default=0, help="model.loss_chunk_tokens")
    parser.add_argument(
        "--coordinate-descent",
        action="store_true",
        help="inductor's coordinate-descent tuning of its kernels",
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    if args.coordinate_descent:
        torch._inductor.config.coordinate_descent_tuning = True
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(__doc__.split("\n\n")[1].strip())
    for style in args.styles:
        for batch in args.batch:
            for attention in args.attention:
                for mode in args.compile_mode:
                    line = measure(
                        style,
                        batch,
                        attention,
                        args.steps,
                        args.warmup,
                        mode,
                        not args.bf16_loss,
                        args.loss_chunk,
                    )
                    print(line, flush=True)


if __name__ == "__main__":
    main()
