"""The training loop: builds model, optimizer and loader, runs ``train_step``, validates, checkpoints, samples.

It only publishes events; progress bars, log files and metrics files are sinks subscribed to the bus.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llm_training import events
from llm_training.config import Config, config_from_dict
from llm_training.data.loader import BatchLoader, TokenDataset
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import ConfigError, UserError
from llm_training.events import EventBus
from llm_training.model.generate import generate
from llm_training.model.transformer import Transformer
from llm_training.train.autobatch import resolve_batch
from llm_training.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from llm_training.train.device import Runtime, memory_gb, peak_flops, resolve_runtime
from llm_training.train.optim import build_optimizer, lr_at, set_lr
from llm_training.train.step import train_step


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


@torch.no_grad()
def evaluate_loss(
    model, dataset: TokenDataset, runtime: Runtime, batch_size: int, max_batches: int = 0
) -> dict:
    """Mean next-token loss over validation windows, with perplexity and bits per byte.

    Bits per byte = total NLL in nats / (UTF-8 bytes of the text those tokens encode x ln 2); the bytes of a
    subset of windows are its tokens times the split's bytes per token.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=runtime.device, dtype=torch.float64)
    tokens = 0
    n = dataset.num_windows
    batches = math.ceil(n / batch_size)
    if max_batches:
        batches = min(batches, max_batches)
    for b in range(batches):
        batch = dataset.batch(range(b * batch_size, min(n, (b + 1) * batch_size)))
        labels = batch["labels"].to(runtime.device)
        with runtime.autocast():
            loss = model(batch["input_ids"].to(runtime.device), labels)
        loss_sum += loss.double() * labels.numel()
        tokens += labels.numel()
    model.train(was_training)
    mean = float(loss_sum) / tokens
    return {
        "val_loss": mean,
        "val_perplexity": math.exp(min(mean, 50.0)),
        "val_bpb": mean / math.log(2) / dataset.bytes_per_token,
        "val_tokens": tokens,
    }


def _resolve_vocab(cfg: Config, tokenizer: Tokenizer) -> None:
    if cfg.model.vocab_size is None:
        # round up to a multiple of 64: faster matrix products, unused rows never get a label
        cfg.model.vocab_size = 64 * math.ceil(tokenizer.vocab_size / 64)
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}); leave it unset to use the tokenizer's"
        )


def train(
    cfg: Config, data_dir: str | Path, bus: EventBus | None = None, resume_from: str | Path | None = None
) -> TrainResult:
    """Train on the prepared data in ``data_dir``; checkpoints go to ``<output_dir>/checkpoints``."""
    bus = bus or EventBus()
    data_dir = Path(data_dir)
    out_dir = Path(cfg.output_dir)
    ckpt_dir = out_dir / "checkpoints"
    t = cfg.training

    resume_state = load_checkpoint(resume_from) if resume_from else None
    if resume_state is not None:
        # a resumed run keeps the architecture it was trained with
        cfg.model = config_from_dict({"model": resume_state["config"]["model"]}, f"{resume_from}").model

    runtime = resolve_runtime(cfg)
    torch.manual_seed(t.seed)
    tokenizer = Tokenizer.load(data_dir / "vocab.json")
    _resolve_vocab(cfg, tokenizer)
    train_set = TokenDataset(data_dir / "train.json", cfg.model.max_seq_length)
    val_set = TokenDataset(data_dir / "validation.json", cfg.model.max_seq_length)
    model = Transformer(cfg.model).to(runtime.device)
    micro_batch, accum = resolve_batch(model, t, runtime, train_set.seq_len, cfg.model.vocab_size)
    loader = BatchLoader(train_set, micro_batch, seed=t.seed)
    optimizer = build_optimizer(model, t, runtime.device)
    scaler = torch.amp.GradScaler("cuda") if runtime.precision == "fp16" else None
    step, tokens_seen, elapsed_before, first_val = 0, 0, 0.0, None
    if resume_state is not None:
        try:
            model.load_state_dict(resume_state["model"])
            optimizer.load_state_dict(resume_state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(
                f"{resume_from}: does not match this model ({str(exc).splitlines()[0][:200]})"
            ) from None
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        loader.load_state_dict(resume_state["loader"])
        set_rng_state(resume_state["rng"])
        step, tokens_seen = int(resume_state["step"]), int(resume_state["tokens_seen"])
        elapsed_before, first_val = (
            float(resume_state.get("elapsed", 0.0)),
            resume_state.get("first_val_loss"),
        )
    fwd = torch.compile(model) if runtime.compile else model

    flops_per_token, peak = model.flops_per_token(), peak_flops(runtime.device)
    best_val = resume_state.get("best_val_loss") if resume_state else None
    steps_per_epoch = max(1, len(loader) // accum)
    budget = t.max_time_seconds
    epochs = t.epoch_limit
    total_steps = min(t.max_steps or 10**12, epochs * steps_per_epoch) if epochs else t.max_steps
    tokens_per_step = micro_batch * accum * train_set.seq_len

    bus.publish(
        events.RUN_START,
        output_dir=str(out_dir),
        device=str(runtime.device),
        precision=runtime.precision,
        compile=runtime.compile,
        num_parameters=model.num_parameters(),
        train_tokens=train_set.num_tokens,
        val_tokens=val_set.num_tokens,
        tokens_per_step=tokens_per_step,
        total_steps=total_steps,
        max_time=budget,
        start_step=step,
        config=cfg.to_dict(),
    )

    def batches():
        while epochs is None or loader.epoch < epochs:
            yield from loader

    stream = batches()
    start = time.perf_counter()
    last_log, last_log_step, loss_value, metrics = start, step, float("nan"), {}

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    def progress() -> float:
        by_steps = step / total_steps if total_steps else 0.0
        by_time = elapsed() / budget if budget else 0.0
        return max(by_steps, by_time)

    def checkpoint_state() -> dict:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "step": step,
            "epoch": loader.epoch,
            "loader": loader.state_dict(),
            "rng": rng_state(),
            "tokens_seen": tokens_seen,
            "elapsed": elapsed(),
            "first_val_loss": first_val,
            "best_val_loss": best_val,
            "config": cfg.to_dict(),
            "tokenizer_json": tokenizer.backend.to_str(),
            "tokenizer_path": str((data_dir / "vocab.json").resolve()),
            "metrics": metrics,
        }

    def keep_if_best(metrics: dict) -> None:
        """``checkpoints/model_best.pt``: the weights with the lowest validation loss seen so far."""
        nonlocal best_val
        if best_val is None or metrics["val_loss"] < best_val:
            best_val = metrics["val_loss"]
            path = save_checkpoint(ckpt_dir / "model_best.pt", checkpoint_state())
            bus.publish(events.CHECKPOINT_SAVED, step=step, path=str(path), best=True)

    if first_val is None and t.eval_at_start:
        metrics = evaluate_loss(model, val_set, runtime, micro_batch, t.eval_batches)
        first_val = metrics["val_loss"]
        bus.publish(events.EVAL_END, step=step, **metrics)

    model.train()
    while (total_steps is None or step < total_steps) and (budget is None or elapsed() < budget):
        micro = []
        for _ in range(accum):
            batch = next(stream, None)
            if batch is None:
                break
            micro.append(batch)
        if len(micro) < accum:
            break
        set_lr(optimizer, lr := lr_at(step, progress(), t), t.learning_rate)
        loss, grad_norm = train_step(fwd, micro, optimizer, runtime, grad_clip=t.grad_clip, scaler=scaler)
        step += 1
        tokens_seen += tokens_per_step
        logged = step % t.log_interval == 0 or step == total_steps
        payload = {
            "step": step,
            "lr": lr,
            "epoch": loader.epoch,
            "progress": progress(),
            "tokens": tokens_seen,
        }
        if logged:
            now = time.perf_counter()
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                raise UserError(
                    f"training diverged at step {step} (loss {loss_value}); lower training.learning_rate "
                    f"(now {t.learning_rate}) or check the data"
                )
            speed = (step - last_log_step) * tokens_per_step / max(now - last_log, 1e-9)
            payload.update(
                loss=loss_value,
                grad_norm=float(grad_norm),
                tokens_per_second=speed,
                memory_gb=round(memory_gb(runtime.device), 3),
            )
            if peak:
                payload["mfu"] = speed * flops_per_token / peak
            last_log, last_log_step = now, step
        bus.publish(events.STEP_END, **payload)
        if step % t.eval_interval == 0:
            metrics = evaluate_loss(model, val_set, runtime, micro_batch, t.eval_batches)
            bus.publish(events.EVAL_END, step=step, **metrics)
            keep_if_best(metrics)
        if step % t.checkpoint_interval == 0:
            path = save_checkpoint(ckpt_dir / f"model_step_{step}.pt", checkpoint_state())
            bus.publish(events.CHECKPOINT_SAVED, step=step, path=str(path))

    if step == 0:
        raise UserError("no training step ran: the time budget or step limit is too small for one step")
    if not math.isfinite(loss_value) or step != last_log_step:
        loss_value = float(loss)
    seconds = elapsed()  # training time: the final validation below is not part of the budget
    metrics = evaluate_loss(model, val_set, runtime, micro_batch, t.eval_batches)
    bus.publish(events.EVAL_END, step=step, final=True, **metrics)
    keep_if_best(metrics)
    final = save_checkpoint(ckpt_dir / "model_final.pt", checkpoint_state())
    bus.publish(events.CHECKPOINT_SAVED, step=step, path=str(final), final=True)

    sample = sample_text(
        model,
        tokenizer,
        runtime,
        t.sample_prompt,
        t.sample_tokens,
        t.sample_temperature,
        t.sample_top_k,
        t.seed,
    )
    bus.publish(events.SAMPLE, step=step, prompt=t.sample_prompt, text=sample)
    result = TrainResult(
        status="completed",
        steps=step,
        tokens=tokens_seen,
        seconds=seconds,
        final_checkpoint=final,
        train_loss=loss_value,
        first_val_loss=first_val,
        val_loss=metrics["val_loss"],
        val_perplexity=metrics["val_perplexity"],
        val_bpb=metrics["val_bpb"],
        sample=sample,
        num_parameters=model.num_parameters(),
        device=str(runtime.device),
        precision=runtime.precision,
        metrics=metrics,
    )
    bus.publish(events.RUN_END, **{k: v for k, v in result.__dict__.items() if k not in ("metrics",)})
    return result


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
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    ids = ids[-model.cfg.max_seq_length :]
    generator = torch.Generator(device=runtime.device).manual_seed(seed)
    with runtime.autocast():
        out = generate(
            model,
            torch.tensor([ids], device=runtime.device),
            max_tokens,
            temperature=temperature,
            top_k=top_k,
            eos_id=tokenizer.eot_id,
            generator=generator,
        )
    return prompt + tokenizer.decode(out[0, len(ids) :].tolist())
