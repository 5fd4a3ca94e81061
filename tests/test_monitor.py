"""Monitoring: TensorBoard event files read back with the ``tensorboard`` package's own reader; the GPU
monitor and the system check on this machine (no GPU here: the GPU paths run through the device tool)."""

from __future__ import annotations

import pytest

from conftest import TINY, prepared_plays, run_cli

TRAIN = ["-m", "llm_training.cli.train"]


def test_training_writes_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prepared = prepared_plays(tmp_path, 3)
    proc = run_cli([*TRAIN, "--data-dir", str(prepared), "--output-dir", "run", "--max-steps", "20", *TINY,
                    "--set", "training.log_interval=5", "--set", "training.eval_interval=10",
                    "--device", "cpu"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    runs = list((tmp_path / "run" / "runs").iterdir())
    assert len(runs) == 1  # one folder a run, named by its run id (as in logs/system.log)
    assert f"run={runs[0].name}" in (tmp_path / "run" / "logs" / "system.log").read_text()
    acc = EventAccumulator(str(runs[0]), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "train/memory_gb",
            "validation/loss", "validation/perplexity", "validation/bits_per_byte"} <= scalars  # fmt: skip
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [5, 10, 15, 20] and losses[-1].value < losses[0].value
    assert {10, 20} <= {e.step for e in acc.Scalars("validation/loss")}
    assert "sample/text_summary" in acc.Tags()["tensors"]


def test_tensorboard_sample_text_shows_as_written(tmp_path):
    """TensorBoard renders text as markdown: the sample is stored in code blocks (line breaks, ``*`` and
    backticks kept), with no bold markers around an empty prompt; read back with TensorBoard's reader."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from llm_training import events
    from llm_training.monitor.tensorboard import TensorBoardSink

    bus = events.EventBus()
    sink = TensorBoardSink(bus, tmp_path / "tb")
    text = "KING.\nWhat *ho*, my lord?\n\n  ```\nindented # line"
    bus.publish(events.SAMPLE, step=5, prompt="", text=text)
    bus.publish(events.SAMPLE, step=9, prompt="ROMEO.\n", text="ROMEO.\nGood night\nsweet")
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    stored = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("sample/text_summary")}
    assert stored[5] == "````\n" + text + "\n````"  # the fence outlasts the backticks in the text
    assert "**" not in stored[5]
    assert stored[9] == "prompt:\n\n```\nROMEO.\n\n```\n\ncontinuation:\n\n```\nGood night\nsweet\n```"


def test_gpu_monitor_without_a_gpu_says_so_and_exits_0(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_cli(["-m", "llm_training.cli.monitor_gpu", "--interval", "1", "--count", "1"], tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert proc.stdout.strip().count("\n") == 0 and "no NVIDIA GPU" in proc.stdout


def test_check_system_reports_this_machine(tmp_path):
    proc = run_cli(["-m", "llm_training.cli.check_system"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for needle in ("Python", "PyTorch", "CPU", "RAM", "disk", "tokenizers", "onnxruntime"):
        assert needle in out, needle
    assert "CUDA" in out
    proc = run_cli(["-m", "llm_training.cli.check_system", "--json"], tmp_path)
    import json

    report = json.loads(proc.stdout)
    assert report["python"]["ok"] and report["torch"]["version"] and report["ram_gb"] > 1


def test_llm_logs_lists_runs_and_follows_one_live(tmp_path):
    """Steps, not a time budget, end the run, and the follower starts once the run has started: nothing here
    depends on how fast a loaded machine trains."""
    import subprocess
    import sys
    import time

    from conftest import TINY_MODEL

    logs = ["-m", "llm_training.cli.logs"]
    empty = run_cli(logs, tmp_path)
    assert empty.returncode == 0 and "no training runs" in empty.stdout
    prepared = prepared_plays(tmp_path, 3)
    training = subprocess.Popen([sys.executable, *TRAIN, "--data-dir", str(prepared), "--output-dir", "live",
                                 "--max-steps", "10", *TINY_MODEL, "--set", "training.log_interval=5",
                                 "--set", "training.sample_tokens=0", "--device", "cpu"], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    log = tmp_path / "live" / "logs" / "system.log"
    while not (log.is_file() and " run_start " in log.read_text()):  # the event, however long it takes
        assert training.poll() is None, "training ended before its run_start was logged"
        time.sleep(0.1)
    follow = run_cli([*logs, "--training-id", "latest", "--follow", "--interval", "0.2"], tmp_path)
    assert training.wait(300) == 0
    assert follow.returncode == 0
    lines = follow.stdout.strip().splitlines()
    assert " run_start " in follow.stdout and " step_end " in follow.stdout and " run_end " in lines[-1]
    listing = run_cli(logs, tmp_path)
    run_id = lines[0].split(" run=")[1].split()[0]
    assert run_id in listing.stdout and "completed" in listing.stdout
    metrics = run_cli([*logs, "--training-id", run_id, "--metrics"], tmp_path).stdout.splitlines()
    assert metrics and all(line.startswith("{") for line in metrics)
    missing = run_cli([*logs, "--training-id", "19990101-000000"], tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no run '19990101-000000'")


def test_a_failed_run_is_listed_as_failed_and_follow_ends_on_it(tmp_path):
    from conftest import call_cli
    from llm_training.cli import logs, main_job

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a first document that is fine"}\n{"text": broken\n')
    failed = call_cli(main_job.cli_main, ["--input-file", str(bad), "--output-dir", str(tmp_path / "run")])
    assert failed.returncode == 2 and "bad.jsonl:2" in failed.stderr
    listing = call_cli(logs.main, ["--root", str(tmp_path)])
    row = listing.stdout.splitlines()[1].split()
    assert row[1] == "failed", listing.stdout
    follow = call_cli(logs.main, ["--root", str(tmp_path), "--training-id", "latest", "--follow"])
    assert (
        follow.returncode == 0 and "run_end status=failed error=DataError" in follow.stdout.splitlines()[-1]
    )


def test_debug_mode_and_profiler_trace(tmp_path):
    """--debug: DEBUG lines in system.log (anomaly detection on); --profile-steps: a torch.profiler trace
    that TensorBoard's profiler plugin reads (``*.pt.trace.json`` under runs/profile)."""
    import json

    prepared = prepared_plays(tmp_path, 3)
    proc = run_cli([*TRAIN, "--data-dir", str(prepared), "--output-dir", "dbg", "--max-steps", "8", *TINY, "--debug",
                    "--profile-steps", "3", "--device", "cpu"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "dbg" / "logs" / "system.log").read_text()
    assert " DEBUG " in log and "anomaly detection is on" in log
    traces = list((tmp_path / "dbg" / "runs" / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert any("aten::" in str(e.get("name", "")) for e in events)
    bad = run_cli([*TRAIN, "--data-dir", str(prepared), "--profile-steps", "-2"], tmp_path)
    assert bad.returncode == 2 and "logging.profile_steps cannot be negative" in bad.stderr


def _console_run(stream, max_time, total_steps, steps, progress_per_step):
    from llm_training import events
    from llm_training.events import EventBus
    from llm_training.monitor.console import ConsoleSink

    bus = EventBus()
    sink = ConsoleSink(bus, stream=stream)
    bus.publish(events.RUN_START, num_parameters=1e6, device="cpu", precision="fp32", compile=False,
                train_tokens=10_000, tokens_per_step=512, max_time=max_time, total_steps=total_steps,
                start_step=0)  # fmt: skip
    for step in range(1, steps + 1):
        bus.publish(events.STEP_END, step=step, lr=1e-3, progress=step * progress_per_step, loss=2.0,
                    tokens_per_second=1000.0)  # fmt: skip
    bus.publish(events.RUN_END, status="completed")
    sink.close()
    return sink


def test_progress_counts_steps_and_shows_the_budget_as_time_left():
    import io
    import re

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    sink = _console_run(screen, max_time=100.0, total_steps=None, steps=7, progress_per_step=0.1)
    final = screen.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("train: 7step") and "left=" in final, final  # steps, not seconds of budget
    assert not re.search(r"\d(s/s|/100 )", screen.getvalue())  # no seconds of the budget counted
    # the time left follows the progress rate: 10% of the budget in 10 s -> 80 s left at 20%
    sink.first_progress = None
    assert sink.time_left(0.1, now=5.0) is None and sink.time_left(0.2, now=15.0) == pytest.approx(80.0)

    log = io.StringIO()  # not a terminal: plain lines counting steps of the step limit
    _console_run(log, max_time=None, total_steps=50, steps=3, progress_per_step=0.02)
    line = log.getvalue().strip().splitlines()[-1]
    assert line.startswith("train:") and "1/50" in line and "step" in line, line


def test_tensorboard_on_a_full_disk_stops_with_one_line_and_training_goes_on(
    tmp_path, monkeypatch, capsys, caplog
):
    """TensorBoard writes from a thread of its own: a full disk there is one warning, never a traceback, and the
    events after it are dropped without raising into the loop."""
    import errno
    import threading

    from tensorboard.summary.writer.record_writer import RecordWriter

    from llm_training import events
    from llm_training.events import EventBus
    from llm_training.monitor.tensorboard import TensorBoardSink

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RecordWriter, "write", full)
    bus = EventBus()
    sink = TensorBoardSink(bus, tmp_path / "tb")
    before = set(threading.enumerate())
    bus.publish(events.STEP_END, step=1, loss=2.0, lr=1e-3)  # the writer's thread fails on its first record
    for thread in set(threading.enumerate()) - before:
        if type(thread).__name__ == "_AsyncWriterThread":
            thread.join()  # it ends with the error, which the next write raises again
    for step in (2, 3):
        bus.publish(events.STEP_END, step=step, loss=2.0, lr=1e-3)
        bus.publish(events.EVAL_END, step=step, val_loss=2.0)
    sink.close()
    assert sink._failed
    warnings = [r.getMessage() for r in caplog.records if "TensorBoard: cannot write" in r.getMessage()]
    assert len(warnings) == 1 and "No space left" in warnings[0], warnings
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out, captured.err
