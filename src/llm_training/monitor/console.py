"""A progress bar with loss, tokens/s and ETA, and one line per validation."""

from __future__ import annotations

import sys
import time

from llm_training import events
from llm_training.events import Event, EventBus, Sink

LOG_LINE_INTERVAL = 10.0  # seconds between progress lines when the stream is not a terminal


def is_tty(stream) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


class ConsoleSink(Sink):
    def __init__(self, bus: EventBus, enabled: bool = True, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.bar = None
        self.budget = None
        self.plain = False
        self.total, self.unit = 0, "step"
        self.started = self.last_line = 0.0
        self.first_progress: tuple[float, float] | None = None
        for topic, handler in (
            (events.RUN_START, self._start),
            (events.STEP_END, self._step),
            (events.EVAL_END, self._eval),
            (events.CHECKPOINT_SAVED, self._checkpoint),
            (events.RUN_END, self._end),
            (events.RECOVERY, self._recovery),
            (events.WARNING, self._warning),
        ):
            self.listen(bus, topic, handler)

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _start(self, event: Event) -> None:
        p = event.payload
        budget = f", time budget {p['max_time']:.0f}s" if p["max_time"] else ""
        world = p.get("world_size", 1)
        where = (
            f"{world} processes ({p.get('strategy')}, {p['device'].split(':')[0]})"
            if world > 1
            else p["device"]
        )
        self._write(
            f"training {p['num_parameters'] / 1e6:.2f}M parameters on {where} ({p['precision']}"
            f"{', compiled' if p['compile'] else ''}); {p['train_tokens']:,} training tokens, "
            f"{p['tokens_per_step']:,} tokens/step{budget}"
        )
        if "global_batch" in p:
            self._write(
                f"batch: {p['micro_batch']} sequences x {world} process(es) x {p['accumulation']} accumulation "
                f"step(s) = {p['global_batch']} sequences a step"
            )
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        self.budget = p["max_time"]
        # the bar counts optimizer steps; under a time budget the total is unknown (the budget ends the run,
        # not a step count), so the time left comes from how fast the run's progress moves through the budget
        self.total = None if self.budget else p["total_steps"]
        self.unit = "step"
        self.started = time.monotonic()
        self.first_progress = None  # (time, progress) of the first step seen: a resumed run starts part-way
        self.last_line = float("-inf")  # the first logged step prints at once
        if is_tty(self.stream):
            self.bar = tqdm(
                total=self.total,
                initial=p["start_step"],
                unit=self.unit,
                file=self.stream,
                dynamic_ncols=True,
                mininterval=0.5,
                desc="train",
            )
        else:  # a log file or pipe gets a plain line every LOG_LINE_INTERVAL seconds, not a redrawn bar
            self.plain = True

    def time_left(self, progress: float, now: float) -> float | None:
        """Seconds until the run ends, from the rate its progress (share of the budget or of the steps,
        whichever is further) has moved since the first step this sink saw."""
        if self.first_progress is None:
            self.first_progress = (now, progress)
            return None
        since, start = self.first_progress
        rate = (progress - start) / max(now - since, 1e-9)
        return max(0.0, (1.0 - progress) / rate) if rate > 0 else None

    def _step(self, event: Event) -> None:
        p = event.payload
        if not self.enabled or p.get("loss") is None and self.bar is None:
            return
        now = time.monotonic()
        left = self.time_left(p["progress"], now) if self.budget else None
        postfix = {"loss": f"{p['loss']:.3f}", "lr": f"{p['lr']:.2e}", "tok_s": f"{p['tokens_per_second']:,.0f}"} if p.get("loss") is not None else {}  # fmt: skip
        if postfix and p.get("mfu") is not None:
            postfix["mfu"] = f"{p['mfu']:.0%}"
        if left is not None:
            from tqdm import tqdm

            postfix["left"] = tqdm.format_interval(left)  # the time budget's ETA
        if self.bar is not None:
            self.bar.n = p["step"]
            self.bar.set_postfix(postfix) if postfix else self.bar.refresh()
            return
        if self.plain and postfix and now - self.last_line >= LOG_LINE_INTERVAL:
            from tqdm import tqdm

            self.last_line = now
            meter = tqdm.format_meter(
                p["step"], self.total, now - self.started, ncols=0, prefix="train", unit=self.unit,
                postfix=", ".join(f"{k}={v}" for k, v in postfix.items()),
            )  # fmt: skip
            print(meter, file=self.stream, flush=True)

    def _eval(self, event: Event) -> None:
        p = event.payload
        self._write(
            f"step {p['step']}: validation loss {p['val_loss']:.4f}, perplexity {p['val_perplexity']:.2f}, "
            f"{p['val_bpb']:.4f} bits/byte"
        )

    def _checkpoint(self, event: Event) -> None:
        self._write(f"saved {event.payload['path']}")

    def _recovery(self, event: Event) -> None:
        p = event.payload
        self._write(f"recovery ({p['action']}, attempt {p['attempt']}): {p['error']}; {p['message']}")

    def _warning(self, event: Event) -> None:
        self._write(f"warning: {event.payload['message']}")

    def close(self) -> None:
        super().close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _end(self, event: Event) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StageProgress:
    """Progress of data preparation: one bar per stage, counting text bytes (rate in MB/s); a callback for
    ``data.prepare.prepare(on_progress=...)``."""

    def __init__(self, enabled: bool = True, stream=None) -> None:
        self.enabled, self.stream, self.stage, self.bar = enabled, stream or sys.stderr, None, None

    def __call__(self, stage: str, done: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(desc=stage, unit="B", unit_scale=True, file=self.stream, mininterval=0.5)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CountProgress:
    """Progress of a counted job (prompts, items): a tqdm bar on a terminal; in a log file or pipe a plain
    line with rate and ETA every ``interval`` seconds and at the end, instead of a redrawn bar."""

    def __init__(
        self, total: int, initial: int = 0, unit: str = "it", desc: str = "", stream=None, interval=None
    ) -> None:
        from tqdm import tqdm

        self.stream = stream or sys.stderr
        self.total, self.n, self.initial, self.unit, self.desc = total, initial, initial, unit, desc
        self.interval = LOG_LINE_INTERVAL if interval is None else interval
        self.started = self.last_line = time.monotonic()
        self.bar = (
            tqdm(total=total, initial=initial, unit=unit, desc=desc, file=self.stream, dynamic_ncols=True)
            if is_tty(self.stream)
            else None
        )

    def update(self, count: int) -> None:
        self.n += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self._line(now)

    def _line(self, now: float) -> None:
        from tqdm import tqdm

        # the rate counts this run's items only (a resumed job starts at ``initial``)
        meter = tqdm.format_meter(self.n - self.initial, self.total - self.initial, now - self.started,
                                  ncols=0, prefix=self.desc, unit=self.unit)  # fmt: skip
        print(
            f"{meter} ({self.n}/{self.total} in all)" if self.initial else meter, file=self.stream, flush=True
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.n > self.initial:
            self._line(time.monotonic())
