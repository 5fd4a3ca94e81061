"""The training loop: builds model, optimizer and loader, runs ``train_step``, validates, checkpoints, samples.

It only publishes events; progress bars, log files and metrics files are sinks subscribed to the bus. It
resumes exactly from a checkpoint, saves one and stops cleanly on SIGTERM/SIGINT, and recovers from failures
(train/recovery.py): a non-finite or spiking loss rolls back, out-of-memory halves the micro-batch.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llm_training import events
from llm_training.config import Config, config_from_dict
from llm_training.data.loader import BatchLoader, TokenDataset
from llm_training.data.prepare import read_manifest
from llm_training.data.tokenizer import Tokenizer, check_same_tokenizer
from llm_training.errors import ConfigError, UserError
from llm_training.events import EventBus
from llm_training.model import build_model
from llm_training.model.footprint import check_fits
from llm_training.model.generate import Sampling, generate_tokens
from llm_training.overrides import LIVE_KEYS, RUNTIME
from llm_training.train.autobatch import global_batch, resolve_batch
from llm_training.train.checkpoint import (
    CHECKPOINT_VERSION,
    find_resume,
    load_checkpoint,
    rng_state,
    set_rng_state,
    stale_temporaries,
)
from llm_training.train.checkpointer import Checkpointer, HostSnapshot
from llm_training.train.device import Runtime, memory_gb, peak_flops, resolve_runtime
from llm_training.train.distributed import (
    DistEnv,
    all_reduce,
    barrier,
    current_env,
    gather_objects,
    get_full_state,
    set_full_state,
    wrap_model,
)
from llm_training.train.optim import build_optimizer, lr_at, set_lr
from llm_training.train.preempt import PreemptionGuard
from llm_training.train.profiling import StepProfiler, anomaly_detection
from llm_training.train.recovery import ErrorRecovery, LossMonitor, TrainingAnomaly, is_out_of_memory
from llm_training.train.step import forward_loss, train_step

log = logging.getLogger("llm_training.train")
SINGLE = DistEnv()


@dataclass
class TrainResult:
    status: str
    steps: int
    tokens: int
    seconds: float
    final_checkpoint: Path
    train_loss: float
    first_val_loss: float | None
    val_loss: float
    val_perplexity: float
    val_bpb: float
    sample: str
    num_parameters: int
    device: str
    precision: str
    metrics: dict = field(default_factory=dict)
    interrupted_by: str | None = None  # the signal that stopped an interrupted run
    resumed_from: Path | None = None
    recoveries: int = 0  # rollbacks, batch reductions and retries during the run
    unsaved: dict = field(default_factory=dict)  # name -> why it was not saved (on_save_error=continue)
    notes: list[str] = field(default_factory=list)  # what the job did other than asked, and why
    timings: dict = field(default_factory=dict)  # where the time went: training, evaluation, saving, ...
    model: Any = field(default=None, repr=False)  # the trained torch module


@torch.no_grad()
def evaluate_loss(
    model,
    dataset: TokenDataset,
    runtime: Runtime,
    batch_size: int,
    max_batches: int = 0,
    env: DistEnv = SINGLE,
) -> dict:
    """Mean next-token loss over validation windows, with perplexity and bits per byte.

    Bits per byte = total NLL in nats / (UTF-8 bytes of the text those tokens encode x ln 2); the bytes of a
    subset of windows are its tokens times the split's bytes per token. With several processes each takes
    every world_size-th window of the same set and the sums are added up; every process runs the same number
    of forward passes (a sharded model needs all of them), padding with a window that counts for nothing.
    """
    was_training = model.training
    model.eval()
    n = dataset.num_windows
    if max_batches:
        n = min(n, max_batches * batch_size * env.world_size)
    mine = list(range(env.rank, n, env.world_size))
    batches = math.ceil(math.ceil(n / env.world_size) / batch_size)
    sums = torch.zeros(2, device=runtime.device, dtype=torch.float64)  # loss x tokens, tokens
    for b in range(batches):
        indices = mine[b * batch_size : (b + 1) * batch_size]
        loss, labels = forward_loss(model, dataset.batch(indices or [0]), runtime)
        if indices:
            counted = (labels != -100).sum()  # padding after a caption does not count
            sums[0] += loss.double() * counted
            sums[1] += counted
    model.train(was_training)
    all_reduce(sums, env)
    tokens = int(sums[1])
    mean = float(sums[0]) / tokens
    return {
        "val_loss": mean,
        "val_perplexity": math.exp(min(mean, 50.0)),
        "val_bpb": mean / math.log(2) / dataset.bytes_per_token,
        "val_tokens": tokens,
    }


def _caption_window(cfg: Config, image_size: int, window: int) -> int:
    """Caption tokens a window: what the context leaves after the image's prefix. The images' size is the
    prepared data's (recorded in the config, so the checkpoint rebuilds the same model)."""
    v = cfg.vision
    v.image_size = image_size
    if v.image_size % v.patch_size:
        raise ConfigError(
            f"the prepared images are {v.image_size} px, not a multiple of vision.patch_size ({v.patch_size})"
        )
    if v.pretrained:
        return window
    prefix = (v.image_size // v.patch_size) ** 2
    if prefix >= cfg.model.max_seq_length:
        raise ConfigError(
            f"an image is {prefix} prefix tokens ({v.image_size} px in {v.patch_size} px patches), which fills "
            f"model.max_seq_length ({cfg.model.max_seq_length}); raise it or vision.patch_size"
        )
    return min(window, cfg.model.max_seq_length - prefix)


def _resolve_vocab(cfg: Config, tokenizer: Tokenizer) -> None:
    if cfg.model.vocab_size is None:
        # round up to a multiple of 64: faster matrix products, unused rows never get a label
        cfg.model.vocab_size = 64 * math.ceil(tokenizer.vocab_size / 64)
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}); leave it unset to use the tokenizer's"
        )


def _split(micro: list[dict], parts: int) -> list[dict]:
    """Each micro-batch cut into ``parts`` smaller ones (the step weighs them by tokens: same gradient)."""
    if parts == 1:
        return micro
    out = []
    for batch in micro:
        rows = batch["input_ids"].shape[0]
        size = max(1, rows // parts)
        out += [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, rows, size)]
    return out


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
        self.cfg, self.bus, t = cfg, bus, cfg.training
        self.env = env = env or current_env()
        self.data_dir = Path(data_dir)
        self.out_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.profiler: StepProfiler | None = None  # logging.profile_steps
        self.runtime = runtime = resolve_runtime(cfg)
        torch.manual_seed(t.seed)
        self.tokenizer = Tokenizer.load(self.data_dir / "vocab.json")
        _resolve_vocab(cfg, self.tokenizer)
        window = t.seq_length or cfg.model.max_seq_length
        manifest = read_manifest(self.data_dir / "train.json")
        self.images = manifest.get("kind") == "image_text"
        if self.images:  # captions of images: the image's prefix tokens come first in the context
            from llm_training.multimodal.data import CaptionDataset

            window = _caption_window(cfg, int(manifest["image_size"]), window)
            self.train_set = CaptionDataset(self.data_dir / "train.json", window)
            self.val_set = CaptionDataset(self.data_dir / "validation.json", window)
        else:
            self.train_set = TokenDataset(self.data_dir / "train.json", window)
            self.val_set = TokenDataset(self.data_dir / "validation.json", window)
        if model is None:  # weights, gradients and optimizer state must fit where training runs
            shards = env.world_size if cfg.resources.strategy == "fsdp" else 1
            check_fits(cfg.model, runtime.device, training=True, shards=shards)
        self.model = (model if model is not None else build_model(cfg, self.images)).to(runtime.device)
        if env.enabled:  # the same initial weights everywhere, then a different dropout stream per process
            torch.manual_seed(t.seed + 1_000_003 * env.rank)
        self.micro_batch, self.accum = resolve_batch(
            self.model, t, runtime, self.train_set.seq_len, cfg.model.vocab_size
        )
        if env.enabled and not isinstance(t.batch_size, int):  # "auto": the size every process can hold
            smallest = all_reduce(torch.tensor([-self.micro_batch], device=runtime.device), env, "max")
            self.micro_batch = -int(smallest)
            self.accum = max(1, round(global_batch(t) / (self.micro_batch * env.world_size)))
        self.loader = BatchLoader(
            self.train_set, self.micro_batch, seed=t.seed, rank=env.rank, world_size=env.world_size
        )
        self.wrapped = wrap_model(self.model, cfg.resources.strategy, env, runtime.precision)
        self.optimizer = build_optimizer(self.model, t, runtime.device)  # after sharding: over the shards
        self.scaler = torch.amp.GradScaler("cuda") if runtime.precision == "fp16" else None
        self.fwd = torch.compile(self.wrapped) if runtime.compile else self.wrapped
        rc = cfg.recovery
        if recovery is None and rc.enabled:
            recovery = ErrorRecovery(
                self.ckpt_dir,
                rc.max_retries,
                rc.backup_freq or t.checkpoint_interval,
                bus,
                rc.backoff_seconds,
            )
        self.recovery = recovery
        if recovery is not None:
            recovery.event_bus = recovery.event_bus or bus
            recovery.rollback_target = self._rollback_target
        self.checkpointer = Checkpointer(
            self.ckpt_dir, cfg.checkpoint, runtime.device, bus, recovery, writer=env.is_main
        )
        self.monitor = LossMonitor(rc.loss_spike_factor if recovery is not None else 0.0)
        interval = t.checkpoint_interval
        if recovery is not None:
            interval = min(interval, recovery.backup_freq)
        self.save_interval = interval
        # counters, all part of a checkpoint
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self.first_val: float | None = None
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
        model_state, optim_state = get_full_state(self.model, self.optimizer)
        rngs = gather_objects(rng_state(), self.env)
        return {
            "model": model_state,
            "optimizer": optim_state,
            "world_size": self.env.world_size,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "scheduler": {"name": t.lr_schedule, "warmup_steps": t.warmup_steps, "progress": self.progress()},
            "step": self.step,
            "epoch": self.loader.epoch,
            "loader": self.loader.state_dict(),
            "micro_batch_split": self.split,
            "model_kind": "image_text" if self.images else "text",
            "rng": rngs[0],
            "rng_ranks": rngs,
            "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed(),
            "first_val_loss": self.first_val,
            "best_val_loss": self.best_val,
            "config": self.cfg.to_dict(),
            "tokenizer_json": self.tokenizer.to_str(),
            "tokenizer_path": str((self.data_dir / "vocab.json").resolve()),
            "metrics": self.metrics,
        }

    def restore(self, state: dict[str, Any], source: str, *, rollback: bool = False) -> None:
        saved = (state.get("config") or {}).get("training", {}).get("optimizer")
        if saved and saved != self.cfg.training.optimizer:
            raise UserError(
                f"{source}: saved with training.optimizer {saved!r}, this run uses "
                f"{self.cfg.training.optimizer!r}; resume with the same optimizer"
            )
        try:
            if state.get("checkpoint_version", CHECKPOINT_VERSION) >= 2:  # name-keyed, any process count
                set_full_state(self.model, self.optimizer, state["model"], state.get("optimizer"))
            else:
                self.model.load_state_dict(state["model"])
                if state.get("optimizer"):
                    self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(
                f"{source}: does not match this model ({str(exc).splitlines()[0][:200]})"
            ) from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(state["loader"])
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) == self.env.world_size:
            set_rng_state(ranks[self.env.rank])
        else:  # another number of processes: rank 0's generators, then a stream of each process's own
            set_rng_state(ranks[0])
            if self.env.enabled:
                torch.manual_seed(self.cfg.training.seed + 1_000_003 * self.env.rank + int(state["step"]))
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
        self.metrics = evaluate_loss(
            self.model, self.val_set, self.runtime, self.eval_batch, t.eval_batches * self.split, self.env
        )
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

    def _agree(self, done: bool, guard: PreemptionGuard) -> tuple[bool, str | None]:
        """Several processes stop together: a step limit is the same everywhere, but a time budget or a
        signal is seen at different moments, so they are compared (at log intervals, not every step)."""
        if self.step % self.cfg.training.log_interval and not (
            self.total_steps and self.step >= self.total_steps
        ):
            return False, None
        flags = torch.tensor([float(done), float(guard.requested is not None)], device=self.runtime.device)
        all_reduce(flags, self.env, "max")
        if flags[1] and guard.requested is None:
            guard.requested = "a signal to another process"
        return bool(flags[0]), guard.requested if flags[1] else None

    def _apply_runtime(self) -> None:
        """Runtime overrides (``ConfigurationAdaptor.update_config``) made since the last step: the keys that
        are safe between two steps take effect now. With several processes, rank 0's overrides are sent to
        every process at a log interval, so that all replicas change at the same step."""
        version, values = RUNTIME.snapshot()
        if self.env.enabled:
            if self.step % self.cfg.training.log_interval:
                return
            changed = torch.tensor([float(self.env.is_main and version != self.runtime_version)],
                                   device=self.runtime.device)  # fmt: skip
            if not all_reduce(changed, self.env, "max").item():
                return
            box = [values]
            torch.distributed.broadcast_object_list(box, src=0)
            values = box[0]
        elif version == self.runtime_version:
            return
        self.runtime_version = version
        for dotted, value in values.items():
            section, _, key = dotted.partition(".")
            holder = getattr(self.cfg, section, None)
            if dotted not in LIVE_KEYS:
                if dotted not in self.deferred:
                    self.deferred.add(dotted)
                    log.warning("%s changed at runtime: it applies to the next run, not this one", dotted)
            elif getattr(holder, key) != value:
                setattr(holder, key, value)
                log.info("runtime override %s=%s from step %d", dotted, value, self.step + 1)
                self.bus.publish("config_applied", key=dotted, value=value, step=self.step + 1)

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
                return train_step(
                    self.fwd,
                    _split(micro, self.split),
                    self.optimizer,
                    self.runtime,
                    grad_clip=t.grad_clip,
                    scaler=self.scaler,
                )
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                gc.collect()
                if self.runtime.device.type == "cuda":
                    torch.cuda.empty_cache()
                rows = self.micro_batch // self.split
                if self.recovery is None or rows < 2 or self.env.enabled:
                    raise UserError(
                        f"out of memory at {rows} sequence(s) of {self.train_set.seq_len} tokens per micro-batch; "
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
        flops_per_token, peak = self.model.flops_per_token(), peak_flops(runtime.device)
        tokens_per_step = self.micro_batch * self.accum * self.env.world_size * self.train_set.seq_len
        bus.publish(
            events.RUN_START,
            output_dir=str(self.out_dir),
            device=str(runtime.device),
            precision=runtime.precision,
            compile=runtime.compile,
            num_parameters=self.model.num_parameters(),
            train_tokens=self.train_set.num_tokens,
            val_tokens=self.val_set.num_tokens,
            tokens_per_step=tokens_per_step,
            world_size=self.env.world_size,
            strategy=cfg.resources.strategy if self.env.enabled else None,
            micro_batch=self.micro_batch,
            accumulation=self.accum,
            global_batch=self.micro_batch * self.accum * self.env.world_size,
            total_steps=self.total_steps,
            max_time=self.budget,
            start_step=self.step,
            resumed_from=str(self.resumed_from) if self.resumed_from else None,
            config=cfg.to_dict(),
        )
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
        last_log, last_log_step, loss_value, loss = time.perf_counter(), self.step, float("nan"), None
        self.checked: tuple[int, float] = (self.step, float("nan"))  # the step last checked, its loss
        stopped_by = None
        self.runtime_version = RUNTIME.snapshot()[0]  # the config above already has the overrides made so far
        self.deferred: set[str] = set()
        self.model.train()
        while True:
            try:
                done = (self.total_steps is not None and self.step >= self.total_steps) or (
                    self.budget is not None and self.elapsed() >= self.budget
                )
                stop = guard.requested
                if self.env.enabled:
                    done, stop = self._agree(done, guard)
                if stop or done:
                    if loss is not None:
                        loss_value = self._check(loss)
                    stopped_by = stop
                    break
                if self.skip is not None and self.step == self.skip[0]:
                    self.loader.load_state_dict(self.skip[1])
                    self.stream, self.skip = self._batches(), None
                micro = []
                for _ in range(self.accum):
                    batch = next(self.stream, None)
                    if batch is None:
                        break
                    micro.append(batch)
                if len(micro) < self.accum:
                    break
                self._apply_runtime()
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
                payload = {
                    "step": self.step,
                    "lr": lr,
                    "epoch": self.loader.epoch,
                    "progress": self.progress(),
                    "tokens": self.tokens_seen,
                }
                if self.step % t.log_interval == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    loss_value = self._check(loss)
                    speed = (self.step - last_log_step) * tokens_per_step / max(now - last_log, 1e-9)
                    payload.update(
                        loss=loss_value,
                        grad_norm=float(grad_norm),
                        tokens_per_second=speed,
                        memory_gb=round(memory_gb(runtime.device), 3),
                    )
                    if peak:
                        payload["mfu"] = speed * flops_per_token / peak
                    last_log, last_log_step = now, self.step
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
                last_log, last_log_step = time.perf_counter(), self.step

        if self.step == 0:
            raise UserError("no training step ran: the time budget or step limit is too small for one step")
        if stopped_by:
            return self._interrupted(stopped_by, loss_value)
        seconds = self.elapsed()  # training time: the final validation below is not part of the budget
        in_budget = dict(self.spent)
        self._keep_if_best(self._validate(final=True))
        self._save("model_final.pt", "final", val_loss=self.metrics["val_loss"], wait=True)
        final = self.ckpt_dir / "model_final.pt"
        if self.images:  # a caption of the first validation image
            image = self.val_set.batch([0])["images"].to(runtime.device)
            ids = (
                self.model.caption(image, self.tokenizer.eot_id, t.sample_tokens)[0]
                if t.sample_tokens
                else []
            )
            sample = self.tokenizer.decode(ids)
        else:
            sample = sample_text(
                self.model, self.tokenizer, runtime, t.sample_prompt, t.sample_tokens, t.sample_temperature,
                t.sample_top_k, t.seed,
            )  # fmt: skip
        bus.publish(events.SAMPLE, step=self.step, prompt=t.sample_prompt, text=sample)
        result = self._result("completed", seconds, final, loss_value, sample)
        # this process's part only: a resumed run's earlier time is in elapsed_before
        since, ran = time.perf_counter() - self.started, seconds - self.elapsed_before
        before_end, after = sum(in_budget.values()), sum(self.spent.values()) - sum(in_budget.values())
        result.timings = {
            "training": max(0.0, ran - before_end),
            **self.spent,
            "sample": max(0.0, since - ran - after),
            "loop": since,
        }
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
        m = self.metrics or {
            "val_loss": float("nan"),
            "val_perplexity": float("nan"),
            "val_bpb": float("nan"),
        }
        result = TrainResult(
            status=status,
            steps=self.step,
            tokens=self.tokens_seen,
            seconds=seconds,
            final_checkpoint=final,
            train_loss=loss_value,
            first_val_loss=self.first_val,
            val_loss=m["val_loss"],
            val_perplexity=m["val_perplexity"],
            val_bpb=m["val_bpb"],
            sample=sample,
            num_parameters=self.model.num_parameters(),
            device=str(self.runtime.device),
            precision=self.runtime.precision,
            metrics=m,
            resumed_from=self.resumed_from,
            recoveries=len(self.recovery.history) if self.recovery is not None else 0,
            unsaved=dict(self.checkpointer.unsaved),
        )
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
    resume = resume_from if resume_from is not None else cfg.checkpoint.resume
    path, state = None, None
    if isinstance(resume, dict):
        state = resume
    elif resume is not None:
        warn = lambda message: bus.publish(events.WARNING, message=message)  # noqa: E731
        path, state = find_resume(resume, Path(cfg.output_dir) / "checkpoints", warn)
        if state is None:
            log.info("resume auto: no valid checkpoint in %s, starting from the beginning", cfg.output_dir)
    vocab = Path(data_dir) / "vocab.json"
    if state is not None and state.get("tokenizer_json") and vocab.is_file():
        fix = "resume on the data that checkpoint was trained on"
        check_same_tokenizer(
            Tokenizer.from_json(state["tokenizer_json"]), vocab, f"{path or 'the checkpoint'}'s", fix
        )
    if state is not None:  # the architecture comes from the checkpoint: the model is built before restoring
        cfg.model = config_from_dict({"model": state["config"]["model"]}, str(path or "checkpoint")).model
    trainer = Trainer(cfg, data_dir, bus, model=model, recovery=recovery, env=env)
    return trainer.run(state, path, handle_signals=handle_signals)


def sample_text(
    model,
    tokenizer: Tokenizer,
    runtime: Runtime,
    prompt: str,
    max_tokens: int,
    temperature: float,
    top_k: int,
    seed: int,
) -> str:
    if max_tokens == 0:
        return ""
    eot = tokenizer.eot_id
    sampling = Sampling(max_tokens, temperature, top_k, seed=seed)
    if prompt:  # its continuation, to its end-of-text
        new = generate_tokens(
            model, [tokenizer.encode(prompt)], sampling, eos_id=eot, autocast=runtime.autocast
        )
        return prompt + tokenizer.decode(new[0])
    # after an empty prompt a model may end the document at once (a few percent of the time): generation
    # goes on past end-of-text, and the first document with text is shown rather than an empty sample
    new = generate_tokens(model, [[eot]], sampling, autocast=runtime.autocast)[0]
    documents = (
        tokenizer.decode(list(ids)) for is_eot, ids in itertools.groupby(new, eot.__eq__) if not is_eot
    )
    return next((text for text in documents if text.strip()), "")
