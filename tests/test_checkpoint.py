"""Checkpoints, exact resume, retention, preemption and error recovery (issue 5), with real processes,
real signals and real files; failures are injected at the file-writer and model level."""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_user_error, prepared_plays, run_cli, set_flags
from llm_training.config import load_config
from llm_training.errors import UserError
from llm_training.events import EventBus
from llm_training.model.transformer import Transformer
from llm_training.monitor.files import step_losses as read_step_losses
from llm_training.train import checkpoint as ckpt
from llm_training.train.checkpoint import load_checkpoint, save_checkpoint
from llm_training.train.loop import train
from llm_training.train.recovery import ErrorRecovery, RecoveryExhausted, TrainingAnomaly

TRAIN = ["-m", "llm_training.cli.train"]
STEPS = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_plays(tmp_path_factory.mktemp("ckdata"), 4)


# dropout on, so the RNG state matters for exactness; one step checkpoint every 3 steps
SETTINGS = {
    "model.num_layers": 2, "model.hidden_size": 32, "model.num_attention_heads": 4, "model.max_seq_length": 32,
    "model.dropout": 0.1, "model.vocab_size": 448, "training.batch_size": 4, "training.gradient_accumulation_steps": 2,
    "training.learning_rate": 3e-3, "training.warmup_steps": 2, "training.log_interval": 1,
    "training.eval_interval": 6, "training.eval_batches": 2, "training.checkpoint_interval": 3,
    "training.sample_tokens": 0, "training.max_steps": STEPS, "resources.device": "cpu",
    "resources.num_threads": 1, "logging.progress_bar": False, "checkpoint.keep_last": 100,
}  # fmt: skip


def config(out: Path, **extra):
    return load_config(cli={"output_dir": str(out), **SETTINGS, **extra}, environ={}, default_file=None)


def cli_args(data: Path, out: Path, **extra) -> list[str]:
    return [*TRAIN, "--data-dir", str(data), "--output-dir", str(out), *set_flags({**SETTINGS, **extra})]


def step_losses(out: Path) -> dict[int, float]:
    return read_step_losses(out / "metrics.jsonl")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("reference")
    proc = run_cli(cli_args(data, out), out)
    assert proc.returncode == 0, proc.stderr
    return out, step_losses(out), weights(out / "checkpoints" / "model_final.pt")


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 600) -> None:
    """Until the run has logged ``step`` (the deadline only guards a hang; a busy machine is slow)."""
    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.is_file() and any(s >= step for s in step_losses(out)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.stderr.read()}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached")


def popen(args: list[str], cwd: Path, preamble: str = "") -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if preamble:  # run the CLI in a process that first installs a fault in the checkpoint writer
        code = preamble + "\nimport sys, runpy; sys.argv = ['llm-train', *sys.argv[1:]]\n"
        code += "runpy.run_module('llm_training.cli.train', run_name='__main__')"
        args = ["-c", code, *args[2:]]
    return subprocess.Popen(
        [sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def resume_to_end(data: Path, out: Path) -> subprocess.CompletedProcess:
    proc = run_cli([*cli_args(data, out), "--resume", "auto"], out)
    assert proc.returncode == 0, proc.stderr
    return proc


# ----------------------------------------------------------------------------------------- the format


def test_checkpoint_holds_everything_and_a_checksum(tmp_path, reference):
    out = reference[0]
    state = load_checkpoint(out / "checkpoints" / "model_step_6.pt")
    for key in ("model", "optimizer", "scheduler", "step", "epoch", "loader", "rng", "config", "tokens_seen"):
        assert key in state, key
    assert state["step"] == 6 and state["loader"]["position"] > 0
    assert {"python", "numpy", "torch"} <= set(state["rng"])
    assert state["config"]["training"]["checkpoint_interval"] == 3
    assert state["tokenizer_json"] and state["tokenizer_path"].endswith("vocab.json")
    side = json.loads((out / "checkpoints" / "model_step_6.pt.json").read_text())
    assert side["step"] == 6 and side["val_loss"] > 0 and len(side["sha256"]) == 64
    assert side["bytes"] == (out / "checkpoints" / "model_step_6.pt").stat().st_size


def test_opening_a_checkpoint_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "model_step_1.pt"
    torch.save({"model": {}, "config": {}, "payload": Exploit()}, evil)
    with pytest.raises(UserError, match="model_step_1.pt: not a readable checkpoint"):
        load_checkpoint(evil)
    assert not marker.exists()


def test_corrupted_or_truncated_checkpoint_is_named_and_auto_resume_falls_back(tmp_path, data, reference):
    out = tmp_path / "run"
    proc = run_cli(cli_args(data, out), tmp_path)
    assert proc.returncode == 0, proc.stderr
    folder = out / "checkpoints"
    newest, corrupted = folder / "model_step_12.pt", folder / "model_step_9.pt"
    (folder / "model_final.pt").unlink()
    with open(newest, "r+b") as handle:  # truncated, as by a disk that filled after the save
        handle.truncate(newest.stat().st_size // 2)
    with pytest.raises(UserError, match=r"model_step_12\.pt: truncated or extended"):
        load_checkpoint(newest)
    flipped = bytearray(corrupted.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # one flipped byte
    corrupted.write_bytes(bytes(flipped))
    with pytest.raises(UserError, match=r"model_step_9\.pt: corrupted: its SHA-256 does not match"):
        load_checkpoint(corrupted)
    failed = run_cli(
        [*TRAIN, "--data-dir", str(data), "--output-dir", str(out), "--resume", str(newest)], tmp_path
    )
    assert_user_error(failed, "model_step_12.pt", "truncated")
    resumed = resume_to_end(data, out)  # skips 12 and 9, continues from 6
    log = (out / "logs" / "system.log").read_text()
    assert "skipping" in log and "model_step_6.pt at step 6" in log
    assert "12 steps" in resumed.stdout
    assert step_losses(out) == reference[1]  # the replayed steps 7 to 12 are exactly the uninterrupted run's
    assert_identical(weights(folder / "model_final.pt"), reference[2])


# ----------------------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("kill_at", [2, 7])
def test_sigkill_at_any_step_then_auto_resume_is_exact(tmp_path, data, reference, kill_at):
    out = tmp_path / "run"
    proc = popen(cli_args(data, out), tmp_path)
    wait_for_step(proc, out, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resume_to_end(data, out)
    assert step_losses(out) == reference[1]  # every step, including those replayed after the checkpoint
    assert_identical(weights(out / "checkpoints" / "model_final.pt"), reference[2])


KILL_DURING_SAVE = """
import os, signal
from llm_training.train import checkpoint
_open = checkpoint._open_tmp
class Killer:
    def __init__(self, handle): self.handle, self.written = handle, 0
    def __getattr__(self, name): return getattr(self.handle, name)
    def __enter__(self): return self
    def __exit__(self, *exc): return self.handle.__exit__(*exc)
    def write(self, data):
        self.written += len(data)
        if self.written > 20000:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.handle.write(data)
def open_tmp(path):
    handle = _open(path)
    return Killer(handle) if "model_step_9" in path.name else handle
checkpoint._open_tmp = open_tmp
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_valid(tmp_path, data, reference):
    out = tmp_path / "run"
    proc = popen(cli_args(data, out), tmp_path, preamble=KILL_DURING_SAVE)
    proc.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    folder = out / "checkpoints"
    assert not (folder / "model_step_9.pt").exists()
    assert [p.name for p in folder.glob(".model_step_9.pt.*.tmp-*")]  # the half-written temporary
    assert ckpt.latest_checkpoint(folder).name == "model_step_6.pt"
    resume_to_end(data, out)
    assert not list(folder.glob(".*.tmp-*"))  # cleaned on resume
    assert step_losses(out) == reference[1]
    assert_identical(weights(folder / "model_final.pt"), reference[2])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_saves_and_exits_zero_with_the_resume_command(tmp_path, data, reference, sig):
    out = tmp_path / "run"
    proc = popen(cli_args(data, out), tmp_path)
    wait_for_step(proc, out, 4)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert f"stopped by {sig.name} at step" in stdout and "Traceback" not in stderr
    step = int(stdout.split("at step ")[1].split(";")[0])
    assert (out / "checkpoints" / f"model_step_{step}.pt").is_file()
    command = stdout.split("resume with: ")[1].strip()
    assert command.startswith("llm-train ") and command.endswith("--resume auto")
    resumed = run_cli(["-m", "llm_training.cli.train", *shlex.split(command)[1:]], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert step_losses(out) == reference[1]
    assert_identical(weights(out / "checkpoints" / "model_final.pt"), reference[2])


def test_resume_through_the_python_api_and_orchestrator(tmp_path, data, reference):
    from llm_training import (
        DataLoader,
        DataLoaderInput,
        TrainingOrchestrator,
        TrainingOrchestratorInput,
    )

    bus = EventBus()
    loader = DataLoader(bus).create_loader(
        DataLoaderInput(dataset_path=str(data / "train.json"), batch_size=4)
    )
    settings = {k: v for k, v in SETTINGS.items() if not k.startswith("training.batch_size")}
    checkpoint = load_checkpoint(reference[0] / "checkpoints" / "model_step_6.pt")
    result = TrainingOrchestrator(bus).train(
        TrainingOrchestratorInput(training_config={"output_dir": str(tmp_path / "api"), **settings}),
        data_loader_output=loader,
        checkpoint=checkpoint,
    )
    assert result.status == "completed" and result.steps == STEPS
    assert_identical(weights(result.final_checkpoint), reference[2])
    assert {s: v for s, v in step_losses(tmp_path / "api").items()} == {
        s: v for s, v in reference[1].items() if s > 6
    }


# ----------------------------------------------------------------------------------------- disk and I/O


class FailingWriter:
    """A file that fails with ``error`` once ``limit`` bytes have been written."""

    def __init__(self, handle, error: int, limit: int = 5000) -> None:
        self.handle, self.error, self.limit, self.written = handle, error, limit, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def write(self, data):
        self.written += len(data)
        if self.written > self.limit:
            raise OSError(self.error, os.strerror(self.error))
        return self.handle.write(data)


def fail_saves(monkeypatch, name: str, error: int, times: int = 10**6) -> list:
    calls = []
    original = ckpt._open_tmp

    def open_tmp(path):
        handle = original(path)
        if name in path.name and len(calls) < times:
            calls.append(path)
            return FailingWriter(handle, error)
        return handle

    monkeypatch.setattr(ckpt, "_open_tmp", open_tmp)
    return calls


def test_disk_full_stops_cleanly_by_default(tmp_path, data, monkeypatch):
    fail_saves(monkeypatch, "model_step_6", errno.ENOSPC)
    with pytest.raises(
        UserError, match=r"could not save .*model_step_6\.pt: disk full; nothing half-written"
    ) as err:
        train(config(tmp_path), data, handle_signals=False)
    assert "model_step_3.pt" in str(err.value) and "\n" not in str(err.value)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "model_best.pt", "model_best.pt.json", "model_step_3.pt", "model_step_3.pt.json"
    ]  # fmt: skip
    assert load_checkpoint(folder / "model_step_3.pt")["step"] == 3


def test_disk_full_can_continue_without_that_checkpoint(tmp_path, data, monkeypatch):
    fail_saves(monkeypatch, "model_step_6", errno.ENOSPC)
    bus, errors = EventBus(), []
    bus.subscribe("error", errors.append)
    result = train(
        config(tmp_path, **{"checkpoint.on_save_error": "continue"}), data, bus, handle_signals=False
    )
    assert result.status == "completed" and result.steps == STEPS
    names = {p.name for p in (tmp_path / "checkpoints").glob("*.pt")}
    assert "model_step_6.pt" not in names and {"model_step_9.pt", "model_final.pt"} <= names
    assert len(errors) == 1 and "disk full" in errors[0].payload["error"]
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))


def test_transient_io_error_is_retried_with_backoff(tmp_path, data, monkeypatch):
    calls = fail_saves(monkeypatch, "model_step_6", errno.EIO, times=2)
    bus, recoveries = EventBus(), []
    bus.subscribe("recovery", recoveries.append)
    cfg = config(tmp_path, **{"recovery.backoff_seconds": 0.01})
    result = train(cfg, data, bus, handle_signals=False)
    assert result.status == "completed" and len(calls) == 2
    assert [e.payload["action"] for e in recoveries] == ["retry", "retry"]
    assert load_checkpoint(tmp_path / "checkpoints" / "model_step_6.pt")["step"] == 6


def test_background_save_writes_the_same_checkpoints(tmp_path, data, reference):
    result = train(config(tmp_path, **{"checkpoint.async_save": True}), data, handle_signals=False)
    assert result.status == "completed"
    for step in (3, 6, 9, 12):
        a = load_checkpoint(tmp_path / "checkpoints" / f"model_step_{step}.pt")
        b = load_checkpoint(reference[0] / "checkpoints" / f"model_step_{step}.pt")
        assert_identical(a["model"], b["model"])


# ----------------------------------------------------------------------------------------- recovery


def inject(bus: EventBus, model: Transformer, at_steps, how: str) -> None:
    """Corrupt the model after the given steps (each once: a replay after a rollback passes them again):
    NaN weights, or a huge output scale (a loss spike)."""
    pending = set(at_steps)

    def corrupt(event):
        if event.payload["step"] in pending:
            pending.discard(event.payload["step"])
            with torch.no_grad():
                if how == "nan":
                    model.blocks[0].mlp.down.weight.fill_(float("nan"))
                else:
                    model.lm_head.weight.mul_(60.0)

    bus.subscribe("step_end", corrupt)


def model_for(cfg) -> Transformer:
    torch.manual_seed(cfg.training.seed)
    return Transformer(cfg.model)


@pytest.mark.parametrize("how", ["nan", "spike"])
def test_bad_loss_rolls_back_skips_and_continues(tmp_path, data, how):
    cfg = config(tmp_path, **{"recovery.loss_spike_factor": 2.0})
    bus, recoveries = EventBus(), []
    bus.subscribe("recovery", recoveries.append)
    model = model_for(cfg)
    inject(bus, model, {7}, how)
    result = train(cfg, data, bus, model=model, handle_signals=False)
    assert result.status == "completed" and result.steps == STEPS and result.recoveries == 1
    event = recoveries[0].payload
    assert event["action"] == "rollback" and event["error_kind"] == how
    assert event["checkpoint"].endswith("model_step_6.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert result.val_loss < result.first_val_loss


def test_repeated_nans_stop_after_max_retries(tmp_path, data):
    cfg = config(tmp_path, **{"recovery.max_retries": 2})
    bus = EventBus()
    model = model_for(cfg)
    bus.subscribe("recovery", lambda e: inject(bus, model, {e.payload["step"] - 1}, "nan"))  # again and again
    inject(bus, model, {4}, "nan")
    with pytest.raises(RecoveryExhausted, match="gave up after 2 rollbacks") as err:
        train(cfg, data, bus, model=model, handle_signals=False)
    assert "\n" not in str(err.value) and "resume with --resume auto" in str(err.value)


def test_nan_without_recovery_is_a_clear_error(tmp_path, data):
    cfg = config(tmp_path, **{"recovery.enabled": False})
    bus = EventBus()
    model = model_for(cfg)
    inject(bus, model, {2}, "nan")
    with pytest.raises(UserError, match="training diverged: non-finite loss"):
        train(cfg, data, bus, model=model, handle_signals=False)


def test_nan_before_the_first_checkpoint_rolls_back_to_the_start(tmp_path, data):
    cfg = config(tmp_path)
    bus, recoveries = EventBus(), []
    bus.subscribe("recovery", recoveries.append)
    model = model_for(cfg)
    inject(bus, model, {1}, "nan")
    result = train(cfg, data, bus, model=model, handle_signals=False)
    assert result.status == "completed" and recoveries[0].payload["checkpoint"] is None


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_global_batch(tmp_path, data):
    cfg = config(tmp_path, **{"model.dropout": 0.0})  # dropout masks depend on the batch shape
    plain = train(
        config(tmp_path / "plain", **{"model.dropout": 0.0}), data, model=model_for(cfg), handle_signals=False
    )
    model = model_for(cfg)

    def limited_memory(module, args):
        if module.training and args[0].shape[0] > 1:  # only one sequence at a time fits in training
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model.register_forward_pre_hook(limited_memory)
    bus, recoveries = EventBus(), []
    bus.subscribe("recovery", recoveries.append)
    result = train(cfg, data, bus, model=model, handle_signals=False)
    assert [e.payload["action"] for e in recoveries] == ["reduce_batch", "reduce_batch"]  # 4 -> 2 -> 1
    assert result.steps == STEPS and result.tokens == plain.tokens
    for a, b in zip(
        weights(result.final_checkpoint).values(), weights(plain.final_checkpoint).values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-4)


def test_error_recovery_api(tmp_path):
    save_checkpoint(tmp_path / "model_step_5.pt", {"model": {}, "config": {}}, {"step": 5})
    bus, seen = EventBus(), []
    bus.subscribe("recovery", seen.append)
    recovery = ErrorRecovery(checkpoint_dir=tmp_path, max_retries=2, backup_freq=1000, event_bus=bus)
    action = recovery.recover_from_error(TrainingAnomaly("nan", 7, float("nan")))
    assert action.kind == "rollback" and action.checkpoint.name == "model_step_5.pt"
    waits = [recovery.recover_from_error(OSError(errno.EIO, "I/O error")).wait_seconds for _ in range(2)]
    assert waits == [1.0, 2.0]
    with pytest.raises(RecoveryExhausted, match="gave up after 2 I/O retries"):
        recovery.recover_from_error(OSError(errno.EIO, "I/O error"))
    assert recovery.recover_from_error(torch.cuda.OutOfMemoryError("out of memory")).kind == "reduce_batch"
    with pytest.raises(ValueError):  # a bug is not recovered from
        recovery.recover_from_error(ValueError("bad"))
    assert len(seen) == 5 and "recovery action(s)" in recovery.report()
    with pytest.raises(UserError, match="backup_freq"):
        ErrorRecovery(backup_freq=0)


# ----------------------------------------------------------------------------------------- retention


def test_retention_during_training_and_llm_cleanup(tmp_path, data):
    cfg = config(tmp_path, **{"checkpoint.keep_last": 1, "checkpoint.keep_best": 1, "training.max_steps": 18})
    train(cfg, data, handle_signals=False)
    folder = tmp_path / "checkpoints"
    kept = sorted(p.name for p in folder.glob("model_step_*.pt"))
    best = min(
        (json.loads(p.read_text()) for p in folder.glob("model_step_*.pt.json")),
        key=lambda r: r.get("val_loss", 9e9),
    )
    assert "model_step_18.pt" in kept and f"model_step_{best['step']}.pt" in kept and len(kept) <= 2
    # llm-cleanup on a folder kept whole during training
    other = tmp_path / "all"
    train(config(other, **{"training.max_steps": 18}), data, handle_signals=False)
    folder = other / "checkpoints"
    with open(folder / "model_step_18.pt", "r+b") as handle:
        handle.truncate(100)  # the newest is damaged: the newest valid one is 15
    before = sorted(p.name for p in folder.iterdir())
    dry = run_cli(["-m", "llm_training.cli.cleanup", "--checkpoint-dir", str(folder), "--keep-last", "0", "--dry-run"], tmp_path)  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert (
        "keep    model_step_15.pt  (newest valid checkpoint)" in dry.stdout and "would remove" in dry.stdout
    )
    assert sorted(p.name for p in folder.iterdir()) == before
    real = run_cli(
        ["-m", "llm_training.cli.cleanup", "--checkpoint-dir", str(folder), "--keep-best", "1"], tmp_path
    )
    assert real.returncode == 0, real.stderr
    left = sorted(p.name for p in folder.glob("*.pt"))
    assert "model_step_15.pt" in left and "model_best.pt" in left and "model_final.pt" in left
    assert "model_step_3.pt" not in left and not (folder / "model_step_3.pt.json").exists()
    missing = run_cli(
        ["-m", "llm_training.cli.cleanup", "--checkpoint-dir", str(tmp_path / "nope")], tmp_path
    )
    assert_user_error(missing, "no such folder")


def test_model_checkpointer_saves_finds_and_backs_up(tmp_path):
    from llm_training import ModelCheckpointer

    model = Transformer(load_config(cli={"model.vocab_size": 64}, environ={}, default_file=None).model)
    saver = ModelCheckpointer(EventBus(), checkpoint_dir=tmp_path / "ck")
    for step in (1, 2, 3):
        saver.save(model, step=step, val_loss=5.0 - step)
    assert saver.latest().name == "model_step_3.pt" and saver.load()["step"] == 3
    copy = saver.backup(saver.latest(), tmp_path / "backup")
    assert load_checkpoint(copy)["step"] == 3
    again = saver.backup(tmp_path / "ck" / "model_step_2.pt", tmp_path / "backup")  # beside it, its own
    assert load_checkpoint(again)["step"] == 2 and (tmp_path / "backup" / "model_step_2.pt.json").is_file()
    with pytest.raises(UserError, match="is the input"):  # never onto itself
        saver.backup(saver.latest(), tmp_path / "ck")
    before = copy.read_bytes()
    with pytest.raises(UserError, match="exists"):  # never over a file it did not write this time
        saver.backup(saver.latest(), tmp_path / "backup")
    assert copy.read_bytes() == before
    plan = saver.cleanup(keep_last=1)
    assert [e.path.name for e in plan.remove] == ["model_step_1.pt", "model_step_2.pt"]
