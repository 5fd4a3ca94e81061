"""The largest model (in parameters) that trains on this GPU at context 2,048, with and without activation
checkpointing: Llama-style shapes from large to small, micro-batch 1 and 8, bf16 autocast, the default optimizer
(Muon for hidden matrices, AdamW for the rest), eager (compilation of multi-billion models takes minutes).
A shape "trains" when three whole steps (forward, backward, optimizer) finish without running out of memory.

    python bench/largest_model.py
"""

from __future__ import annotations

import gc
import time

import torch

from llm_training.config import load_config
from llm_training.model.transformer import Transformer
from llm_training.train.device import resolve_runtime
from llm_training.train.optim import build_optimizer
from llm_training.train.step import train_step

SHAPES = [(36, 4096), (34, 4096), (44, 3584), (42, 3584), (40, 3584), (38, 3584), (36, 3584), (32, 3584),
          (36, 3072), (32, 3072), (28, 3072), (32, 2560), (24, 2560), (24, 2048)]  # fmt: skip


def attempt(layers: int, width: int, checkpointing: bool, batch: int) -> str | None:
    cfg = load_config(
        cli={"model.model_type": "llama", "model.num_layers": layers, "model.hidden_size": width,
             "model.num_attention_heads": width // 128, "model.vocab_size": 50304, "model.max_seq_length": 2048,
             "model.activation_checkpointing": checkpointing, "training.batch_size": 1},
        environ={}, default_file=None,
    )  # fmt: skip
    runtime = resolve_runtime(cfg)
    model = optimizer = None
    try:
        with torch.device(runtime.device):
            model = Transformer(cfg.model)
        optimizer = build_optimizer(model, cfg.training, runtime.device)
        data = torch.randint(0, 50304, (batch, 2049), device=runtime.device)
        micro = [{"input_ids": data[:, :-1], "labels": data[:, 1:]}]
        torch.cuda.reset_peak_memory_stats()
        train_step(model, micro, optimizer, runtime, grad_clip=1.0)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(2):
            train_step(model, micro, optimizer, runtime, grad_clip=1.0)
        torch.cuda.synchronize()
        step = (time.perf_counter() - started) / 2
        params = model.num_parameters()
        peak = torch.cuda.max_memory_allocated() / 2**30
        return f"{layers} layers x {width}: {params / 1e9:.2f}B parameters, peak {peak:.1f} GiB, {step:.2f} s/step"
    except torch.OutOfMemoryError:
        return None
    finally:
        del model, optimizer
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print(f"device: {torch.cuda.get_device_name()} ({total:.0f} GiB), torch {torch.__version__}")
    for batch, checkpointing in ((1, False), (1, True), (8, False), (8, True)):
        for layers, width in SHAPES:
            result = attempt(layers, width, checkpointing, batch)
            label = f"micro-batch {batch}, {'with' if checkpointing else 'without'}"
            if result:
                print(f"largest {label} activation checkpointing: {result}", flush=True)
                break
            print(f"  {label} activation checkpointing: {layers} x {width} ran out of memory", flush=True)


if __name__ == "__main__":
    main()
