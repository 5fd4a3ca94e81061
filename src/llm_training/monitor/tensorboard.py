"""TensorBoard event files under ``<output_dir>/runs/<run id>/`` (an event-bus sink): training loss, learning
rate, gradient norm, tokens/s, MFU and memory at each logged step; validation loss, perplexity and bits per
byte at each evaluation; the generated sample as text; recoveries as text. ``tensorboard --logdir runs``."""

from __future__ import annotations

import contextlib
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
    "val_reward_accuracy": "validation/reward_accuracy",  # preference tuning's
    "val_margin": "validation/reward_margin",
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
        self._failed = (
            False  # the event file could not be written (a full disk): the sink stops, training not
        )
        for topic, handler in ((events.STEP_END, self._step), (events.EVAL_END, self._eval),
                               (events.SAMPLE, self._sample), (events.RECOVERY, self._recovery),
                               (events.RUN_END, self._end), (events.METRIC, self._custom)):  # fmt: skip
            self.listen(bus, topic, self._guarded(handler))

    def _guarded(self, handler):
        def call(event: Event) -> None:
            if self._failed:
                return
            try:
                handler(event)
            except OSError as exc:  # the writer thread's error, raised again on the next write
                self._failed = True
                log.warning("TensorBoard: cannot write %s (%s); TensorBoard logging stops for this run, the "
                            "other logs go on", self.log_dir, exc.strerror or exc)  # fmt: skip

        return call

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_writer_thread()
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
            # an OSError here was said by _guarded, or the run's own error line says it (a full disk)
            with contextlib.suppress(OSError):
                self._writer.close()


def _quiet_writer_thread() -> None:
    """TensorBoard writes event files from a thread of its own, whose error (a full disk) Python would print
    as a traceback; the sink reports it in one line when the next write raises it again."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "llm_training", False):
        return

    def hook(args) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook.llm_training = True
    threading.excepthook = hook
