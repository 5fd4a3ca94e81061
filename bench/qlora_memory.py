"""Peak GPU memory and speed of LoRA against QLoRA fine-tuning (``llm-finetune --lora-rank 16`` and
``--qlora``) of a random model of Qwen2.5-0.5B's shape (transformers' Qwen2Config: hidden 896, intermediate
4864, 24 layers, 14 heads, 2 KV heads, vocabulary 151,936, tied embeddings), with GPT-2's tokenizer and ChatML's
tokens, on chat examples cut to 512 tokens, batch 4, for ``--steps`` steps. Each method runs in a fresh
process through the project's own job (``run_finetune``), on CUDA with its defaults (bf16 autocast,
torch.compile). Reported: peak allocated GPU memory of the whole run (``torch.cuda.max_memory_allocated``:
loading, quantizing, training, validation, the final checkpoint), tokens a second (the loop's readings after
the first, which includes compilation), and the bytes of the model's weights as trained (4-bit codes and their
scales for QLoRA's block layers).

    python bench/qlora_memory.py --out bench/results/qlora_memory.txt
    python bench/qlora_memory.py --tiny          # a smoke test on the CPU: a tiny model, a few steps

``--tokenizer`` is a folder with GPT-2's ``encoder.json`` and ``vocab.bpe`` (default ../shared/tokenizers/gpt2
beside the repository). Needs transformers, peft and bitsandbytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "llm_training" / "sample_data" / "python_reference.jsonl.gz"
QWEN25_05B = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
              "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
              "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}  # fmt: skip
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "tie_word_embeddings": True, "max_position_embeddings": 512}  # fmt: skip
METHODS = {"lora": ["finetune.lora_rank=16"], "qlora": ["finetune.qlora=true", "finetune.lora_rank=16"]}


def make_model(folder: Path, tokenizer_dir: Path, tiny: bool) -> None:
    """A random Qwen2 of the chosen shape with GPT-2's tokenizer plus ChatML's tokens and template."""
    import torch
    import transformers

    from llm_training.data.chat_template import CHATML

    vocab = json.loads((tokenizer_dir / "encoder.json").read_text())
    lines = (tokenizer_dir / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    tok = transformers.GPT2TokenizerFast(vocab=vocab, merges=[tuple(x.split(" ")) for x in lines if x])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token, tok.chat_template = "<|im_end|>", CHATML
    shape = {**TINY, "vocab_size": len(tok)} if tiny else QWEN25_05B
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape))
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)


def make_chat(path: Path, examples: int, chars: int) -> None:
    """``examples`` conversations whose replies are ``chars`` characters of the package's built-in sample
    (Python's reference manual): every example is longer than --max-length, so every batch is full."""
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as handle:
        text = "\n".join(json.loads(x)["text"] for x in handle)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(examples):
            part = text[(i * chars) % (len(text) - chars) :][:chars]
            messages = [{"role": "user", "content": "Explain this part of the manual."},
                        {"role": "assistant", "content": part}]  # fmt: skip
            out.write(json.dumps({"messages": messages}) + "\n")


def weight_bytes(model) -> dict:
    """Bytes of the model's weights as trained: parameters and buffers (4-bit codes as stored, uint8) plus
    the quantization state of 4-bit layers (absmax scales, their scales and code tables)."""
    import torch

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    scales = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None:
            for value in vars(state).values():
                if isinstance(value, torch.Tensor):
                    scales += value.numel() * value.element_size()
            state = getattr(state, "state2", None)
    packed = sum(p.numel() for p in model.parameters() if getattr(p, "quant_state", None) is not None)
    return {
        "weights_bytes": params + buffers + scales,
        "quant_scales_bytes": scales,
        "packed_4bit_bytes": packed,
    }


def child(method: str, folder: str, data: str, out_dir: str, args) -> dict:
    """One fine-tuning run in this process; its peak memory, speed and weight bytes."""
    import torch

    from llm_training.api.finetune import finetune_config, run_finetune
    from llm_training.cli.common import parse_sets

    device = "cpu" if args.tiny else "cuda"
    values = {"output_dir": out_dir, "finetune.max_length": args.seq_len, "finetune.lora_alpha": 32,
              "training.batch_size": args.batch, "training.max_steps": args.steps, "training.learning_rate": 2e-4,
              "training.log_interval": args.log_interval, "training.eval_interval": 10**6,
              "training.eval_batches": 1, "training.eval_at_start": False, "training.sample_tokens": 0,
              "training.compile": args.compile, "training.checkpoint_interval": 10**6, "resources.device": device,
              "logging.tensorboard": False, "data.validation_fraction": 0.05,
              **parse_sets(METHODS[method])}  # fmt: skip
    cfg = finetune_config(None, values)
    began = time.perf_counter()
    result = run_finetune(cfg, folder, data, console=False)
    seconds = time.perf_counter() - began
    rows = [json.loads(x) for x in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r][1:]  # the first: compiling
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"method": method, "device": str(result.device), "precision": result.precision, "steps": result.steps,
            "tokens_per_step": args.batch * args.seq_len, "train_loss": round(result.train_loss, 4),
            "tokens_per_second": round(sum(speeds) / len(speeds)) if speeds else None,
            "peak_gpu_memory_gib": round(peak / 2**30, 3) if peak is not None else None,
            "num_parameters": result.model.num_parameters(), **weight_bytes(result.model),
            "job_seconds": round(seconds, 1), "notes": result.notes}  # fmt: skip


def versions() -> str:
    import importlib.metadata as md

    import torch

    names = ["torch", "transformers", "peft", "bitsandbytes"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            found.append(f"{name} absent")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return f"{gpu}; python {platform.python_version()}; " + ", ".join(found)


def table(rows: list[dict]) -> list[str]:
    head = f"{'method':<7} {'peak GPU GiB':>12} {'tokens/s':>9} {'weights MiB':>11} {'4-bit codes MiB':>15} {'loss':>7}"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['method']:<7} failed: {r['error']}")
            continue
        peak = f"{r['peak_gpu_memory_gib']:.2f}" if r["peak_gpu_memory_gib"] is not None else "n/a (cpu)"
        lines.append(f"{r['method']:<7} {peak:>12} {r['tokens_per_second'] or 0:>9,} "
                     f"{r['weights_bytes'] / 2**20:>11,.1f} {r['packed_4bit_bytes'] / 2**20:>15,.1f} "
                     f"{r['train_loss']:>7.3f}")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="Also write the results here (a text file).")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--log-interval", type=int, default=5)
    parser.add_argument(
        "--compile", default="auto", help="training.compile: auto (on with CUDA), true, false."
    )
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "tokenizers" / "gpt2"))
    parser.add_argument("--tiny", action="store_true", help="A tiny model on the CPU: checks the script.")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny and "--steps" not in sys.argv:
        args.steps, args.batch, args.seq_len, args.log_interval = 4, 2, 64, 1
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args)), flush=True)
        return
    import torch

    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: this benchmark measures GPU memory (use --tiny for a CPU smoke test)")
    lines = [f"# python bench/qlora_memory.py {' '.join(sys.argv[1:])}   ({time.strftime('%Y-%m-%d')})",
             f"# {versions()}",
             f"# {'tiny Qwen2' if args.tiny else 'Qwen2.5-0.5B shape (random)'}; batch {args.batch} x "
             f"{args.seq_len} tokens, {args.steps} steps, LoRA rank 16 on qkv,proj,up,down"]  # fmt: skip
    print("\n".join(lines), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_model(tmp / "model", Path(args.tokenizer), args.tiny)
        make_chat(tmp / "chat.jsonl", int(args.steps * args.batch * 1.2) + 8, args.seq_len * 8)
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--child", method, str(tmp / "model"), str(tmp / "chat.jsonl"),
                   str(tmp / f"run_{method}"), "--steps", str(args.steps), "--batch", str(args.batch),
                   "--seq-len", str(args.seq_len), "--log-interval", str(args.log_interval),
                   "--compile", args.compile, *(["--tiny"] if args.tiny else [])]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not found:
                tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"method": method, "error": f"exit {proc.returncode}: {tail[:300]}"})
                print(proc.stderr[-4000:], file=sys.stderr)
            else:
                rows.append(json.loads(found[-1].removeprefix("RESULT ")))
            print(json.dumps(rows[-1]), flush=True)
    lines += table(rows) + [json.dumps(r) for r in rows]
    print("\n".join(table(rows)))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
