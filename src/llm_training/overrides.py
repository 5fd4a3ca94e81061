"""Runtime overrides: the top level of the configuration hierarchy, set while a program runs
(``ConfigurationAdaptor.update_config``). Every config resolved afterwards in this process includes them, and
a training run that is already going applies the keys that are safe to change between two steps."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

log = logging.getLogger("llm_training.config")

# keys a running training applies at its next step (each is read afresh every step); others wait for the
# next run, since they shape the model, the data or the optimizer state
LIVE_KEYS = {
    "training.learning_rate", "training.min_lr_ratio", "training.lr_schedule", "training.warmup_steps",
    "training.grad_clip", "training.log_interval", "training.eval_interval", "training.sample_tokens",
    "training.sample_temperature", "training.sample_top_k", "training.sample_prompt",
}  # fmt: skip


class RuntimeOverrides:
    """Dotted key -> value, with a version that grows at every change and watchers called on changes."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self._watchers: dict[str, list[Callable[[Any], None]]] = defaultdict(list)
        self._lock = threading.Lock()
        self.version = 0

    def set(self, key: str, value: Any) -> None:
        with self._lock:
            changed = key not in self._values or self._values[key] != value
            self._values[key] = value
            self.version += 1
            watchers = list(self._watchers.get(key, ())) if changed else []
        for callback in watchers:  # outside the lock: a callback may read or set overrides
            try:
                callback(value)
            except Exception:  # a watcher's bug must not break the caller (often a training step)
                log.exception("config watcher %r failed on %s", callback, key)

    def snapshot(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            return self.version, dict(self._values)

    def watch(self, key: str, callback: Callable[[Any], None]) -> Callable[[], None]:
        with self._lock:
            self._watchers[key].append(callback)

        def unwatch() -> None:
            with self._lock:
                if callback in self._watchers.get(key, ()):
                    self._watchers[key].remove(callback)

        return unwatch

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._watchers.clear()
            self.version += 1


RUNTIME = RuntimeOverrides()
