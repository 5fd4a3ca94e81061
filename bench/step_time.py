"""Where the time of a speedrun training step goes: the whole step (as the loop runs it: batches from host
memory) with ``torch.optim.Muon`` and with this project's ``BatchedMuon``, and each optimizer step alone.

    python bench/step_time.py [--config config/speedrun.yaml] [--steps 30]
"""

from __future__ import annotations

import argparse
import time

import torch

from llm_training.config import load_config
from llm_training.model.transformer import Transformer
from llm_training.train.device import resolve_runtime
from llm_training.train.optim import CombinedOptimizer, build_optimizer
from llm_training.train.step import train_step


def timed(fn, steps: int) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    for _ in range(3):
        fn()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - started) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="config/speedrun.yaml")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    cfg = load_config(cli={"model.vocab_size": 16384}, environ={}, config_file=args.config, default_file=None)
    runtime = resolve_runtime(cfg)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(runtime.device)
    compiled = torch.compile(model) if runtime.compile else model
    batch = cfg.training.batch_size
    rows = torch.randint(0, 16384, (batch, cfg.model.max_seq_length + 1))  # host memory, as the loader's
    micro = [{"input_ids": rows[:, :-1], "labels": rows[:, 1:]}]
    ours = build_optimizer(model, cfg.training, runtime.device)
    muon = ours.optimizers[0]
    theirs = CombinedOptimizer(
        [
            torch.optim.Muon(
                muon.param_groups[0]["params"],
                lr=cfg.training.learning_rate,
                weight_decay=cfg.training.weight_decay,
                momentum=0.95,
                adjust_lr_fn="match_rms_adamw",
            ),
            ours.optimizers[1],
        ]
    )
    print(f"{args.config}: {model.num_parameters() / 1e6:.1f}M parameters, batch {batch}, "
          f"{len(muon.param_groups[0]['params'])} Muon matrices")  # fmt: skip
    for opt in (theirs, ours):
        name = type(opt.optimizers[0]).__name__
        step_ms = timed(lambda opt=opt: train_step(compiled, micro, opt, runtime, grad_clip=1.0), args.steps)
        train_step(compiled, micro, opt, runtime, grad_clip=1.0)
        for p in model.parameters():  # keep gradients for the optimizer-alone timing
            p.grad = torch.randn_like(p) * 1e-3
        alone_ms = timed(opt.optimizers[0].step, args.steps)
        print(f"  {name:17s}: whole step {step_ms:6.1f} ms ({batch * cfg.model.max_seq_length / step_ms:,.0f} "
              f"tokens/ms), Muon step alone {alone_ms:6.1f} ms", flush=True)  # fmt: skip
        for p in model.parameters():
            p.grad = None


if __name__ == "__main__":
    main()
