"""``ConfigurationAdaptor``: read the resolved configuration, change it at runtime (the top level of the
hierarchy), and be told of changes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llm_training.config import SECTIONS, Config, ConfigError, _suggest, load_config
from llm_training.overrides import LIVE_KEYS, RUNTIME


class ConfigurationAdaptor:
    """``get_config(section, key)`` reads the configuration resolved from the defaults, ``config_file`` (else
    ``config/default.yaml``), the environment and the runtime overrides. ``update_config(section, key,
    value)`` checks the value and sets a runtime override: every config resolved afterwards in this process
    has it, and a training run in progress applies the keys that are safe between two steps (learning rate,
    schedule, clipping, intervals, sampling) at its next step. ``watch_config('training.learning_rate',
    callback)`` calls ``callback(new_value)`` after each change of that key."""

    def __init__(self, config_file: str | Path | None = None, event_bus=None) -> None:
        self.config_file = config_file
        self.event_bus = event_bus
        load_config(config_file)  # a broken file or environment is an error now, not at the first read

    def _key(self, section: str, key: str | None) -> str:
        if key is None and "." in section:
            section, key = section.split(".", 1)
        if section == "output_dir" and key is None:
            return "output_dir"
        if section not in SECTIONS:
            raise ConfigError(
                f"unknown config section '{section}'{_suggest(section, [*SECTIONS, 'output_dir'])}"
            )
        if key is None:
            return section
        names = [f.name for f in dataclasses.fields(getattr(Config(), section))]
        if key not in names:
            raise ConfigError(f"unknown config key '{section}.{key}'{_suggest(key, names, section)}")
        return f"{section}.{key}"

    def get_config(self, section: str, key: str | None = None) -> Any:
        """One value (``get_config('training', 'batch_size')`` or ``get_config('training.batch_size')``), or a
        whole section as a dictionary (``get_config('training')``)."""
        dotted = self._key(section, key)
        cfg = load_config(self.config_file)
        if "." not in dotted:
            value = getattr(cfg, dotted)
            return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        name, field = dotted.split(".")
        return getattr(getattr(cfg, name), field)

    def update_config(self, section: str, key: str, value: Any = None) -> Any:
        """Set a runtime override after checking it as the config file's values are checked; returns the
        value as stored (a "1e-4" string becomes 0.0001)."""
        dotted = self._key(section, key)
        if "." not in dotted:
            raise ConfigError(
                f"update_config needs a key of section '{dotted}', e.g. ('training', 'batch_size')"
            )
        name, field = dotted.split(".")
        merged = {**RUNTIME.snapshot()[1], dotted: value}
        cfg = load_config(self.config_file, overrides=merged, runtime=False)  # raises on a bad type or value
        stored = getattr(getattr(cfg, name), field)
        RUNTIME.set(dotted, stored)
        if self.event_bus is not None:
            self.event_bus.publish("config_updated", key=dotted, value=stored, live=dotted in LIVE_KEYS)
        return stored

    def watch_config(self, path: str, callback: Callable[[Any], None]) -> Callable[[], None]:
        """Call ``callback(new_value)`` whenever ``path`` ('section.key') changes; returns a function that
        stops watching."""
        if not callable(callback):
            raise ConfigError(
                "watch_config needs a callable, e.g. watch_config('training.learning_rate', print)"
            )
        dotted = self._key(path, None)
        return RUNTIME.watch(dotted, callback)

    def overrides(self) -> dict[str, Any]:
        """The runtime overrides in force."""
        return RUNTIME.snapshot()[1]

    def reset(self) -> None:
        """Drop every runtime override and watcher."""
        RUNTIME.clear()
