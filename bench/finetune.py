"""Issue 21's fine-tuning benchmark: chat SFT tokens/s and peak memory, ours against Hugging Face ``Trainer`` +
peft on the same model shape, the same token ids, sequence length, batch and optimizer, in one call.

The model: a random Qwen2 of Qwen2.5-0.5B's shape (24 layers, width 896, 14 heads, 2 KV heads, MLP 4,864,
vocabulary 151,936, tied embeddings), saved by transformers with GPT-2's tokenizer and ChatML. The data:
conversations of consecutive Shakespeare lines, each longer than ``--length`` tokens and cut to it, so every
example is exactly ``--length`` tokens: no padding in either engine, and tokens/s = batch x length / step
time. Both read the ids and labels our preparation wrote (``prepared_chat``), so they train the same tokens.

Each method runs in its own process (peak memory is its own): ours through ``Trainer(...).finetune`` (its
defaults: bf16 autocast, torch.compile on CUDA, fused AdamW), the peer through ``transformers.Trainer``
(bf16, fused AdamW, SDPA attention, eager and with ``torch_compile=True``). Step times come from a sync at
every step (ours: the loss read at ``log_interval=1``; theirs: a callback), over the steps after ``--warmup``.

    python bench/finetune.py --device cuda --out bench/results/finetune_gpu.txt
    python bench/finetune.py --device cpu --tiny --steps 6 --warmup 2     # a smoke run of the script
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
QWEN_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
            "rope_theta": 1_000_000.0, "tie_word_embeddings": True}  # fmt: skip
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 50304, "max_position_embeddings": 1024, "tie_word_embeddings": True}  # fmt: skip
LORA = {"rank": 16, "alpha": 32, "dropout": 0.05}
PEFT_TARGETS = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]  # ours: qkv,proj,up,down


def make_model(folder: Path, shape: dict) -> None:
    import transformers

    from llm_training.data.chat_template import CHATML

    files = SHARED / "tokenizers" / "gpt2"
    vocab = json.loads((files / "encoder.json").read_text())
    merges = [
        tuple(x.split(" ")) for x in (files / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if x
    ]
    tok = transformers.GPT2TokenizerFast(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token, tok.chat_template = "<|im_end|>", CHATML
    transformers.set_seed(0)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape)).save_pretrained(folder)
    tok.save_pretrained(folder)


def make_chat(path: Path, examples: int, length: int) -> None:
    """Conversations of consecutive lines of the plays, each about 1.5x ``length`` tokens (at ~4 characters a
    token) so that preparation cuts every one to exactly ``length``."""
    with gzip.open(SHARED / "corpora" / "shakespeare.jsonl.gz", "rt") as handle:
        plays = [json.loads(x)["text"] for x in handle]
    lines = [x.strip() for text in plays for x in text.splitlines() if len(x.strip()) > 20]
    chars, at = length * 6, 0
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(examples):
            messages, size = [], 0
            while size < chars:
                line = lines[at % len(lines)]
                messages.append({"role": "user" if len(messages) % 2 == 0 else "assistant", "content": line})
                size, at = size + len(line), at + 1
            if messages[-1]["role"] == "user":
                messages.pop()
            out.write(json.dumps({"messages": messages}) + "\n")


def ours(args, lora: bool) -> dict:
    import torch

    from llm_training import Trainer
    from llm_training.events import STEP_END, EventBus

    bus, times = EventBus(), []
    bus.subscribe(STEP_END, lambda event: times.append(time.perf_counter()))
    extra = {f"finetune.lora_{k}": v for k, v in LORA.items()} if lora else {}
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = Trainer(output_dir=str(args.work / ("ours_lora" if lora else "ours_full")), event_bus=bus).finetune(
        model=str(args.work / "model"), data=str(args.work / "chat.jsonl"), max_length=args.length,
        lora_rank=LORA["rank"] if lora else 0, max_steps=args.steps, batch_size=args.batch,
        learning_rate=1e-4 if lora else 1e-5, log_interval=1, eval_interval=10**6, checkpoint_interval=10**6,
        sample_tokens=0, **{"resources.device": args.device, "logging.tensorboard": False}, **extra,
    )  # fmt: skip
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else 0
    return {"step_times": list(_diffs(times)), "peak": peak, "loss": result.train_loss}


def theirs(args, lora: bool, compiled: bool) -> dict:
    import numpy as np
    import torch
    import transformers

    prepared = next(p for p in (args.work / "ours_full" / "prepared_chat", args.work / "ours_lora" / "prepared_chat")
                    if p.is_dir())  # fmt: skip
    ids, labels = np.load(prepared / "train_ids.npy"), np.load(prepared / "train_labels.npy")
    offsets = np.load(prepared / "train_offsets.npy")

    class Examples(torch.utils.data.Dataset):
        def __len__(self):
            return len(offsets) - 1

        def __getitem__(self, i):
            a, b = int(offsets[i]), int(offsets[i + 1])
            x = torch.from_numpy(ids[a:b].astype(np.int64))
            return {"input_ids": x, "labels": torch.from_numpy(labels[a:b].astype(np.int64)),
                    "attention_mask": torch.ones_like(x)}  # fmt: skip

    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.work / "model", dtype=torch.float32, attn_implementation="sdpa"
    ).to(args.device)
    if lora:
        import peft

        config = peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=PEFT_TARGETS, task_type="CAUSAL_LM")  # fmt: skip
        model = peft.get_peft_model(model, config)
    times = []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    training = transformers.TrainingArguments(
        output_dir=str(args.work / "hf_out"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=1e-4 if lora else 1e-5, bf16=args.device == "cuda", optim="adamw_torch_fused",
        lr_scheduler_type="cosine", warmup_steps=10, weight_decay=0.0, logging_steps=10, save_strategy="no",
        report_to=[], torch_compile=compiled, dataloader_num_workers=0, use_cpu=args.device == "cpu",
        seed=0, disable_tqdm=True,
    )  # fmt: skip
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = transformers.Trainer(
        model=model, args=training, train_dataset=Examples(), callbacks=[Clock()]
    ).train()
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else 0
    return {"step_times": list(_diffs(times)), "peak": peak, "loss": out.training_loss}


def _diffs(times):
    return (b - a for a, b in zip(times, times[1:], strict=False))


RUNS = {  # name -> (function, keyword arguments)
    "ours full": (ours, {"lora": False}),
    "HF Trainer full": (theirs, {"lora": False, "compiled": False}),
    "HF Trainer full (torch_compile)": (theirs, {"lora": False, "compiled": True}),
    "ours LoRA r16": (ours, {"lora": True}),
    "HF Trainer + peft LoRA r16": (theirs, {"lora": True, "compiled": False}),
    "HF Trainer + peft LoRA r16 (torch_compile)": (theirs, {"lora": True, "compiled": True}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=15, help="steps left out of the timing (compilation)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model: checks the script, measures nothing")
    p.add_argument("--runs", nargs="*", default=list(RUNS))
    p.add_argument("--out", type=Path)
    p.add_argument(
        "--one", help=argparse.SUPPRESS
    )  # a child process: one run, its JSON on stdout's last line
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        fn, kwargs = RUNS[args.one]
        print(json.dumps(fn(args, **kwargs)))
        return
    with tempfile.TemporaryDirectory() as work:
        args.work = Path(work)
        make_model(args.work / "model", TINY if args.tiny else QWEN_05B)
        make_chat(args.work / "chat.jsonl", args.batch * (args.steps + 2) + 50, args.length)
        rows = []
        for name in sorted(
            args.runs, key=lambda n: not n.startswith("ours")
        ):  # ours first: it prepares the data
            cmd = [sys.executable, __file__, "--one", name, "--work", work, "--device", args.device,
                   "--batch", str(args.batch), "--length", str(args.length), "--steps", str(args.steps)]  # fmt: skip
            done = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
            if done.returncode != 0:
                print(
                    f"{name}: failed\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}",
                    file=sys.stderr,
                    flush=True,
                )
                rows.append((name, None))
                continue
            rows.append((name, json.loads(done.stdout.strip().splitlines()[-1])))
            print(table(args, rows[-1:]).splitlines()[3], flush=True)  # the row, as soon as it is measured
    report = table(args, rows)
    print(report)
    if args.out:
        args.out.write_text(report)


def table(args, rows) -> str:
    import torch

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    shape = "2-layer tiny Qwen2 (script check)" if args.tiny else "Qwen2.5-0.5B shape (494M parameters)"
    lines = [f"chat SFT, {shape}, batch {args.batch} x {args.length} tokens (no padding), {device}, "
             f"torch {torch.__version__}; median step over steps {args.warmup + 1}-{args.steps}", "",
             f"{'method':44} {'tokens/s':>10} {'step ms':>9} {'peak GiB':>9} {'loss':>7}"]  # fmt: skip
    speed = {}
    for name, r in rows:
        if r is None:
            lines.append(f"{name:44} failed")
            continue
        step = statistics.median(r["step_times"][args.warmup - 1 :] or r["step_times"])
        speed[name] = args.batch * args.length / step
        lines.append(
            f"{name:44} {speed[name]:10,.0f} {step * 1e3:9.1f} {r['peak'] / 2**30:9.2f} {r['loss']:7.3f}"
        )
    lines.append("")
    for ours_name, peers in (
        ("ours full", "HF Trainer full"),
        ("ours LoRA r16", "HF Trainer + peft LoRA r16"),
    ):
        best = max((speed[n] for n in speed if n.startswith(peers)), default=None)
        if ours_name in speed and best:
            lines.append(f"{ours_name}: {speed[ours_name] / best:.2f}x the faster HF Trainer variant")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
