"""The training loop: runs ``train_step`` over the objective's batches, validates, checkpoints, samples.

What is trained, and everything a run needs, is built in train/setup.py. The loop only publishes events;
progress bars, log files and metrics files are sinks subscribed to the bus. It resumes exactly from a
checkpoint, saves one and stops cleanly on SIGTERM/SIGINT, and recovers from failures (train/recovery.py):
a non-finite or spiking loss rolls back, out-of-memory halves the micro-batch.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from llm_training import events
from llm_training.config import Config
from llm_training.errors import UserError
from llm_training.events import EventBus
from llm_training.train.checkpoint import load_checkpoint, rng_state, stale_temporaries
from llm_training.train.checkpointer import HostSnapshot
from llm_training.train.device import Throughput
from llm_training.train.distributed import DistEnv, all_reduce, barrier, current_env, gather_objects
from llm_training.train.live import LiveOverrides
from llm_training.train.objectives import sample_text
from llm_training.train.optim import lr_at, set_lr
from llm_training.train.preempt import PreemptionGuard
from llm_training.train.profiling import StepProfiler, anomaly_detection
from llm_training.train.recovery import ErrorRecovery, TrainingAnomaly, is_out_of_memory
from llm_training.train.result import TrainResult, time_spent
from llm_training.train.resume import load_weights, resolve_resume, restore_rngs, weights_state
from llm_training.train.setup import build_run
from llm_training.train.step import split_batches, train_step
from llm_training.train.validation import evaluate_loss

# importable from here as before: the entry, its result, and what the loop reports and shows
__all__ = ["Trainer", "TrainResult", "evaluate_loss", "sample_text", "train"]
log = logging.getLogger("llm_training.train")


class Trainer:
    """One training run: set up in ``__init__``, ``run()`` to train. ``train()`` below is the usual entry."""

    def __init__(
        self,
        cfg: Config,
        data_dir: str | Path,
        bus: EventBus,
        *,
        model: torch.nn.Module | None = None,
        recovery: ErrorRecovery | None = None,
        env: DistEnv | None = None,
    ) -> None:
        self.cfg, self.bus = cfg, bus
        self.env = env = env or current_env()
        self.data_dir = Path(data_dir)
        self.out_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.profiler: StepProfiler | None = None  # logging.profile_steps
        run = build_run(cfg, self.data_dir, bus, env, model=model, recovery=recovery)
        self.runtime, self.tokenizer, self.objective = run.runtime, run.tokenizer, run.objective
        self.model, self.fwd, self.optimizer, self.scaler = run.model, run.fwd, run.optimizer, run.scaler
        self.micro_batch, self.accum, self.loader = run.micro_batch, run.accum, run.loader
        self.recovery, self.checkpointer, self.monitor = run.recovery, run.checkpointer, run.monitor
        self.save_interval = run.save_interval
        if self.recovery is not None:
            self.recovery.rollback_target = self._rollback_target
        # counters, all part of a checkpoint
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self.first_val: float | None = None  # validation losses: at the start, the best so far
        self.best_val: float | None = None
        self.split = 1  # micro-batches are cut into this many after an out-of-memory
        self.metrics: dict = {}
        self.spent = {"evaluation": 0.0, "saving": 0.0}  # seconds of this run, for the summary
        self.resumed_from: Path | None = None
        self.start_snapshot: dict | None = None  # the rollback point before the first checkpoint
        self.skip: tuple[int, dict] | None = None  # at step N, jump the loader past batches that failed

    # ------------------------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        t = self.cfg.training
        weights = weights_state(self.model, self.optimizer, self.scaler, self.env)
        rngs = gather_objects(rng_state(), self.env)
        return {
            **weights,
            "scheduler": {"name": t.lr_schedule, "warmup_steps": t.warmup_steps, "progress": self.progress()},
            "step": self.step, "epoch": self.loader.epoch, "loader": self.loader.state_dict(),
            "micro_batch_split": self.split, "model_kind": self.objective.model_kind, "rng": rngs[0],
            "rng_ranks": rngs, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed(),
            "first_val_loss": self.first_val, "best_val_loss": self.best_val, "config": self.cfg.to_dict(),
            "tokenizer_json": self.tokenizer.to_str(),
            "tokenizer_path": str((self.data_dir / "vocab.json").resolve()), "metrics": self.metrics,
        }  # fmt: skip

    def restore(self, state: dict[str, Any], source: str, *, rollback: bool = False) -> None:
        t = self.cfg.training
        load_weights(self.model, self.optimizer, self.scaler, state, source, t.optimizer)
        self.loader.load_state_dict(state["loader"])
        restore_rngs(state, self.env, t.seed)
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.split = max(self.split, int(state.get("micro_batch_split", 1)))
        self.first_val, self.best_val = state.get("first_val_loss"), state.get("best_val_loss")
        if not rollback:  # a rollback keeps the clock running: the time was spent
            self.elapsed_before = float(state.get("elapsed", 0.0))

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def progress(self) -> float:
        by_steps = self.step / self.total_steps if self.total_steps else 0.0
        by_time = self.elapsed() / self.budget if self.budget else 0.0
        return max(by_steps, by_time)

    @property
    def eval_batch(self) -> int:
        return max(1, self.micro_batch // self.split)

    def _batches(self):
        epochs = self.cfg.training.epoch_limit
        while epochs is None or self.loader.epoch < epochs:
            yield from self.loader

    # ------------------------------------------------------------------------------------ saving

    def _save(self, name: str, kind: str, *, val_loss: float | None = None, wait: bool = False) -> None:
        meta = {"kind": kind, "step": self.step, "epoch": self.loader.epoch, "tokens_seen": self.tokens_seen}
        if val_loss is not None:
            meta["val_loss"] = val_loss
        began = time.perf_counter()
        self.checkpointer.save(name, self.state(), meta, wait=wait)
        self.spent["saving"] += time.perf_counter() - began

    def _validate(self, **extra) -> dict:
        """Validation loss, perplexity and bits per byte now, kept as ``self.metrics`` and published."""
        t = self.cfg.training
        began = time.perf_counter()
        self.metrics = evaluate_loss(self.model, self.objective.val_set, self.runtime, self.eval_batch,
                                     t.eval_batches * self.split, self.env, self.objective)  # fmt: skip
        self.spent["evaluation"] += time.perf_counter() - began
        self.bus.publish(events.EVAL_END, step=self.step, **extra, **self.metrics)
        return self.metrics

    def _keep_if_best(self, metrics: dict) -> None:
        """``checkpoints/model_best.pt``: the weights with the lowest validation loss seen so far."""
        if self.best_val is None or metrics["val_loss"] < self.best_val:
            self.best_val = metrics["val_loss"]
            self._save("model_best.pt", "best", val_loss=metrics["val_loss"])

    def _rollback_target(self) -> Path | None:
        self.checkpointer.wait()
        return self.checkpointer.last_saved or self.resumed_from

    # ------------------------------------------------------------------------------------ checks

    def _check(self, loss: torch.Tensor) -> float:
        """A host sync: the loss as a float, or TrainingAnomaly when a step since the last check went bad.
        Once a step: a step that is logged, validated and saved is checked (and fed to the spike monitor)
        once."""
        if self.checked[0] == self.step:
            return self.checked[1]
        if self.env.enabled:  # every process decides on the same numbers
            both = torch.stack([loss.detach().float(), self.nonfinite.float()])
            all_reduce(both, self.env)
            loss, self.nonfinite = both[0] / self.env.world_size, both[1] > 0
        value = float(loss)
        if bool(self.nonfinite):
            raise TrainingAnomaly("nan", self.step, value if not math.isfinite(value) else float("nan"))
        anomaly = self.monitor.check(self.step, value)
        if anomaly is not None:
            raise anomaly
        self.good = (self.step, self.loader.state_dict())
        self.checked = (self.step, value)
        return value

    def _rollback(self, anomaly: TrainingAnomaly) -> None:
        if self.recovery is None:
            raise UserError(
                f"training diverged: {anomaly}; lower training.learning_rate (now "
                f"{self.cfg.training.learning_rate}) or check the data"
            ) from None
        action = self.recovery.recover_from_error(anomaly)
        after = self.loader.state_dict()  # past the batches that led to the bad loss
        good_step = self.good[0]
        barrier(self.env)  # rank 0 has finished writing the checkpoint the others are about to read
        if action.checkpoint is not None:
            state = load_checkpoint(action.checkpoint, map_location=self.runtime.device)
        else:
            state = self.start_snapshot
        self.restore(state, str(action.checkpoint or "the start of training"), rollback=True)
        self.nonfinite.zero_()
        self.skip = (good_step, after)
        self.stream = self._batches()
        self.awaiting_progress = True

    # ------------------------------------------------------------------------------------ one step

    def _run_step(self, micro: list[dict]):
        t = self.cfg.training
        while True:
            try:
                parts = split_batches(micro, self.split)
                return train_step(self.fwd, parts, self.optimizer, self.runtime, grad_clip=t.grad_clip,
                                  scaler=self.scaler, objective=self.objective, env=self.env)  # fmt: skip
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                gc.collect()
                if self.runtime.device.type == "cuda":
                    torch.cuda.empty_cache()
                rows, seq_len = self.micro_batch // self.split, self.objective.train_set.seq_len
                if self.recovery is None or rows < 2 or self.env.enabled:
                    raise UserError(
                        f"out of memory at {rows} sequence(s) of {seq_len} tokens per micro-batch; "
                        "lower training.batch_size (or use --batch-size auto), model.max_seq_length or the model "
                        "size, or set model.activation_checkpointing: true (with several processes the "
                        "micro-batch is not reduced automatically)"
                    ) from None
                self.recovery.recover_from_error(exc, self.step + 1)
                self.split *= 2

    # ------------------------------------------------------------------------------------ the run

    def run(
        self, resume: dict | None = None, resumed_from: Path | None = None, handle_signals: bool = True
    ) -> TrainResult:
        """Train, continuing from the checkpoint ``resume`` when given (loaded from ``resumed_from``)."""
        try:
            with PreemptionGuard(handle_signals) as guard, anomaly_detection(self.cfg.logging.debug):
                return self._run(resume, resumed_from, guard)
        finally:
            if self.profiler is not None:
                self.profiler.close()
            try:
                self.checkpointer.close()
            except Exception as exc:  # already failing: the first error is the one to report
                log.error("checkpoint writer: %s", exc)

    def _run(self, resume: dict | None, resumed_from: Path | None, guard: PreemptionGuard) -> TrainResult:
        cfg, t, bus, runtime = self.cfg, self.cfg.training, self.bus, self.runtime
        self.started = time.perf_counter()
        self.budget = t.max_time_seconds
        epochs = t.epoch_limit
        steps_per_epoch = max(1, len(self.loader) // self.accum)
        self.total_steps = min(t.max_steps or 10**12, epochs * steps_per_epoch) if epochs else t.max_steps
        if resume is not None:
            self.restore(resume, str(resumed_from or "the given checkpoint"))
            self.resumed_from = resumed_from
            log.info("resuming from %s at step %d", resumed_from or "the given checkpoint", self.step)
        for stale in stale_temporaries(self.ckpt_dir) if self.env.is_main else ():
            stale.unlink(missing_ok=True)
        if self.recovery is not None and self.resumed_from is None:
            self.start_snapshot = HostSnapshot()(self.state())
        env, batch = self.env, self.micro_batch * self.accum * self.env.world_size  # sequences a step
        tokens_per_step = batch * self.objective.train_set.seq_len
        bus.publish(events.RUN_START, output_dir=str(self.out_dir), device=str(runtime.device),
                    precision=runtime.precision, compile=runtime.compile,
                    num_parameters=self.model.num_parameters(),
                    train_tokens=self.objective.train_set.num_tokens,
                    val_tokens=self.objective.val_set.num_tokens, tokens_per_step=tokens_per_step,
                    world_size=env.world_size, strategy=cfg.resources.strategy if env.enabled else None,
                    micro_batch=self.micro_batch, accumulation=self.accum, global_batch=batch,
                    total_steps=self.total_steps, max_time=self.budget, start_step=self.step,
                    resumed_from=str(self.resumed_from) if self.resumed_from else None,
                    config=cfg.to_dict())  # fmt: skip
        self.started = time.perf_counter()
        if self.first_val is None and t.eval_at_start:
            self.first_val = self._validate()["val_loss"]

        self.stream = self._batches()
        if cfg.logging.profile_steps and self.env.is_main:
            self.profiler = StepProfiler(self.out_dir / cfg.logging.tensorboard_dir / "profile",
                                         cfg.logging.profile_steps, runtime.device)  # fmt: skip
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=runtime.device)
        self.good = (self.step, self.loader.state_dict())
        self.awaiting_progress = False
        meter = Throughput(self.model.flops_per_token(), runtime.device, tokens_per_step, self.step)
        loss_value, loss = float("nan"), None
        self.checked: tuple[int, float] = (self.step, float("nan"))  # the step last checked, its loss
        stopped_by = None
        live = LiveOverrides(cfg, bus, self.env, runtime.device)  # after the overrides made so far
        self.model.train()
        while True:
            try:
                done = (self.total_steps is not None and self.step >= self.total_steps) or (
                    self.budget is not None and self.elapsed() >= self.budget
                )
                stop = guard.requested
                if self.env.enabled:  # compared at log intervals only; a step limit is the same everywhere
                    last = self.total_steps and self.step >= self.total_steps
                    compare = self.step % t.log_interval == 0 or last
                    done, stop = guard.agree(done, self.env, runtime.device) if compare else (False, None)
                if stop or done:
                    if loss is not None:
                        loss_value = self._check(loss)
                    stopped_by = stop
                    break
                if self.skip is not None and self.step == self.skip[0]:
                    self.loader.load_state_dict(self.skip[1])
                    self.stream, self.skip = self._batches(), None
                micro = list(itertools.islice(self.stream, self.accum))
                if len(micro) < self.accum:
                    break
                live.apply(self.step)
                set_lr(self.optimizer, lr := lr_at(self.step, self.progress(), t), t.learning_rate)
                loss, grad_norm = self._run_step(micro)
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a distributed tensor
                    grad_norm = grad_norm.full_tensor()
                self.nonfinite |= ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
                self.step += 1
                if self.profiler is not None:
                    self.profiler.step()
                self.tokens_seen += tokens_per_step
                self.checkpointer.poll()
                payload = {"step": self.step, "lr": lr, "epoch": self.loader.epoch,
                           "progress": self.progress(), "tokens": self.tokens_seen}  # fmt: skip
                if self.step % t.log_interval == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    loss_value = self._check(loss)
                    payload.update(
                        loss=loss_value, grad_norm=float(grad_norm), **meter.reading(self.step, now)
                    )
                bus.publish(events.STEP_END, **payload)
                evaluated = None
                if self.step % t.eval_interval == 0:
                    loss_value = self._check(loss)  # never keep a diverged model
                    self._keep_if_best(self._validate())
                    evaluated = self.metrics["val_loss"]
                if self.step % self.save_interval == 0:
                    loss_value = self._check(loss)
                    self._save(f"model_step_{self.step}.pt", "step", val_loss=evaluated)
                    if self.awaiting_progress and self.recovery is not None:
                        self.recovery.succeeded("anomaly")
                        self.awaiting_progress = False
            except TrainingAnomaly as anomaly:
                self._rollback(anomaly)
                loss, self.checked = None, (self.step, float("nan"))
                meter.restart(self.step)

        if self.step == 0:
            raise UserError("no training step ran: the time budget or step limit is too small for one step")
        if stopped_by:
            return self._interrupted(stopped_by, loss_value)
        seconds = self.elapsed()  # training time: the final validation below is not part of the budget
        in_budget = dict(self.spent)
        self._keep_if_best(self._validate(final=True))
        self._save("model_final.pt", "final", val_loss=self.metrics["val_loss"], wait=True)
        final = self.ckpt_dir / "model_final.pt"
        sample = self.objective.sample(self.model, self.tokenizer, runtime, t)
        bus.publish(events.SAMPLE, step=self.step, prompt=t.sample_prompt, text=sample)
        result = self._result("completed", seconds, final, loss_value, sample)
        # this process's part only: a resumed run's earlier time is in elapsed_before
        ran, since = seconds - self.elapsed_before, time.perf_counter() - self.started
        result.timings = time_spent(self.spent, in_budget, ran, since)
        return result

    def _interrupted(self, signal_name: str, loss_value: float) -> TrainResult:
        seconds = self.elapsed()
        name = f"model_step_{self.step}.pt"
        if self.checkpointer.last_saved != self.ckpt_dir / name:
            self._save(name, "step", wait=True)
        self.checkpointer.wait()
        log.warning("stopped by %s at step %d; saved %s", signal_name, self.step, self.ckpt_dir / name)
        result = self._result("interrupted", seconds, self.ckpt_dir / name, loss_value, "")
        result.interrupted_by = signal_name
        return result

    def _result(
        self, status: str, seconds: float, final: Path, loss_value: float, sample: str
    ) -> TrainResult:
        m = self.metrics or dict.fromkeys(("val_loss", "val_perplexity", "val_bpb"), float("nan"))
        result = TrainResult(
            status=status, steps=self.step, tokens=self.tokens_seen, seconds=seconds, final_checkpoint=final,
            train_loss=loss_value, first_val_loss=self.first_val, val_loss=m["val_loss"],
            val_perplexity=m["val_perplexity"], val_bpb=m["val_bpb"], sample=sample,
            num_parameters=self.model.num_parameters(), device=str(self.runtime.device),
            precision=self.runtime.precision, metrics=m, resumed_from=self.resumed_from,
            recoveries=len(self.recovery.history) if self.recovery is not None else 0,
            unsaved=dict(self.checkpointer.unsaved),
        )  # fmt: skip
        result.model = self.model
        skip = ("metrics", "resumed_from", "model", "notes", "timings")
        self.bus.publish(events.RUN_END, **{k: v for k, v in result.__dict__.items() if k not in skip})
        return result


def train(
    cfg: Config,
    data_dir: str | Path,
    bus: EventBus | None = None,
    resume_from: str | Path | dict | None = None,
    *,
    model: torch.nn.Module | None = None,
    recovery: ErrorRecovery | None = None,
    handle_signals: bool = True,
    env: DistEnv | None = None,
) -> TrainResult:
    """Train on the prepared data in ``data_dir``; checkpoints go to ``<output_dir>/checkpoints``.

    ``resume_from``: a checkpoint path, "auto" (the newest valid one in that folder, if any) or a loaded
    checkpoint dict. A resumed run keeps the architecture it was trained with.
    """
    bus = bus or EventBus()
    path, state = resolve_resume(cfg, Path(data_dir), bus, resume_from)
    trainer = Trainer(cfg, data_dir, bus, model=model, recovery=recovery, env=env)
    return trainer.run(state, path, handle_signals=handle_signals)
