"""``MetricsCollector``: the usage guide's metrics component for custom training loops. It keeps every value
by training id and publishes each one as a ``metric`` event, which the TensorBoard and ``metrics.jsonl``
sinks record when attached to the same bus."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

from llm_training import events
from llm_training.errors import ConfigError


@dataclass
class MetricsCollectorInput:
    training_id: str
    step: int
    metrics: dict = field(default_factory=dict)  # name -> a number or a one-element tensor


@dataclass
class MetricsCollectorOutput:
    training_id: str
    step: int
    metrics: dict[str, float]  # the values as stored (tensors read as floats)


def _scalar(name: str, value: Any) -> float:
    if hasattr(value, "detach"):  # a tensor: one element, read without keeping its graph
        if value.numel() != 1:
            raise ConfigError(f"metric {name!r}: a tensor of {value.numel()} elements; give one number")
        value = value.detach().float().item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"metric {name!r}: {type(value).__name__} is not a number")
    return float(value)


class MetricsCollector:
    """``collect(MetricsCollectorInput(training_id=..., step=..., metrics={...}))``; ``history(id, name)``
    gives the (step, value) pairs, ``summary(id)`` the last, min, max and mean of each metric."""

    def __init__(self, event_bus=None) -> None:
        self.event_bus = event_bus
        self._values: dict[str, dict[str, list[tuple[int, float]]]] = {}
        self._lock = threading.Lock()

    def collect(self, spec: MetricsCollectorInput | None = None, **fields: Any) -> MetricsCollectorOutput:
        """Keep the values of one step (tensors read as floats) and publish each as a 'metric' event."""
        spec = spec or MetricsCollectorInput(**fields)
        values = {str(name): _scalar(str(name), value) for name, value in spec.metrics.items()}
        with self._lock:
            run = self._values.setdefault(spec.training_id, {})
            for name, value in values.items():
                run.setdefault(name, []).append((int(spec.step), value))
        if self.event_bus is not None:
            for name, value in values.items():
                self.event_bus.publish(
                    events.METRIC, name=name, value=value, step=int(spec.step), training_id=spec.training_id
                )
        return MetricsCollectorOutput(spec.training_id, int(spec.step), values)

    def history(self, training_id: str, name: str | None = None):
        """(step, value) pairs of one metric, or a dict of them by name."""
        with self._lock:
            run = {k: list(v) for k, v in self._values.get(training_id, {}).items()}
        if name is None:
            return run
        if name not in run:
            known = ", ".join(sorted(run)) or "none"
            raise ConfigError(f"no metric {name!r} collected for {training_id!r} (collected: {known})")
        return run[name]

    def summary(self, training_id: str) -> dict[str, dict[str, float]]:
        """Last, min, max, mean and count of every metric of a training id."""
        out = {}
        for name, points in self.history(training_id).items():
            values = [v for _, v in points if math.isfinite(v)]
            out[name] = {
                "last": points[-1][1],
                "min": min(values, default=math.nan),
                "max": max(values, default=math.nan),
                "mean": sum(values) / len(values) if values else math.nan,
                "count": len(points),
            }
        return out
