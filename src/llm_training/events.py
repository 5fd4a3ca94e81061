"""The event bus: the training loop publishes, sinks (console, log file, metrics file, ...) subscribe."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("llm_training.events")

# Topics published by the core. Sinks may subscribe to "*" to receive everything.
RUN_START = "run_start"
STEP_END = "step_end"
EVAL_END = "eval_end"
CHECKPOINT_SAVED = "checkpoint_saved"
RUN_END = "run_end"
SAMPLE = "sample"
DATA_PREPARED = "data_prepared"
ERROR = "error"
RECOVERY = "recovery"  # the loop rolled back, shrank the batch or retried (train/recovery.py)
WARNING = "warning"  # something the user must see (a damaged checkpoint skipped, a save that failed)
METRIC = "metric"  # a user's own scalar: publish(METRIC, name=..., value=..., step=...)


@dataclass
class Event:
    topic: str
    payload: dict[str, Any]
    time: float = field(default_factory=time.time)


Handler = Callable[[Event], None]


class EventBus:
    """Synchronous publish/subscribe. A failing handler is logged and never breaks the publisher."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = defaultdict(list)
        self._lock = threading.Lock()

    def subscribe(self, topic: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler`` for every event of ``topic`` ("*" for all); returns a function that unsubscribes."""
        with self._lock:
            self._handlers[topic].append(handler)

        def unsubscribe() -> None:
            with self._lock:
                if handler in self._handlers[topic]:
                    self._handlers[topic].remove(handler)

        return unsubscribe

    def publish(self, topic: str, **payload: Any) -> Event:
        """Call every handler of ``topic`` (and of '*') with an Event of ``payload``; returns the event."""
        event = Event(topic, payload)
        with self._lock:
            handlers = [*self._handlers.get(topic, ()), *self._handlers.get("*", ())]
        for handler in handlers:
            try:
                handler(event)
            except Exception:  # a broken sink must not stop training
                log.exception("event handler %r failed on %s", handler, topic)
        return event


class EventBusAdaptor(EventBus):
    """The usage guide's name for the event bus that every component takes (``ModelInitializer(event_bus)``,
    ...): ``subscribe(topic, handler)`` and ``publish(topic, **payload)`` as on ``EventBus``, plus
    ``history`` (the last ``keep`` events, for a script or a notebook to look at)."""

    def __init__(self, keep: int = 1000) -> None:
        super().__init__()
        self.history: deque[Event] = deque(maxlen=keep)
        self.subscribe("*", self.history.append)

    def events(self, topic: str | None = None) -> list[Event]:
        """The kept events, of one topic or all."""
        return [e for e in self.history if topic is None or e.topic == topic]


class Sink:
    """A subscriber of several topics that ``close()`` detaches (a bus may outlive a run)."""

    _unsubscribe: list[Callable[[], None]]

    def listen(self, bus: EventBus, topic: str, handler: Handler) -> None:
        if not hasattr(self, "_unsubscribe"):
            self._unsubscribe = []
        self._unsubscribe.append(bus.subscribe(topic, handler))

    def close(self) -> None:
        for stop in getattr(self, "_unsubscribe", ()):
            stop()
        self._unsubscribe = []
