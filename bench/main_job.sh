#!/usr/bin/env bash
# Protocol 3, first part: `python -m llm_training.main` with no arguments, timed end to end (set-up
# excluded), in a fresh empty folder. Output: bench/results/main_job_cpu.txt (or the path given).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$repo/venv/bin/python}
out=${1:-$repo/bench/results/main_job_cpu.txt}
work=$(mktemp -d)
{
  echo "date: $(date -u '+%F %T UTC')"
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), torch $($py -c 'import torch; print(torch.__version__)')"
  echo "command: cd <empty folder> && python -m llm_training.main"
  start=$(date +%s.%N)
  (cd "$work" && $py -m llm_training.main 2>&1) || echo "FAILED: exit $?"
  end=$(date +%s.%N)
  echo "end to end: $(echo "$end - $start" | bc) s (process start to exit, data preparation and final sample included)"
} | tee "$out"
rm -rf "$work"
