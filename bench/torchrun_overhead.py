"""One GPU, plain ``llm-train`` against ``torchrun --nproc_per_node=1 -m llm_training.cli.train``: the cost of
running under the launcher (target: at most 3% fewer tokens/s).

    python bench/speedrun.py prepare     # once: the data (.bench_data/speedrun)
    python bench/torchrun_overhead.py [--rounds 2] [--steps 200]

GPT-2 124M shape on the speedrun data, bf16, torch.compile, micro-batch 16 x 1,024 tokens. Each run's
throughput is the median of its logged tokens/s after the first 50 steps (compilation excluded); rounds
alternate the two launches so drift in the machine hits both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".bench_data" / "speedrun"
SETTINGS = {
    "model.model_type": "gpt2", "model.num_layers": 12, "model.hidden_size": 768, "model.num_attention_heads": 12,
    "model.max_seq_length": 1024, "training.batch_size": 16, "training.optimizer": "adamw",
    "training.log_interval": 25, "training.eval_interval": 100000, "training.eval_at_start": False,
    "training.eval_batches": 4, "training.sample_tokens": 0, "training.checkpoint_interval": 100000,
    "logging.progress_bar": False,
}  # fmt: skip


def run(launcher: list[str], out: Path, steps: int) -> float:
    sets = [x for k, v in {**SETTINGS, "training.max_steps": steps}.items() for x in ("--set", f"{k}={v}")]
    cmd = [*launcher, "llm_training.cli.train", "--data-dir", str(DATA), "--output-dir", str(out), *sets]
    subprocess.run(cmd, check=True, capture_output=True)
    speeds = [
        r["tokens_per_second"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r["event"] == "step_end" and r["step"] > 50
    ]
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    import torch

    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {torch.cuda.get_device_name()} torch {torch.__version__}")
    launchers = {
        "plain": [sys.executable, "-m"],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m"],
    }
    results: dict[str, list[float]] = {name: [] for name in launchers}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, launcher in launchers.items():
                speed = run(launcher, Path(tmp) / f"{name}{round_}", args.steps)
                results[name].append(speed)
                print(
                    json.dumps({"launch": name, "round": round_, "tokens_per_second": round(speed)}),
                    flush=True,
                )
    plain, launched = statistics.median(results["plain"]), statistics.median(results["torchrun"])
    print(json.dumps({"plain_median": round(plain), "torchrun_median": round(launched),
                      "overhead_percent": round(100 * (plain - launched) / plain, 2)}))  # fmt: skip


if __name__ == "__main__":
    main()
