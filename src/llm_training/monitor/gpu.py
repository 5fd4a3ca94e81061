"""GPU readings through NVIDIA's management library (``pynvml`` from the ``nvidia-ml-py`` package):
utilisation, memory, temperature and power per GPU, and the driver version."""

from __future__ import annotations

from dataclasses import dataclass


class NoGPU(Exception):
    """No NVIDIA GPU can be read here; the message says why."""


@dataclass
class GpuReading:
    index: int
    name: str
    utilization: float  # percent of the last sample period with a kernel running
    memory_used_gb: float
    memory_total_gb: float
    temperature_c: float
    power_w: float | None
    power_limit_w: float | None


def _nvml():
    try:
        import pynvml
    except ImportError:
        raise NoGPU("the NVIDIA management library is not installed (pip install nvidia-ml-py)") from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NoGPU(f"no NVIDIA driver answers ({exc})") from None
    return pynvml


def driver_version() -> str:
    nvml = _nvml()
    version = nvml.nvmlSystemGetDriverVersion()
    return version.decode() if isinstance(version, bytes) else version


def read_gpus() -> list[GpuReading]:
    nvml = _nvml()
    count = nvml.nvmlDeviceGetCount()
    if count == 0:
        raise NoGPU("the NVIDIA driver sees no GPU")
    out = []
    for i in range(count):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        name = nvml.nvmlDeviceGetName(h)
        memory = nvml.nvmlDeviceGetMemoryInfo(h)
        try:
            power, limit = (
                nvml.nvmlDeviceGetPowerUsage(h) / 1000,
                nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
            )
        except nvml.NVMLError:  # some boards do not report power
            power = limit = None
        out.append(GpuReading(i, name.decode() if isinstance(name, bytes) else name,
                              float(nvml.nvmlDeviceGetUtilizationRates(h).gpu), memory.used / 1e9, memory.total / 1e9,
                              float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)), power, limit))  # fmt: skip
    return out
