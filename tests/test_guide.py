"""Every Python snippet of the usage guide, read from the guide itself and run as written: only paths and
sizes are made small (each replacement must match the guide's text, so a changed guide fails here), and
what a snippet uses without defining (the guide's sections build on each other) is given beforehand. The
multi-modal snippet belongs to the multi-modal issue; the shell snippets are the commands' own tests."""

from __future__ import annotations

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
import torch

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
    exec(compile(code(heading, *replacements), f"<usage guide: {heading}>", "exec"), namespace)
    return namespace


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
    ns = run(
        "Workflow 1: Data Preparation Only",
        {},
        ("max_seq_length=2048", "max_seq_length=2048, vocab_size=512"),
    )
    for name in ("train.json", "validation.json", "vocab.json"):
        assert (workdir / "prepared_data" / name).is_file()

    # Workflow 2 uses the *Input classes without importing them: the README says so
    ns = {"DataLoaderInput": __import__("llm_training").DataLoaderInput,
          "ModelInitializerInput": __import__("llm_training").ModelInitializerInput,
          "TrainingOrchestratorInput": __import__("llm_training").TrainingOrchestratorInput}  # fmt: skip
    run("Workflow 2: Training from Prepared Data", ns, *TINY_ARCH, ("'vocab_size': 50000", "'vocab_size': 512"),
        ("batch_size=32", "batch_size=8"),
        ("'num_epochs': 10,", "'num_epochs': 1, 'max_steps': 6, 'checkpoint_interval': 3, 'eval_interval': 3,"
                              " 'output_dir': 'run', 'sample_tokens': 0,"))  # fmt: skip
    result = ns["result"]
    assert result.status == "completed" and result.steps == 6 and ns["model"].model_id == result.model_id
    assert (workdir / "run" / "checkpoints" / "model_step_3.pt").is_file()

    # Workflow 3 continues the same run from its step-3 checkpoint with Workflow 2's bus and loader
    lib = __import__("llm_training")
    ns["training_input"] = lib.TrainingOrchestratorInput(
        loader_id=ns["loader_output"].loader_id,
        training_config={
            "max_steps": 6,
            "output_dir": "run",
            "sample_tokens": 0,
            "eval_interval": 3,
            "optimizer": "adamw",
            "learning_rate": 0.0001,
        },
    )
    ns["training_input"].training_config.update(
        {f"model.{k}": v for k, v in ns["model"].config.__dict__.items()}
    )
    run(
        "Workflow 3: Resume from Checkpoint",
        ns,
        ("checkpoints/model_step_5000.pt", "run/checkpoints/model_step_3.pt"),
    )
    assert ns["checkpoint"]["step"] == 3
    resumed = ns["result"]
    assert resumed.status == "completed" and resumed.steps == 6
    assert abs(resumed.val_loss - result.val_loss) < 1e-4  # the resumed run ends where the straight one did


def test_custom_training_loop(workdir, prepared):
    import llm_training as lib

    ns = {"LossCalculatorInput": lib.LossCalculatorInput, "MetricsCollectorInput": lib.MetricsCollectorInput}
    run("Custom Training Loop", ns)
    bus = lib.EventBusAdaptor()
    loop = ns["CustomTrainingLoop"](bus)
    model = lib.ModelInitializer(bus).initialize(
        lib.ModelInitializerInput(architecture={"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                                "vocab_size": 400, "max_seq_length": 64})
    )  # fmt: skip
    loader = lib.DataLoader(bus).create_loader(
        lib.DataLoaderInput(dataset_path=prepared, batch_size=8, max_seq_length=64)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = loop.train_epoch(model, loader, optimizer)
    second = loop.train_epoch(model, loader, optimizer)
    assert len(loader) > 5 and torch.isfinite(first) and second < first - 0.3
    steps = loop.metrics.history("custom_training", "loss")
    assert len(steps) == 2 * len(loader) and len(bus.events("metric")) == 4 * len(loader)


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
    import uuid

    import llm_training as lib

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ns = {"uuid": uuid, "DataSourceConnectorOutput": lib.DataSourceConnectorOutput,
              "event_bus": lib.EventBusAdaptor()}  # fmt: skip
        url = f"http://127.0.0.1:{server.server_address[1]}/data"
        run("Custom Components", ns, ("https://api.example.com/data", url))
        assert ns["connection"].status == "connected" and ns["connection"].metadata == {"records": 3}
        wrong = code(
            "Custom Components", ("https://api.example.com/data", url), ("'your_api_key'", "'wrong'")
        )
        with pytest.raises(ConnectionError, match="403"):
            exec(wrong, dict(ns))
    finally:
        server.shutdown()


def test_curriculum_trainer(workdir, prepared):
    import llm_training as lib

    ns = run("Curriculum Learning", {"TrainingOrchestrator": lib.TrainingOrchestrator,
                                     "TrainingOrchestratorInput": lib.TrainingOrchestratorInput})  # fmt: skip

    class Curriculum(ns["CurriculumTrainer"]):
        def prepare_stage_data(self, max_length):  # the guide leaves this to the user
            return lib.DataLoader(self.event_bus).create_loader(
                lib.DataLoaderInput(dataset_path=prepared, batch_size=8, max_seq_length=max_length)
            )

    from llm_training.api.model import MODELS

    bus, before = lib.EventBusAdaptor(), len(MODELS)
    lib.ConfigurationAdaptor().update_config("training", "max_steps", 4)  # a small run a stage
    lib.ConfigurationAdaptor().update_config("training", "sample_tokens", 0)
    Curriculum(bus).train_curriculum([{"max_length": 32, "epochs": 1}, {"max_length": 64, "epochs": 1},
                                      {"max_length": 128, "epochs": 1}])  # fmt: skip
    starts = bus.events("run_start")
    assert [e.payload["tokens_per_step"] for e in starts] == [8 * 32, 8 * 64, 8 * 128]
    ends = bus.events("run_end")
    assert len(ends) == 3 and all(e.payload["status"] == "completed" for e in ends)
    # one model through the stages: the first stage made it, the later ones continued it
    assert len(MODELS) == before + 1


def test_active_learning(workdir, prepared):
    import llm_training as lib

    ns = run("Active Learning", {"torch": torch})
    tokenizer = lib.DataLoader().create_loader(lib.DataLoaderInput(dataset_path=prepared))

    class Active(ns["ActiveLearningPipeline"]):
        def train_model(self, current_data):  # the guide leaves this to the user
            model = lib.ModelInitializer().initialize(
                lib.ModelInitializerInput(architecture={"num_layers": 2, "hidden_size": 64,
                                                        "num_attention_heads": 4, "vocab_size": 400})
            )  # fmt: skip
            lib.TrainingOrchestrator().train(
                lib.TrainingOrchestratorInput(model_id=model.model_id, training_config={
                    "max_steps": 3, "output_dir": "active", "sample_tokens": 0}),
                data_loader_output=tokenizer,
            )  # fmt: skip
            return model

    pool = [torch.randint(0, 400, (24,)) for _ in range(4)] + [torch.zeros(24, dtype=torch.long)]
    data = [torch.randint(0, 400, (24,))]
    Active().train_active(data, pool, iterations=2)
    assert len(data) == 1 + 2 * len(pool)  # every pool sample is among the 1000 most uncertain


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
    ns = run("High-Level API", {}, ("num_epochs=10", "num_epochs=1"), ("batch_size=32", "batch_size=8"))
    assert ns["results"]["perplexity"] > 1 and (workdir / "exports" / "model.onnx").stat().st_size > 10_000
    assert (workdir / "experiments" / "exp_001" / "checkpoints" / "model_final.pt").is_file()


def test_mid_level_pipeline(workdir):
    write_raw(workdir / "bucket" / "data" / "plays.jsonl")
    ns = run("Mid-Level API", {}, ("'s3://bucket/data'", "'bucket/data'"), ("vocab_size=50000", "vocab_size=512"),
             ("num_epochs=10", "num_epochs=1, max_steps=6"))  # fmt: skip
    assert ns["train_results"]["status"] == "completed" and ns["train_results"]["steps"] == 6
    assert ns["eval_results"]["perplexity"] > 1 and 0 <= ns["eval_results"]["accuracy"] <= 1
    assert Path(ns["results"]["export"]["export_path"]).suffix == ".onnx"


def test_dynamic_configuration(workdir, capsys):
    ns = run("Dynamic Configuration", {})
    assert ns["batch_size"] == 16 and ns["config"].get_config("training", "learning_rate") == 0.0001
    ns["config"].update_config("training", "learning_rate", "3e-4")
    assert "Learning rate changed to: 0.0003" in capsys.readouterr().out


def test_metrics_dashboard_snippet(workdir):
    ns = run("Metrics Dashboard", {}, ("port=8080", "port=0"))
    try:
        assert (workdir / "results" / "metrics_report.html").stat().st_size > 1_000_000
        import httpx

        assert httpx.get(ns["dashboard"].url + "/health").status_code == 200
    finally:
        ns["dashboard"].stop()


def test_debugging_mode(workdir, monkeypatch, capsys):
    import llm_training as lib

    monkeypatch.setenv("LOG_LEVEL", "INFO")
    model = lib.ModelInitializer().initialize(
        num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=64
    )
    try:
        run("Debugging Mode", {"model": model, "batch": torch.randint(0, 64, (2, 16))})
    finally:
        torch.autograd.set_detect_anomaly(False)
    assert "Self CPU" in capsys.readouterr().out


def test_error_handling(workdir, prepared):
    import llm_training as lib
    from llm_training.errors import UserError

    trainer = lib.Trainer(
        data_dir=str(prepared), output_dir="run", max_steps=2, sample_tokens=0, **{"model.num_layers": 2}
    )
    ns = run("Error Handling", {"trainer": trainer})
    assert trainer.result.status == "completed" and ns["recovery"].max_retries == 3
    broken = lib.Trainer(data_dir="no_such_data", output_dir="run")
    with pytest.raises(UserError, match="no_such_data"):  # not an error to recover from: raised again
        run("Error Handling", {"trainer": broken})


def test_model_server_snippet(workdir, prepared):
    import httpx

    import llm_training as lib

    trainer = lib.Trainer(data_dir=str(prepared), output_dir="run", max_steps=2, sample_tokens=0,
                          **{"model.num_layers": 1, "model.hidden_size": 32, "model.num_attention_heads": 2})  # fmt: skip
    trainer.train()
    trainer.export(format="onnx", output_path="exports/model.onnx")
    port = free_port()
    text = code("Model Serving", ("port=8000", f"port={port}"), ("workers=4", "workers=2"))
    with open(workdir / "server.err", "w") as err:
        server = subprocess.Popen([sys.executable, "-c", text], cwd=workdir, stderr=err)
    try:
        wait_for_health(f"http://127.0.0.1:{port}")
        answer = httpx.post(f"http://127.0.0.1:{port}/predict", json={"prompt": "To be", "max_new_tokens": 4})
        assert answer.status_code == 200, answer.text
    finally:
        server.send_signal(signal.SIGTERM)  # start() blocks as in the guide; SIGTERM ends it gracefully
        server.wait(60)
    assert server.returncode == 0, (workdir / "server.err").read_text()[-2000:]
