"""Protocol 5 (serving part) of ../shared/BENCHMARKS.md: a small model behind ``llm-serve`` on the CPU, 32
concurrent clients sending 2,000 ``/v1/completions`` requests in all; errors, throughput and p50/p99 latency,
with batching on and off.

    python bench/serve_load.py                    # trains a small model on Shakespeare first (about 20 s)
    python bench/serve_load.py --model exports/model.onnx --requests 500

Each request asks for 16 new tokens (greedy) after a short prompt taken from a list of play openings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' helpers: training on the corpora, waiting for a server
from conftest import wait_for_health  # noqa: E402

PROMPTS = ["ROMEO:\n", "Enter KING", "To be, or not", "JULIET:\nO ", "Exeunt.\n\nSCENE", "What say you", "My lord,",
           "First Citizen:\n"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_model(folder: Path) -> Path:
    from conftest import train_on_plays
    from llm_training.export.exporter import ExportOptions, export_checkpoint

    checkpoint, _, _ = train_on_plays(folder, 150)
    return (
        checkpoint
        if os.environ.get("BENCH_CHECKPOINT")
        else export_checkpoint(
            checkpoint, ExportOptions(format="onnx", output=folder / "model.onnx")
        ).export_path
    )


async def load(url: str, total: int, clients: int, new_tokens: int) -> dict:
    latencies: list[float] = []
    errors = generated = 0
    counter = iter(range(total))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors, generated
        for i in counter:
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": new_tokens, "temperature": 0}
            start = time.perf_counter()
            try:
                r = await http.post(url + "/v1/completions", json=body)
                ok = r.status_code == 200 and r.json()["choices"][0]["text"] is not None
                if ok:  # what was generated: a row that ends early (end of text) has fewer than new_tokens
                    generated += r.json()["usage"]["completion_tokens"]
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

    begin = time.perf_counter()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    seconds = time.perf_counter() - begin
    latencies.sort()
    return {"requests": total, "errors": errors, "seconds": round(seconds, 2),
            "requests_per_s": round(total / seconds, 1), "new_tokens_per_s": round(generated / seconds, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="Model to serve (default: train and export a small one).")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = Path(args.model) if args.model else small_model(Path(folder))
        print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.processor() or 'cpu'}, {os.cpu_count()} cores; model "
              f"{model.name}; {args.clients} concurrent clients, {args.requests} requests of {args.new_tokens} "
              "new tokens (greedy)", flush=True)  # fmt: skip
        for mode in (["--max-batch-size", "32"], ["--no-batching"]):
            port = free_port()
            server = subprocess.Popen([sys.executable, "-m", "llm_training.cli.serve", "--model", str(model),
                                       "--port", str(port), *mode], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            try:
                wait_for_health(url)
                result = asyncio.run(load(url, args.requests, args.clients, args.new_tokens))
                print(json.dumps({"batching": mode[0] != "--no-batching", **result}), flush=True)
            finally:
                server.terminate()
                server.wait(120)


if __name__ == "__main__":
    main()
