"""How long ``import llm_training`` takes, against a bare interpreter and against ``import torch`` (which it
does not do): the median of 15 fresh processes each. ``python bench/import_time.py > bench/results/import_time.txt``."""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time


def median_ms(code: str, runs: int = 15) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


if __name__ == "__main__":
    bare = median_ms("pass")
    ours = median_ms("import llm_training")
    names = median_ms("import llm_training; llm_training.__all__")
    torch = median_ms("import torch")
    check = "import sys, llm_training; print(sorted(m for m in ('torch', 'numpy', 'tokenizers', 'fastapi') if m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True
    ).stdout.strip()
    print(f"python {platform.python_version()} on {platform.machine()}, {platform.processor() or 'cpu'}")
    print(f"bare interpreter           {bare:7.1f} ms")
    print(f"import llm_training        {ours:7.1f} ms  (+{ours - bare:.1f} ms)")
    print(f"  and read __all__         {names:7.1f} ms")
    print(f"import torch, for scale    {torch:7.1f} ms")
    print(f"heavy modules loaded by 'import llm_training': {loaded}")
