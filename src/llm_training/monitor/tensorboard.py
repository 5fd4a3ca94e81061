"""TensorBoard event files under ``<output_dir>/runs/<run id>/`` (an event-bus sink): training loss, learning
rate, gradient norm, tokens/s, MFU and memory at each logged step; validation loss, perplexity and bits per
byte at each evaluation; the generated sample as text; recoveries as text. ``tensorboard --logdir runs``."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from llm_training import events
from llm_training.events import Event, EventBus, Sink

log = logging.getLogger("llm_training.tensorboard")

TRAIN = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
         "tokens_per_second": "train/tokens_per_second", "mfu": "train/mfu", "memory_gb": "train/memory_gb"}  # fmt: skip
VALIDATION = {
    "val_loss": "validation/loss",
    "val_perplexity": "validation/perplexity",
    "val_bpb": "validation/bits_per_byte",
}


def available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def fenced(text: str) -> str:
    """``text`` as a markdown code block, which TensorBoard's text tab shows as it is (line breaks, spaces,
    ``*`` and ``#`` kept); the fence is longer than any run of backticks inside."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{fence}\n{text}\n{fence}"


def sample_markdown(prompt: str, text: str) -> str:
    """The generated sample (which starts with its prompt) for TensorBoard, which renders text as markdown:
    the prompt and the continuation each in a code block; without a prompt, the text alone."""
    if not prompt or not text.startswith(prompt):  # no prompt, or an image's caption
        return fenced(text)
    return f"prompt:\n\n{fenced(prompt)}\n\ncontinuation:\n\n{fenced(text[len(prompt) :])}"


class TensorBoardSink(Sink):
    def __init__(self, bus: EventBus, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer = None  # made at the first event: a run that fails on its input leaves no files
        self.listen(bus, events.STEP_END, self._step)
        self.listen(bus, events.EVAL_END, self._eval)
        self.listen(bus, events.SAMPLE, self._sample)
        self.listen(bus, events.RECOVERY, self._recovery)
        self.listen(bus, events.RUN_END, self._end)
        self.listen(bus, events.METRIC, self._custom)

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir))
        return self._writer

    def _end(self, _event: Event) -> None:
        if self._writer is not None:  # a run that failed before its first metric leaves no file
            self._writer.flush()

    def _step(self, event: Event) -> None:
        p = event.payload
        if p.get("loss") is None:
            return  # steps between log intervals carry no metrics
        for key, tag in TRAIN.items():
            if isinstance(p.get(key), (int, float)):
                self.writer.add_scalar(tag, p[key], p["step"])

    def _eval(self, event: Event) -> None:
        p = event.payload
        for key, tag in VALIDATION.items():
            if isinstance(p.get(key), (int, float)):
                self.writer.add_scalar(tag, p[key], p["step"])
        self.writer.flush()

    def _sample(self, event: Event) -> None:
        p = event.payload
        self.writer.add_text(
            "sample", sample_markdown(p.get("prompt") or "", p.get("text") or ""), p.get("step", 0)
        )

    def _recovery(self, event: Event) -> None:
        p = event.payload
        self.writer.add_text("recovery", ", ".join(f"{k}={v}" for k, v in p.items()), p.get("step", 0))

    def _custom(self, event: Event) -> None:
        """``bus.publish("metric", name=..., value=..., step=...)``: a user's own scalar."""
        p = event.payload
        if isinstance(p.get("value"), (int, float)) and p.get("name"):
            self.writer.add_scalar(f"custom/{p['name']}", p["value"], p.get("step", 0))

    def close(self) -> None:
        super().close()
        if self._writer is not None:
            self._writer.close()
