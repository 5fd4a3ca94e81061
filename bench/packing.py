"""SFT training speed with sequence packing against padding, on short chat examples: lines of Shakespeare's
plays as user/assistant turns, ChatML in GPT-2's tokenizer, a Qwen2-like model (RoPE, grouped-query
attention, QKV bias, tied embeddings). Both modes run the same ``train_step`` over the same prepared split:

- padding: batches of ``--batch`` examples, each right-padded to its longest example rounded up to 64;
- packing: batches of windows of ``--window`` tokens filled with whole examples (``--windows`` a step;
  default: about as many examples a step as padding), attention kept inside each example (FlexAttention
  on CUDA, SDPA with a boolean mask elsewhere).

Reported per mode: steps/s, trained (assistant) tokens/s, example tokens/s (ids that are not padding),
total tokens/s (padding included) and peak memory on CUDA. On a CPU the modes take turns (``--rounds``), so
that other work on the machine slows both alike. Trained tokens/s is the one to compare: the
same data trains the same tokens either way. On CUDA it also checks FlexAttention's loss and gradients
against the SDPA mask (fp32) on one packed batch.

    python bench/packing.py --device cpu --out bench/results/packing_cpu.txt           # small, minutes
    python bench/packing.py --device cuda --hidden 896 --layers 24 --heads 14 --kv-heads 2 \\
        --intermediate 4864 --window 2048 --batch 64 --steps 30 --out bench/results/packing_gpu.txt
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from llm_training.config import Config, ModelConfig
from llm_training.data.chat import add_template_tokens
from llm_training.data.chat_prepare import ChatDataset, ChatPrepareOptions, PackedChatDataset, prepare_chat
from llm_training.data.chat_template import load_chat_template
from llm_training.data.loader import BatchLoader
from llm_training.data.tokenizer import Tokenizer
from llm_training.model.transformer import Transformer
from llm_training.train.device import resolve_runtime
from llm_training.train.step import train_step

SHARED = Path(__file__).resolve().parents[2] / "shared"


def chat_file(folder: Path, examples: int) -> Path:
    """``examples`` exchanges: each line of the plays (longer than 20 characters) answered by the next."""
    lines = []
    with gzip.open(SHARED / "corpora" / "shakespeare.jsonl.gz", "rt", encoding="utf-8") as handle:
        for record in map(json.loads, handle):
            lines += [x.strip() for x in record["text"].splitlines() if len(x.strip()) > 20]
            if len(lines) >= 2 * examples:
                break
    path = folder / "chat.jsonl"
    with open(path, "w", encoding="utf-8") as out:
        for user, reply in zip(lines[0 : 2 * examples : 2], lines[1 : 2 * examples : 2], strict=True):
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


def prepared(folder: Path, examples: int, window: int) -> tuple[Path, int]:
    tokenizer = Tokenizer.load(SHARED / "tokenizers" / "gpt2")
    template = load_chat_template("chatml")
    add_template_tokens(tokenizer, template)
    options = ChatPrepareOptions(max_length=window, validation_fraction=0.01)
    prepare_chat(chat_file(folder, examples), folder / "prepared", tokenizer, template, options)
    return folder / "prepared", tokenizer.vocab_size


def batches(loader: BatchLoader):
    while True:  # epoch after epoch
        yield from loader


class Mode:
    """One way of batching the split, with its own model (same initial weights) and optimizer."""

    def __init__(self, model_cfg: ModelConfig, dataset, batch: int, runtime) -> None:
        torch.manual_seed(0)
        self.model = Transformer(model_cfg).to(runtime.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.fwd = torch.compile(self.model) if runtime.compile else self.model
        self.stream = batches(BatchLoader(dataset, batch, seed=0))
        self.dataset, self.batch, self.runtime = dataset, batch, runtime
        self.seconds, self.steps, self.trained, self.examples, self.total = 0.0, 0, 0, 0, 0
        self.loss, self.peak = float("nan"), float("nan")

    def run(self, steps: int, timed: bool = True) -> None:
        cuda = self.runtime.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(steps):
            micro = next(self.stream)
            loss, _ = train_step(self.fwd, [micro], self.optimizer, self.runtime, grad_clip=1.0)
            if timed:
                ids = micro["input_ids"]
                self.trained += int((micro["labels"] != -100).sum())
                self.total += ids.numel()
                # ids that belong to an example (the pad id appears in no example of this data)
                own = micro["segment_ids"] >= 0 if "segment_ids" in micro else ids != self.dataset.pad_id
                self.examples += int(own.sum())
        if cuda:
            torch.cuda.synchronize()
        if timed:
            self.seconds += time.perf_counter() - started
            self.steps += steps
            self.loss = float(loss)

    def row(self) -> dict:
        s = self.seconds
        return {"steps/s": self.steps / s, "trained tok/s": self.trained / s, "example tok/s": self.examples / s,
                "total tok/s": self.total / s, "peak GiB": self.peak, "loss": self.loss,
                "steps/epoch": len(BatchLoader(self.dataset, self.batch, seed=0))}  # fmt: skip


def measure(model_cfg, plans: dict, runtime, steps: int, warmup: int, rounds: int) -> dict:
    """Rows of ``plans`` (name: (dataset, batch)). One round: each mode alone, in turn, with its peak memory
    on CUDA. Several: both modes built, then ``steps / rounds`` steps of each in turn, so that other work on
    a shared machine slows both alike."""
    rows = {}
    if rounds == 1:
        for name, (dataset, batch) in plans.items():
            mode = Mode(model_cfg, dataset, batch, runtime)
            mode.run(warmup, timed=False)
            if runtime.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            mode.run(steps)
            if runtime.device.type == "cuda":
                mode.peak = torch.cuda.max_memory_allocated() / 2**30
            rows[name] = mode.row()
            del mode
        return rows
    modes = {name: Mode(model_cfg, dataset, batch, runtime) for name, (dataset, batch) in plans.items()}
    for mode in modes.values():
        mode.run(warmup, timed=False)
    for _ in range(rounds):
        for mode in modes.values():
            mode.run(max(1, steps // rounds))
    return {name: mode.row() for name, mode in modes.items()}


def flex_check(model_cfg: ModelConfig, dataset, device) -> str:
    """FlexAttention against the SDPA mask on one packed batch, fp32: loss and gradient differences."""
    batch = {k: v.to(device) for k, v in dataset.batch(range(min(4, dataset.num_windows))).items()}
    results = []
    for backend in ("sdpa", "flex"):
        torch.manual_seed(0)
        model = Transformer(model_cfg).to(device)
        model.attention_backend = backend
        loss = model(**batch)
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    grad = max((results[0][1][n] - results[1][1][n]).abs().max().item() for n in results[0][1])
    return f"flex vs sdpa mask (fp32, one packed batch): loss diff {abs(results[0][0] - results[1][0]):.1e}, gradients max abs diff {grad:.1e}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--examples", type=int, default=3000, help="chat examples prepared")
    p.add_argument("--window", type=int, default=256, help="tokens a packed window (and the context)")
    p.add_argument("--batch", type=int, default=32, help="examples a padded batch")
    p.add_argument("--windows", type=int, help="windows a packed batch (default: about --batch examples)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, help="MLP width (default about 8/3 x hidden)")
    p.add_argument("--steps", type=int, default=10, help="timed steps a mode")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; 10 when compiling)")
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on CUDA)"
    )
    p.add_argument("--rounds", type=int, help="modes taken in turn this many times (default: 4 on a CPU, "
                   "whose machine may be shared; 1 on CUDA, which also gives each mode's peak memory)")  # fmt: skip
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args()

    cfg = Config()
    cfg.resources.device = args.device
    cfg.training.compile = "auto" if args.compile is None else args.compile
    runtime = resolve_runtime(cfg)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())  # other work on the machine slows both modes alike
    warmup = args.warmup if args.warmup is not None else (10 if runtime.compile else 3)
    with tempfile.TemporaryDirectory() as tmp:
        folder, vocab = prepared(Path(tmp), args.examples, args.window)
        padded = ChatDataset(folder / "train.json", args.window)
        packed = PackedChatDataset(folder / "train.json", args.window)
        per_window = packed.num_examples / packed.num_windows
        windows = args.windows or max(1, round(args.batch / per_window))
        model_cfg = ModelConfig(model_type="llama", num_layers=args.layers, hidden_size=args.hidden,
                                num_attention_heads=args.heads, num_kv_heads=args.kv_heads, qkv_bias=True,
                                intermediate_size=args.intermediate, vocab_size=64 * -(-vocab // 64),
                                max_seq_length=args.window, rope_theta=1e6)  # fmt: skip
        plans = {f"padding ({args.batch} examples)": (padded, args.batch),
                 f"packing ({windows} windows)": (packed, windows)}  # fmt: skip
        rounds = args.rounds or (1 if runtime.device.type == "cuda" else 4)
        rows = measure(model_cfg, plans, runtime, args.steps, warmup, rounds)
        parameters = sum(p.numel() for p in Transformer(model_cfg).parameters())
        check = flex_check(model_cfg, packed, runtime.device) if runtime.device.type == "cuda" else ""
        lengths = [len(padded.example(i)[0]) for i in range(padded.num_windows)]

    device = (
        torch.cuda.get_device_name(runtime.device)
        if runtime.device.type == "cuda"
        else platform.processor() or "cpu"
    )
    lines = [
        f"date: {datetime.date.today()}, {device} ({runtime.device.type}, {os.cpu_count()} cores), torch {torch.__version__}, "
        f"precision {runtime.precision}, compile {runtime.compile}, load average {load}",
        f"command: python bench/packing.py {' '.join(sys.argv[1:])}",
        f"model: Qwen2-like, {args.layers} layers, hidden {args.hidden}, {args.heads} heads ({args.kv_heads} kv), "
        f"vocab {model_cfg.vocab_size}: {parameters / 1e6:.1f}M parameters",
        f"data: {len(lengths):,} training examples of {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}); "
        f"{packed.describe()}; {warmup} warm-up and {args.steps} timed steps a mode, in {rounds} round(s)",
        "",
        f"{'mode':28s} {'steps/s':>8s} {'trained tok/s':>14s} {'example tok/s':>14s} {'total tok/s':>12s} "
        f"{'peak GiB':>9s} {'steps/epoch':>12s} {'last loss':>10s}",
    ]
    for name, r in rows.items():
        lines.append(f"{name:28s} {r['steps/s']:8.2f} {r['trained tok/s']:14,.0f} {r['example tok/s']:14,.0f} "
                     f"{r['total tok/s']:12,.0f} {r['peak GiB']:9.2f} {r['steps/epoch']:12,d} {r['loss']:10.3f}")  # fmt: skip
    pad_r, pack_r = rows.values()
    lines.append(
        f"packing / padding, trained tokens a second: {pack_r['trained tok/s'] / pad_r['trained tok/s']:.2f}x"
    )
    if check:
        lines.append(check)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
