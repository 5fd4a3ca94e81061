"""Checkpoints on one GPU: how long a save holds up training (synchronous vs background), and whether a run
killed with SIGKILL and resumed with ``--resume auto`` gives the same losses as an uninterrupted one.

    python bench/speedrun.py prepare          # once, on any machine: the data (.bench_data/speedrun)
    python bench/checkpoint_gpu.py [--steps 60]

Stall: the GPT-2 124M shape (bf16, fused AdamW, no compile), micro-batch 16 x 1,024 tokens, a checkpoint
every 100 steps (model + optimizer state: about 1.2 GB; longer apart than one write takes, else a save
waits for the one before); the loop's own timer around each save (the first background save also pins
its host buffers), and the wall time of the whole run against a run without checkpoints. Resume: a small Llama-style model trained
for 40 steps by the CLI; a second run is killed with SIGKILL after step 25 and resumed from its step-20
checkpoint; the per-step losses of both are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llm_training.monitor.files import step_losses

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".bench_data" / "speedrun"

GPT2_SMALL = {
    "model.model_type": "gpt2", "model.num_layers": 12, "model.hidden_size": 768, "model.num_attention_heads": 12,
    "model.max_seq_length": 1024, "model.vocab_size": 16384, "training.optimizer": "adamw",
    "training.batch_size": 16, "training.compile": False, "training.eval_at_start": False,
    "training.eval_interval": 10**6, "training.sample_tokens": 0, "training.log_interval": 10,
    "logging.progress_bar": False, "checkpoint.keep_last": 2, "checkpoint.keep_best": 0,
}  # fmt: skip


def stall(steps: int, mode: str | None, out: Path, interval: int = 100) -> dict:
    from llm_training.config import load_config
    from llm_training.events import EventBus
    from llm_training.train.loop import Trainer

    values = {**GPT2_SMALL, "output_dir": str(out), "training.max_steps": steps}
    if mode is None:
        values["training.checkpoint_interval"] = 10**6
    else:
        values["training.checkpoint_interval"] = interval
        values["checkpoint.async_save"] = mode == "background"
    cfg = load_config(cli=values, environ={}, default_file=None)
    trainer = Trainer(cfg, DATA, EventBus())
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = trainer.run(handle_signals=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    saves = [s for name, s in trainer.checkpointer.stall_seconds if name.startswith("model_step_")]
    size = sum(p.stat().st_size for p in (out / "checkpoints").glob("model_step_*.pt")) / max(
        1, len(list((out / "checkpoints").glob("model_step_*.pt")))
    )
    return {
        "mode": mode or "no checkpoints",
        "steps": result.steps,
        "wall_s": round(wall, 2),
        "saves": len(saves),
        "stall_median_s": round(statistics.median(saves), 3) if saves else None,
        "stall_each_s": [round(s, 3) for s in saves],
        "checkpoint_gb": round(size / 1e9, 2) if saves else None,
    }


SMALL = ["--set", "model.num_layers=4", "--set", "model.hidden_size=256", "--set", "model.num_attention_heads=4",
         "--set", "model.max_seq_length=256", "--set", "training.batch_size=16", "--set", "training.max_steps=40",
         "--set", "training.checkpoint_interval=20", "--set", "training.log_interval=1", "--set", "model.dropout=0.1",
         "--set", "training.eval_interval=20", "--set", "training.sample_tokens=0", "--set", "training.compile=false",
         "--set", "logging.progress_bar=false"]  # fmt: skip


def losses(out: Path) -> dict[int, float]:
    return step_losses(out / "metrics.jsonl")


def resume_check(root: Path) -> dict:
    base = [sys.executable, "-m", "llm_training.cli.train", "--data-dir", str(DATA), *SMALL]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*base, "--output-dir", str(root / "a")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*base, "--output-dir", str(root / "b")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    while not (root / "b" / "metrics.jsonl").is_file() or max(losses(root / "b"), default=0) < 25:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(root / "b"))
    subprocess.run([*base, "--output-dir", str(root / "b"), "--resume", "auto"], check=True, env=env, capture_output=True)  # fmt: skip
    a, b = losses(root / "a"), losses(root / "b")
    diffs = [abs(a[s] - b[s]) for s in a]
    return {
        "killed_after_step": killed_at,
        "steps_compared": len(diffs),
        "max_abs_loss_diff": max(diffs),
        "max_abs_loss_diff_after_resume": max(abs(a[s] - b[s]) for s in a if s > 20),
        "final_loss": [a[40], b[40]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument(
        "--interval", type=int, default=100, help="steps between checkpoints (longer than a write)"
    )
    args = parser.parse_args()
    if not (DATA / "train.json").is_file():
        sys.exit(f"{DATA}: no prepared data; run python bench/speedrun.py prepare first")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {torch.cuda.get_device_name()} torch {torch.__version__} "
          f"python {platform.python_version()}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for mode in (None, "synchronous", "background"):
            print(json.dumps(stall(args.steps, mode, Path(tmp) / str(mode), args.interval)), flush=True)
        print(json.dumps({"resume": resume_check(Path(tmp) / "resume")}), flush=True)


if __name__ == "__main__":
    main()
