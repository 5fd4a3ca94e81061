"""Shared fixtures: the real corpora from ../shared/corpora and tiny settings that keep runs fast."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N` runs N workers on the machine's cores: one thread each (and in the commands they start),
    # or N x cores threads would contend for the same cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
CORPORA = Path(os.environ.get("LLM_TRAINING_CORPORA", REPO.parent / "shared" / "corpora"))

# a model and loop small enough for a CPU test to train in seconds
TINY_MODEL = [
    "--set", "model.num_layers=2", "--set", "model.hidden_size=64", "--set", "model.num_attention_heads=4",
    "--set", "model.max_seq_length=64", "--set", "data.vocab_size=512",
]  # fmt: skip
TINY = [
    *TINY_MODEL,
    "--set",
    "training.batch_size=8",
    "--set",
    "training.eval_batches=4",
    "--set",
    "training.sample_tokens=20",
]


def corpus_records(name: str, limit: int | None = None, predicate=None) -> list[dict]:
    path = CORPORA / f"{name}.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"corpus {path} not present (tests read ../shared/corpora beside the repository)")
    records = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if predicate is None or predicate(record):
                records.append(record)
                if limit and len(records) >= limit:
                    break
    return records


@pytest.fixture
def shakespeare_jsonl(tmp_path: Path) -> Path:
    """Six modern-spelling plays, cut to 40 kB each: real text, small enough for seconds of training."""
    records = corpus_records("shakespeare", 6, lambda r: r["id"].endswith("_gut"))
    path = tmp_path / "plays.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps({"id": record["id"], "text": record["text"][:40_000]}) + "\n")
    return path


def run_cli(
    args: list[str], cwd: Path, env: dict | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("LOG_LEVEL", None)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def call_cli(main, args: list[str]) -> subprocess.CompletedProcess:
    """A command's ``main(argv)`` run in this process, its output captured: for bad-input checks that fail
    before any real work, without the second of interpreter and import start-up a subprocess costs."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exc:  # argparse
            code = exc.code
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit status 2, one line on stderr starting with 'error:', no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def prepared_plays(folder: Path, count: int, chars: int = 30_000) -> Path:
    """``count`` modern-spelling plays (cut to ``chars``) prepared with a 400-token BPE, 20% validation."""
    from llm_training.data.prepare import prepare_documents
    from llm_training.data.sources import read_documents

    records = corpus_records("shakespeare", count, lambda r: r["id"].endswith("_gut"))
    src = folder / "plays.jsonl"
    src.write_text("".join(json.dumps({"id": r["id"], "text": r["text"][:chars]}) + "\n" for r in records))
    return prepare_documents(
        read_documents(src), folder / "data", vocab_size=400, validation_fraction=0.2
    ).output_dir


def train_on_plays(root: Path, steps: int, **settings) -> tuple[Path, Path, list[dict]]:
    """A small model (2 x 64, context 64, plus ``settings``) trained for ``steps`` on four Shakespeare plays
    (512-token BPE); the fifth play, cut to 20,000 characters, is written as test text. Returns (final
    checkpoint, test text, the five records)."""
    from llm_training.config import load_config
    from llm_training.data.prepare import prepare_documents
    from llm_training.data.sources import Document
    from llm_training.train.loop import train

    plays = corpus_records("shakespeare", 5, lambda r: r["id"].endswith("_gut"))
    docs = [Document(r["id"], r["text"][:60_000]) for r in plays[:4]]
    data = prepare_documents(docs, root / "data", vocab_size=512, validation_fraction=0.1).output_dir
    values = {"output_dir": str(root / "run"), "model.num_layers": 2, "model.hidden_size": 64,
              "model.num_attention_heads": 4, "model.max_seq_length": 64, "training.batch_size": 16,
              "training.max_steps": steps, "training.sample_tokens": 0, "training.eval_interval": 1000,
              "logging.progress_bar": False, **settings}  # fmt: skip
    result = train(load_config(cli=values, environ={}, default_file=None), data, handle_signals=False)
    text = root / "play.txt"
    text.write_text(plays[4]["text"][:20_000], encoding="utf-8")
    return Path(result.final_checkpoint), text, plays


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, what: str, seconds: float = 300.0, every: float = 0.01) -> None:
    """Wait for something another process or thread makes happen (a server up, a request admitted, a row
    stopped): the test asserts on that event, and the deadline only keeps a broken run from hanging."""
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {seconds:g} s")
        time.sleep(every)


def wait_for_health(url: str, seconds: float = 300.0, headers: dict | None = None, process=None) -> None:
    """Wait until a server started elsewhere answers ``url``/health with 200; a ``process`` (the server's
    ``Popen``) that ends first fails at once."""
    import httpx

    def healthy() -> bool:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server ended with {process.returncode} before it answered /health")
        try:
            return httpx.get(url + "/health", headers=headers).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, f"{url}/health answering", seconds, every=0.2)


@contextlib.contextmanager
def served_here(options, engine=None):
    """A real uvicorn server on loopback in a thread of this process (faster to start than a child process,
    and the engine can be reached): yields its URL."""
    import threading

    import uvicorn

    from llm_training.serve.app import create_app
    from llm_training.serve.protocol import uvicorn_config

    port = free_port()
    server = uvicorn.Server(uvicorn_config(create_app(options, engine), options, port=port))
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        wait_for_health(f"http://127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(60)


def set_flags(values: dict) -> list[str]:
    """``--set key=value`` for each config value (None as null)."""
    return [x for k, v in values.items() for x in ("--set", f"{k}={'null' if v is None else v}")]


@pytest.fixture(autouse=True)
def _no_runtime_overrides():
    """A test's ConfigurationAdaptor.update_config must not reach the next test (they are process-wide)."""
    yield
    from llm_training.overrides import RUNTIME

    RUNTIME.clear()
