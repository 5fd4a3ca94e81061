"""A progress bar with loss, tokens/s and ETA, and one line per validation."""

from __future__ import annotations

import sys

from llm_training import events
from llm_training.events import Event, EventBus


class ConsoleSink:
    def __init__(self, bus: EventBus, enabled: bool = True, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.bar = None
        self.budget = None
        for topic, handler in (
            (events.RUN_START, self._start),
            (events.STEP_END, self._step),
            (events.EVAL_END, self._eval),
            (events.CHECKPOINT_SAVED, self._checkpoint),
            (events.RUN_END, self._end),
        ):
            bus.subscribe(topic, handler)

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _start(self, event: Event) -> None:
        p = event.payload
        budget = f", time budget {p['max_time']:.0f}s" if p["max_time"] else ""
        self._write(
            f"training {p['num_parameters'] / 1e6:.2f}M parameters on {p['device']} ({p['precision']}"
            f"{', compiled' if p['compile'] else ''}); {p['train_tokens']:,} training tokens, "
            f"{p['tokens_per_step']:,} tokens/step{budget}"
        )
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        self.budget = p["max_time"]
        # with a time budget the bar counts seconds of the budget; otherwise optimizer steps
        total = round(self.budget) if self.budget else p["total_steps"]
        unit = "s" if self.budget else "step"
        self.bar = tqdm(
            total=total,
            initial=0 if self.budget else p["start_step"],
            unit=unit,
            file=self.stream,
            dynamic_ncols=True,
            mininterval=0.5,
            desc="train",
        )

    def _step(self, event: Event) -> None:
        p = event.payload
        if self.bar is None:
            return
        if self.budget:
            self.bar.n = min(self.bar.total, round(p["progress"] * self.budget))
            self.bar.refresh() if p.get("loss") is not None else None
        else:
            self.bar.update(1)
        if p.get("loss") is not None:
            self.bar.set_postfix(
                loss=f"{p['loss']:.3f}", lr=f"{p['lr']:.2e}", tok_s=f"{p['tokens_per_second']:,.0f}"
            )

    def _eval(self, event: Event) -> None:
        p = event.payload
        self._write(
            f"step {p['step']}: validation loss {p['val_loss']:.4f}, perplexity {p['val_perplexity']:.2f}, "
            f"{p['val_bpb']:.4f} bits/byte"
        )

    def _checkpoint(self, event: Event) -> None:
        self._write(f"saved {event.payload['path']}")

    def _end(self, event: Event) -> None:
        if self.bar is not None:
            if self.budget:
                self.bar.n = self.bar.total
            self.bar.close()
            self.bar = None
