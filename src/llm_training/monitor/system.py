"""What ``llm-check-system`` reports: Python, PyTorch, CUDA and the driver, GPUs, CPU, RAM, disk, and the
installed versions of the required and optional packages, with warnings and errors."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import sys

REQUIRED = ("torch", "numpy", "tokenizers", "tiktoken", "pyyaml", "tqdm", "zstandard", "fsspec", "matplotlib")
OPTIONAL = {  # package -> what needs it
    "datasets": "Hugging Face datasets and parquet inputs (extra 'data')",
    "pyarrow": "parquet inputs (extra 'data')",
    "accelerate": "accelerate launch (extra 'distributed')",
    "transformers": "Hugging Face export and import (extra 'export')",
    "safetensors": "safetensors export (extra 'export')",
    "onnx": "ONNX export (extra 'export')",
    "onnxscript": "ONNX export (extra 'export')",
    "onnxruntime": "running ONNX exports (extra 'export')",
    "gguf": "GGUF export (extra 'export')",
    "fastapi": "llm-serve (extra 'serve')",
    "uvicorn": "llm-serve (extra 'serve')",
    "prometheus-client": "the server's /metrics (extra 'serve')",
    "tensorboard": "TensorBoard logging (extra 'monitor')",
    "nvidia-ml-py": "llm-monitor-gpu (extra 'monitor')",
    "psutil": "RAM figures (extra 'monitor')",
}
MIN_PYTHON = (3, 10)
MIN_DISK_GB = 5.0


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ram_gb() -> float:
    try:
        import psutil

        return psutil.virtual_memory().total / 1e9
    except ImportError:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def system_report(path: str = ".") -> dict:
    import torch

    from llm_training.monitor.gpu import NoGPU, driver_version, read_gpus

    warnings, errors = [], []
    python_ok = sys.version_info[:2] >= MIN_PYTHON
    if not python_ok:
        errors.append(f"Python {platform.python_version()} is older than {'.'.join(map(str, MIN_PYTHON))}")
    report = {"python": {"version": platform.python_version(), "ok": python_ok},
              "torch": {"version": torch.__version__, "cuda_available": torch.cuda.is_available(),
                        "cuda_version": torch.version.cuda, "cudnn": torch.backends.cudnn.version()
                        if torch.backends.cudnn.is_available() else None,
                        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())},
              "platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
              "ram_gb": round(_ram_gb(), 1)}  # fmt: skip
    try:
        report["driver"] = driver_version()
        report["gpus"] = [
            {"index": g.index, "name": g.name, "memory_gb": round(g.memory_total_gb, 1)} for g in read_gpus()
        ]
    except NoGPU as exc:
        report["driver"], report["gpus"] = None, []
        warnings.append(f"no NVIDIA GPU: {exc}; training runs on the CPU" +
                        (" (MPS is available)" if report["torch"]["mps_available"] else ""))  # fmt: skip
    if report["gpus"] and not torch.cuda.is_available():
        errors.append("a GPU is present but this PyTorch has no CUDA: install a CUDA build of torch")
    disk, where = shutil.disk_usage(path), os.path.abspath(path)
    free_gb = disk.free / 1e9
    report["disk"] = {"path": where, "free_gb": round(free_gb, 1), "total_gb": round(disk.total / 1e9, 1)}
    if free_gb < MIN_DISK_GB:
        warnings.append(f"only {free_gb:.1f} GB free on {where}: checkpoints need room")
    report["required"] = {p: _version(p) for p in REQUIRED}
    for package, version in report["required"].items():
        if version is None:
            errors.append(
                f"required package {package} is missing: pip install -e . (or pip install {package})"
            )
    report["optional"] = {p: _version(p) for p in OPTIONAL}
    for package, version in report["optional"].items():
        if version is None:
            warnings.append(f"optional {package} is not installed: needed for {OPTIONAL[package]}")
    report["warnings"], report["errors"] = warnings, errors
    return report
