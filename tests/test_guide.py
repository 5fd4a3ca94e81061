"""Every Python snippet of the usage guide, read from the guide itself, saved as a file and run as a script
(``python snippet.py`` in a temporary folder), the way users run them: only paths and sizes are made small
(each replacement must match the guide's text, so a changed guide fails here). What a snippet uses without
defining (the guide's sections build on each other) is written above it in the file, and what the test
checks is written below it: ``_report(...)`` saves values to report.json for the test to read. The
multi-modal snippet belongs to the multi-modal issue; the shell snippets are the commands' own tests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO, corpus_records, free_port, prepared_plays, wait_for_health

GUIDE = Path(os.environ.get("LLM_TRAINING_GUIDE", REPO.parent / "shared" / "seed" / "usage-guide.md"))
TINY_ARCH = [("'num_layers': 12", "'num_layers': 2"), ("'hidden_size': 768", "'hidden_size': 64"),
             ("'num_attention_heads': 12", "'num_attention_heads': 4")]  # fmt: skip


def snippets() -> dict[str, str]:
    """The guide's Python blocks by the heading above them."""
    if not GUIDE.is_file():
        pytest.skip(f"the usage guide is not at {GUIDE}")
    found, heading = {}, ""
    for part in re.split(r"(^```python\n.*?^```)", GUIDE.read_text(encoding="utf-8"), flags=re.S | re.M):
        if part.startswith("```python"):
            found[heading] = part[len("```python\n") : -3]
        else:
            headings = re.findall(r"^#+\s+(.*)$", part, flags=re.M)
            heading = headings[-1].strip() if headings else heading
    return found


def code(heading: str, *replacements: tuple[str, str]) -> str:
    text = snippets()[heading]
    for old, new in replacements:
        assert old in text, f"the guide's '{heading}' snippet no longer says {old!r}"
        text = text.replace(old, new)
    return text


def run(heading: str, namespace: dict, *replacements: tuple[str, str]) -> dict:
    """The snippet executed in this process (the multi-modal test reads the class it defines)."""
    exec(compile(code(heading, *replacements), f"<usage guide: {heading}>", "exec"), namespace)
    return namespace


REPORT = """import json as _json


def _report(**values):
    with open("report.json", "w") as _file:
        _json.dump(values, _file, default=str)


"""


def script_env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    if "LOG_LEVEL" not in extra:
        env.pop("LOG_LEVEL", None)
    return env


def save(folder: Path, text: str, before: str = "", after: str = "", name: str = "snippet.py") -> Path:
    path = folder / name
    path.write_text(REPORT + before + "\n" + text + "\n" + after, encoding="utf-8")
    return path


def script(
    folder: Path, text: str, before: str = "", after: str = "", ok: bool = True, env: dict | None = None
) -> tuple[subprocess.CompletedProcess, dict]:
    """``before``, the snippet's ``text`` and ``after`` saved as snippet.py in ``folder`` and run there with
    ``python snippet.py``; returns the finished process and what ``_report`` saved (``ok``: exit 0)."""
    path = save(folder, text, before, after)
    (folder / "report.json").unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, path.name], cwd=folder, env=env or script_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    report = folder / "report.json"
    return proc, json.loads(report.read_text()) if report.is_file() else {}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_plays(tmp_path_factory.mktemp("guidedata"), 3)


def write_raw(path: Path, count: int = 4, chars: int = 30_000) -> Path:
    records = corpus_records("shakespeare", count, lambda r: r["id"].endswith("_gut"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": r["id"], "text": r["text"][:chars]}) + "\n" for r in records))
    return path


def test_workflows_1_2_3_prepare_train_and_resume(workdir):
    write_raw(workdir / "raw_data.jsonl")
    script(workdir, code("Workflow 1: Data Preparation Only",
                         ("max_seq_length=2048", "max_seq_length=2048, vocab_size=512")))  # fmt: skip
    for name in ("train.json", "validation.json", "vocab.json"):
        assert (workdir / "prepared_data" / name).is_file()

    # Workflow 2 uses the *Input classes without importing them (the README says so); Workflow 3 continues
    # the same run from its step-3 checkpoint with Workflow 2's bus and loader, in the same script
    workflow2 = code("Workflow 2: Training from Prepared Data", *TINY_ARCH, ("'vocab_size': 50000", "'vocab_size': 512"),
                     ("batch_size=32", "batch_size=8"),
                     ("'num_epochs': 10,", "'num_epochs': 1, 'max_steps': 6, 'checkpoint_interval': 3, "
                                           "'eval_interval': 3, 'output_dir': 'run', 'sample_tokens': 0,"))  # fmt: skip
    between = """
_first = {"status": result.status, "steps": result.steps, "val_loss": result.val_loss,
          "same_model": model.model_id == result.model_id}
training_input = TrainingOrchestratorInput(loader_id=loader_output.loader_id, training_config={
    "max_steps": 6, "output_dir": "run", "sample_tokens": 0, "eval_interval": 3, "optimizer": "adamw",
    "learning_rate": 0.0001})
training_input.training_config.update({f"model.{k}": v for k, v in model.config.__dict__.items()})
"""
    workflow3 = code(
        "Workflow 3: Resume from Checkpoint",
        ("checkpoints/model_step_5000.pt", "run/checkpoints/model_step_3.pt"),
    )
    # Workflow 5 exports the resumed run's final checkpoint with the same event bus
    workflow5 = code(
        "Workflow 5: Model Export", ("'checkpoints/model_final.pt'", "'run/checkpoints/model_final.pt'")
    )
    after = """_report(first=_first, step=checkpoint["step"], status=result.status, steps=result.steps,
        val_loss=result.val_loss, onnx=str(onnx_output.export_path), torchscript=str(torchscript_output.export_path))
"""
    _, report = script(workdir, workflow2 + between + workflow3 + "\n" + workflow5, after=after,
                       before="from llm_training import DataLoaderInput, ModelInitializerInput, TrainingOrchestratorInput")  # fmt: skip
    first = report["first"]
    assert first["status"] == "completed" and first["steps"] == 6 and first["same_model"]
    assert (workdir / "run" / "checkpoints" / "model_step_3.pt").is_file()
    assert report["step"] == 3 and report["status"] == "completed" and report["steps"] == 6
    assert (
        abs(report["val_loss"] - first["val_loss"]) < 1e-4
    )  # the resumed run ends where the straight one did
    assert (
        Path(report["onnx"]).stat().st_size > 10_000 and Path(report["torchscript"]).stat().st_size > 10_000
    )


def test_basic_training_run(workdir):
    """``from llm_training import main; main()`` as a script: the whole pipeline on the sample data, made
    small through the environment (the configuration's layer above the defaults)."""
    small = {"MODEL__NUM_LAYERS": "1", "MODEL__HIDDEN_SIZE": "32", "MODEL__NUM_ATTENTION_HEADS": "2",
             "MODEL__MAX_SEQ_LENGTH": "64", "DATA__VOCAB_SIZE": "512", "TRAINING__MAX_STEPS": "2",
             "TRAINING__SAMPLE_TOKENS": "0", "TRAINING__BATCH_SIZE": "4"}  # fmt: skip
    env = script_env(**{f"LLM_TRAINING__{k}": v for k, v in small.items()})
    proc, _ = script(workdir, code("2. Basic Training Run"), env=env)
    assert list(workdir.glob("**/checkpoints/model_final.pt")), proc.stdout[-2000:]


def test_custom_training_loop(workdir, prepared):
    after = f"""
import torch as _torch
import llm_training as _lib

bus = _lib.EventBusAdaptor()
loop = CustomTrainingLoop(bus)
model = _lib.ModelInitializer(bus).initialize(_lib.ModelInitializerInput(architecture={{
    "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 400, "max_seq_length": 64}}))
loader = _lib.DataLoader(bus).create_loader(_lib.DataLoaderInput(dataset_path={str(prepared)!r}, batch_size=8,
                                                                 max_seq_length=64))
optimizer = _torch.optim.AdamW(model.parameters(), lr=3e-3)
first = loop.train_epoch(model, loader, optimizer)
second = loop.train_epoch(model, loader, optimizer)
_report(batches=len(loader), first=float(first), second=float(second),
        steps=len(loop.metrics.history("custom_training", "loss")), events=len(bus.events("metric")))
"""
    _, r = script(workdir, code("Custom Training Loop"), after=after,
                  before="from llm_training import LossCalculatorInput, MetricsCollectorInput")  # fmt: skip
    assert r["batches"] > 5 and r["first"] == r["first"] and r["second"] < r["first"] - 0.3
    assert r["steps"] == 2 * r["batches"] and r["events"] == 4 * r["batches"]


class _Api(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.headers.get("Authorization") != "Bearer your_api_key" or "category=science" not in self.path:
            self.send_response(403)
            self.end_headers()
            return
        body = json.dumps([{"id": i, "text": f"record {i}"} for i in range(3)]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_custom_data_source_against_a_real_http_api(workdir):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        before = "import uuid\nfrom llm_training import DataSourceConnectorOutput, EventBusAdaptor\nevent_bus = EventBusAdaptor()"
        url = f"http://127.0.0.1:{server.server_address[1]}/data"
        after = "_report(status=connection.status, metadata=connection.metadata)"
        _, report = script(
            workdir, code("Custom Components", ("https://api.example.com/data", url)), before, after
        )
        assert report == {"status": "connected", "metadata": {"records": 3}}
        wrong = code(
            "Custom Components", ("https://api.example.com/data", url), ("'your_api_key'", "'wrong'")
        )
        proc, _ = script(workdir, wrong, before, after, ok=False)
        assert proc.returncode == 1 and "ConnectionError: API returned 403" in proc.stderr
    finally:
        server.shutdown()


def test_curriculum_trainer(workdir, prepared):
    after = f"""
import llm_training as _lib
from llm_training.api.model import MODELS


class Curriculum(CurriculumTrainer):
    def prepare_stage_data(self, max_length):  # the guide leaves this to the user
        return _lib.DataLoader(self.event_bus).create_loader(
            _lib.DataLoaderInput(dataset_path={str(prepared)!r}, batch_size=8, max_seq_length=max_length))


bus, before = _lib.EventBusAdaptor(), len(MODELS)
_lib.ConfigurationAdaptor().update_config("training", "max_steps", 4)  # a small run a stage
_lib.ConfigurationAdaptor().update_config("training", "sample_tokens", 0)
Curriculum(bus).train_curriculum([{{"max_length": 32, "epochs": 1}}, {{"max_length": 64, "epochs": 1}},
                                  {{"max_length": 128, "epochs": 1}}])
_report(tokens=[e.payload["tokens_per_step"] for e in bus.events("run_start")],
        ends=[e.payload["status"] for e in bus.events("run_end")], models=len(MODELS) - before)
"""
    _, r = script(workdir, code("Curriculum Learning"), after=after,
                  before="from llm_training import TrainingOrchestrator, TrainingOrchestratorInput")  # fmt: skip
    assert r["tokens"] == [8 * 32, 8 * 64, 8 * 128] and r["ends"] == ["completed"] * 3
    assert (
        r["models"] == 1
    )  # one model through the stages: the first stage made it, the later ones continued it


def test_active_learning(workdir, prepared):
    after = f"""
import llm_training as _lib

_tokenized = _lib.DataLoader().create_loader(_lib.DataLoaderInput(dataset_path={str(prepared)!r}))


class Active(ActiveLearningPipeline):
    def train_model(self, current_data):  # the guide leaves this to the user
        model = _lib.ModelInitializer().initialize(_lib.ModelInitializerInput(architecture={{
            "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 400}}))
        _lib.TrainingOrchestrator().train(_lib.TrainingOrchestratorInput(model_id=model.model_id, training_config={{
            "max_steps": 3, "output_dir": "active", "sample_tokens": 0}}), data_loader_output=_tokenized)
        return model


pool = [torch.randint(0, 400, (24,)) for _ in range(4)] + [torch.zeros(24, dtype=torch.long)]
data = [torch.randint(0, 400, (24,))]
Active().train_active(data, pool, iterations=2)
_report(samples=len(data), pool=len(pool))
"""
    _, r = script(workdir, code("Active Learning"), before="import torch", after=after)
    assert r["samples"] == 1 + 2 * r["pool"]  # every pool sample is among the 1000 most uncertain


def test_high_level_trainer(workdir, prepared):
    import shutil

    shutil.copytree(prepared, workdir / "data")
    records = corpus_records("shakespeare", 5, lambda r: r["id"].endswith("_gut"))
    (workdir / "data" / "test.json").write_text(json.dumps([{"text": records[4]["text"][:5000]}]))
    (workdir / "config").mkdir()
    (workdir / "config" / "default.yaml").write_text(
        "model: {num_layers: 2, hidden_size: 64, num_attention_heads: 4, max_seq_length: 64}\n"
        "training: {max_steps: 8, sample_tokens: 0, eval_interval: 4}\n"
    )
    text = code("High-Level API", ("num_epochs=10", "num_epochs=1"), ("batch_size=32", "batch_size=8"))
    _, r = script(workdir, text, after="_report(perplexity=results['perplexity'])")
    assert r["perplexity"] > 1 and (workdir / "exports" / "model.onnx").stat().st_size > 10_000
    assert (workdir / "experiments" / "exp_001" / "checkpoints" / "model_final.pt").is_file()


def test_mid_level_pipeline(workdir):
    write_raw(workdir / "bucket" / "data" / "plays.jsonl")
    text = code("Mid-Level API", ("'s3://bucket/data'", "'bucket/data'"), ("vocab_size=50000", "vocab_size=512"),
                ("num_epochs=10", "num_epochs=1, max_steps=6"))  # fmt: skip
    after = "_report(train=train_results, evaluation=eval_results, export=results['export'])"
    _, r = script(workdir, text, after=after)
    assert r["train"]["status"] == "completed" and r["train"]["steps"] == 6
    assert r["evaluation"]["perplexity"] > 1 and 0 <= r["evaluation"]["accuracy"] <= 1
    assert Path(r["export"]["export_path"]).suffix == ".onnx"


def test_dynamic_configuration(workdir):
    after = """_report(batch_size=batch_size, lr=config.get_config("training", "learning_rate"))
config.update_config("training", "learning_rate", "3e-4")
"""
    proc, r = script(workdir, code("Dynamic Configuration"), after=after)
    assert r == {"batch_size": 16, "lr": 0.0001}
    assert "Learning rate changed to: 0.0003" in proc.stdout


def test_metrics_dashboard_snippet(workdir):
    after = """import httpx as _httpx
try:
    _report(health=_httpx.get(dashboard.url + "/health").status_code)
finally:
    dashboard.stop()
"""
    _, r = script(workdir, code("Metrics Dashboard", ("port=8080", "port=0")), after=after)
    assert r == {"health": 200} and (workdir / "results" / "metrics_report.html").stat().st_size > 1_000_000


def test_debugging_mode(workdir):
    before = """import llm_training as _lib
import torch as _torch

model = _lib.ModelInitializer().initialize(num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=64)
batch = _torch.randint(0, 64, (2, 16))
"""
    proc, _ = script(workdir, code("Debugging Mode"), before=before, env=script_env(LOG_LEVEL="INFO"))
    assert "Self CPU" in proc.stdout


def test_error_handling(workdir, prepared):
    before = f"""from llm_training import Trainer

trainer = Trainer(data_dir={str(prepared)!r}, output_dir="run", max_steps=2, sample_tokens=0,
                  **{{"model.num_layers": 2}})
"""
    after = "_report(status=trainer.result.status, retries=recovery.max_retries)"
    _, r = script(workdir, code("Error Handling"), before=before, after=after)
    assert r == {"status": "completed", "retries": 3}
    # not an error to recover from: raised again
    broken = (
        'from llm_training import Trainer\ntrainer = Trainer(data_dir="no_such_data", output_dir="run")\n'
    )
    proc, r = script(workdir, code("Error Handling"), before=broken, after=after, ok=False)
    assert proc.returncode == 1 and r == {} and "data directory not found: no_such_data" in proc.stderr


def test_model_server_snippet_saved_as_serve_py(workdir, prepared):
    """The guide's ``ModelServer(..., workers=4).start()`` saved as serve.py and run with ``python serve.py``
    (no ``if __name__ == "__main__":`` guard, as written): it serves, answers, and Ctrl-C (SIGINT) ends it
    and its workers with exit 0 and no traceback. (Started from the user's script, uvicorn's workers used
    to import serve.py again and fail, respawned forever.)"""
    import httpx
    import psutil

    import llm_training as lib

    trainer = lib.Trainer(data_dir=str(prepared), output_dir="run", max_steps=2, sample_tokens=0,
                          **{"model.num_layers": 1, "model.hidden_size": 32, "model.num_attention_heads": 2})  # fmt: skip
    trainer.train()
    trainer.export(format="onnx", output_path="exports/model.onnx")
    port = free_port()
    path = save(workdir, code("Model Serving", ("port=8000", f"port={port}")), name="serve.py")
    url = f"http://127.0.0.1:{port}"
    with open(workdir / "server.err", "w") as err:
        server = subprocess.Popen([sys.executable, path.name], cwd=workdir, stderr=err, env=script_env())
    try:
        try:
            wait_for_health(url, process=server)
        except (AssertionError, TimeoutError) as exc:
            raise AssertionError((workdir / "server.err").read_text()[-3000:]) from exc
        answer = httpx.post(url + "/predict", json={"prompt": "To be", "max_new_tokens": 4}, timeout=60)
        assert answer.status_code == 200, answer.text
        family = psutil.Process(server.pid).children(recursive=True)
        assert len(family) >= 5  # the server's supervisor and its four workers
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C: start() blocks as in the guide
        server.wait(120)
    log = (workdir / "server.err").read_text()
    assert server.returncode == 0 and "Traceback" not in log and "RuntimeError" not in log, log[-3000:]
    left = []
    for process in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.status() != psutil.STATUS_ZOMBIE:
                left.append(process)
    assert not left  # the workers ended with the server
