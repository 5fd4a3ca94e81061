"""The commands end to end in real subprocesses: the main job, llm-train, help texts and bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY, TINY_MODEL, assert_user_error, run_cli

MAIN = ["-m", "llm_training.main"]
TRAIN = ["-m", "llm_training.cli.train"]


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The main job with no data flags (the built-in sample), a tiny model and a 4-second budget (every step
    logged: a loaded machine may fit fewer steps than the default log interval in 4 s)."""
    cwd = tmp_path_factory.mktemp("main_job")
    proc = run_cli([*MAIN, "--max-time", "4s", *TINY, "--set", "training.log_interval=1"], cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd, proc


def test_main_job_on_builtin_sample_writes_everything(finished_run):
    cwd, proc = finished_run
    assert (cwd / "checkpoints" / "model_final.pt").is_file()
    assert (cwd / "logs" / "system.log").read_text().count("step_end") >= 1
    assert (cwd / "metrics.jsonl").is_file() and (cwd / "config.yaml").is_file()
    for name in ("train.json", "validation.json", "vocab.json"):
        assert (cwd / "prepared_data" / name).is_file()
    saved = yaml.safe_load((cwd / "config.yaml").read_text())
    assert saved["training"]["max_time"] == "4s" and saved["model"]["hidden_size"] == 64
    assert saved["model"]["vocab_size"] % 64 == 0  # resolved from the tokenizer
    out = proc.stdout
    assert (
        "validation loss" in out and "bits per byte" in out and "sample:" in out and "final checkpoint" in out
    )
    assert "train" in proc.stderr and "tok_s" in proc.stderr  # the progress bar
    # where the time went, parts that add up to the whole (start-up measured from the job's start)
    line = next(x for x in out.splitlines() if x.startswith("time: "))
    total, parts = line[len("time: ") :].split("s in all: ")
    spent = {name: float(value.rstrip("s")) for name, value in (p.rsplit(" ", 1) for p in parts.split(", "))}
    assert list(spent) == ["start-up", "training", "evaluation", "saving", "sample"]
    assert sum(spent.values()) == pytest.approx(float(total), abs=0.3) and min(spent.values()) >= 0


def test_main_from_python_with_environment(tmp_path):
    env = {
        "LLM_TRAINING__TRAINING__MAX_STEPS": "3",  # steps, not a budget a loaded machine may not fit
        "LLM_TRAINING__MODEL__HIDDEN_SIZE": "32",
        "LLM_TRAINING__MODEL__NUM_LAYERS": "1",
        "LLM_TRAINING__DATA__VOCAB_SIZE": "400",
        "LLM_TRAINING__TRAINING__SAMPLE_TOKENS": "5",
        "LLM_TRAINING__LOGGING__PROGRESS_BAR": "false",
    }
    code = "from llm_training import main; r = main(); print('STEPS', r.steps, r.status)"
    proc = run_cli(["-c", code], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert "completed" in proc.stdout and (tmp_path / "checkpoints" / "model_final.pt").is_file()
    # the same summary and sample as the command prints
    assert "validation loss" in proc.stdout and "sample:" in proc.stdout and "final checkpoint" in proc.stdout


def test_main_job_with_every_flag_and_resume(tmp_path, shakespeare_jsonl):
    config = tmp_path / "exp.yaml"
    config.write_text(
        yaml.safe_dump({"training": {"max_steps": 6, "checkpoint_interval": 3, "log_interval": 1}})
    )
    args = [
        *MAIN,
        "--input-file",
        str(shakespeare_jsonl),
        "--output-dir",
        "out/exp1",
        "--config",
        str(config),
        "--device",
        "cpu",
        *TINY,
        "--set",
        "data.max_seq_length=256",
    ]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "out" / "exp1"
    names = {"model_step_3.pt", "model_step_6.pt", "model_final.pt", "model_best.pt"}
    assert {p.name for p in (run / "checkpoints").iterdir()} == names | {f"{n}.json" for n in names}
    assert "6 steps" in proc.stdout
    assert (
        "note: data.max_seq_length 256 is recorded in the manifests" in proc.stdout
    )  # the main job's report
    resumed = run_cli([*args, "--resume-from", str(run / "checkpoints" / "model_step_3.pt")], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert (
        "6 steps" in resumed.stdout and "reusing prepared data" in (run / "logs" / "system.log").read_text()
    )


def test_guide_workflow_3_with_the_shipped_training_yaml(tmp_path, shakespeare_jsonl):
    """Workflow 3 as written: the shipped config/training.yaml, its run resumed from a step checkpoint (the
    guide's model_step_5000.pt, here step 2 of a tiny run)."""
    shutil.copytree(Path(__file__).resolve().parents[1] / "config", tmp_path / "config")
    tiny = [*TINY, "--input-file", str(shakespeare_jsonl), "--set", "training.checkpoint_interval=2"]
    args = [*MAIN, "--config", "config/training.yaml", "--set", "training.max_steps=4", *tiny]
    first = run_cli(args, tmp_path)
    assert first.returncode == 0, first.stderr
    assert "4 steps" in first.stdout and (tmp_path / "checkpoints" / "model_step_2.pt").is_file()
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["checkpoint"]["keep_last"] == 4 and saved["training"]["warmup_steps"] == 200
    resumed = run_cli([*args, "--resume-from", "checkpoints/model_step_2.pt"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "4 steps" in resumed.stdout
    assert (
        "resuming from checkpoints/model_step_2.pt at step 2"
        in (tmp_path / "logs" / "system.log").read_text()
    )


def test_llm_train_with_every_flag(tmp_path, finished_run):
    prepared = finished_run[0] / "prepared_data"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"num_layers": 1}, "training": {"checkpoint_interval": 2}}))
    args = [*TRAIN, "--config", str(config), "--data-dir", str(prepared), "--output-dir", "exp", "--num-epochs", "1",
            "--batch-size", "4", "--learning-rate", "0.002", "--max-steps", "4", "--device", "cpu", *TINY_MODEL]  # fmt: skip
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    saved = yaml.safe_load((tmp_path / "exp" / "config.yaml").read_text())
    t = saved["training"]
    assert (t["num_epochs"], t["batch_size"], t["learning_rate"], t["max_steps"]) == (1, 4, 0.002, 4)
    assert saved["model"]["num_layers"] == 2  # --set beats --config
    assert saved["data"]["data_dir"] == str(prepared)
    resumed = run_cli(
        [*args, "--resume", str(tmp_path / "exp" / "checkpoints" / "model_step_2.pt")], tmp_path
    )
    assert resumed.returncode == 0 and "4 steps" in resumed.stdout, resumed.stderr
    timed = run_cli(
        [*TRAIN, "--data-dir", str(prepared), "--output-dir", "timed", "--max-time", "2s", *TINY], tmp_path
    )
    assert timed.returncode == 0, timed.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("llm-train")
    assert script.exists() or shutil.which("llm-train"), "pip install -e . should install llm-train"


@pytest.mark.parametrize("args, flags", [
    (MAIN, ["--input-file", "--output-dir", "--config", "--resume-from", "--max-time", "--device", "--set"]),
    (TRAIN, ["--config", "--data-dir", "--output-dir", "--num-epochs", "--batch-size", "--learning-rate", "--resume", "--resume-from", "--max-steps", "--max-time", "--set"]),
    (["-m", "llm_training.cli.cleanup"], ["--checkpoint-dir", "--keep-last", "--keep-best", "--dry-run"]),
])  # fmt: skip
def test_help_lists_every_flag_with_a_sentence(tmp_path, args, flags):
    proc = run_cli([*args, "--help"], tmp_path)
    assert proc.returncode == 0
    for flag in flags:
        line = next(x for x in proc.stdout.splitlines() if x.strip().startswith(flag) or f", {flag} " in x)
        assert flag in line
    assert proc.stdout.count(".") >= len(flags)


def test_import_is_lazy(tmp_path):
    proc = run_cli(
        ["-c", "import sys, llm_training; print('torch' in sys.modules, llm_training.__version__)"], tmp_path
    )
    assert proc.stdout.split()[0] == "False"


@pytest.fixture
def existing_run(tmp_path, finished_run):
    """An output directory holding a finished run, to check that a failing command destroys nothing."""
    target = tmp_path / "run"
    shutil.copytree(finished_run[0], target)
    return target


BAD_FLAGS = [
    (["--input-file", "missing.jsonl"], "input not found: missing.jsonl"),
    (["--set", "training.learning_rate=-0.01"], "training.learning_rate must be positive"),
    (["--set", "model.num_attention_heads=3"], "model.num_attention_heads (3) must divide model.hidden_size"),
    (["--set", "training.batch_size=many"], "'training.batch_size' expects an integer"),
    (["--set", "training.batchsize=4"], "did you mean 'training.batch_size'"),
    (["--set", "nonsense"], "expected KEY=VALUE"),
    (["--max-time", "forever"], "training.max_time: expected a duration"),
    (["--resume-from", "nope.pt"], "checkpoint not found: nope.pt"),
    (["--device", "cuda"], "PyTorch sees no CUDA GPU"),
]


@pytest.mark.parametrize("extra, message", BAD_FLAGS)
def test_bad_input_is_one_line_and_destroys_nothing(existing_run, extra, message):
    if "cuda" in extra:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    before = snapshot(existing_run)
    proc = run_cli([*MAIN, "--output-dir", str(existing_run), *TINY, *extra], existing_run.parent)
    assert_user_error(proc, message)
    after = snapshot(existing_run)
    assert {k: v for k, v in after.items() if not k.startswith("logs/")} == {
        k: v for k, v in before.items() if not k.startswith("logs/")
    }


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", "input file is empty"),
    ("latin1.txt", "caf\u00e9 au lait\n".encode("latin-1"), "latin1.txt:1: not valid UTF-8"),
    ("broken.jsonl", b'{"text": "a"}\n{"text":\n', "broken.jsonl:2: invalid JSON"),
])  # fmt: skip
def test_bad_input_files(existing_run, name, content, message):
    path = existing_run.parent / name
    path.write_bytes(content)
    before = snapshot(existing_run)
    proc = run_cli(
        [*MAIN, "--output-dir", str(existing_run), "--input-file", str(path), *TINY], existing_run.parent
    )
    assert_user_error(proc, message)
    assert {k: v for k, v in snapshot(existing_run).items() if not k.startswith("logs/")} == {
        k: v for k, v in before.items() if not k.startswith("logs/")
    }


def test_bad_config_file_and_environment(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_sise: 128\n")
    assert_user_error(
        run_cli([*MAIN, "--config", str(bad)], tmp_path),
        "bad.yaml: unknown key 'model.hidden_sise'",
        "model.hidden_size",
    )
    assert_user_error(
        run_cli([*TRAIN, "--config", str(tmp_path / "none.yaml")], tmp_path), "config file not found"
    )
    assert_user_error(
        run_cli(MAIN, tmp_path, {"LLM_TRAINING__TRAINING__NUM_EPOCHS": "-1"}),
        "training.num_epochs must be at least 1",
    )
    assert_user_error(run_cli(MAIN, tmp_path, {"WORLD_SIZE": "2"}), "WORLD_SIZE is 2 but RANK", "torchrun")
    assert not (tmp_path / "checkpoints").exists()


def test_llm_train_bad_data_dir(tmp_path):
    assert_user_error(
        run_cli([*TRAIN, "--data-dir", str(tmp_path / "nowhere")], tmp_path), "data directory not found"
    )
    (tmp_path / "empty_dir").mkdir()
    assert_user_error(run_cli([*TRAIN, "--data-dir", str(tmp_path / "empty_dir")], tmp_path), "no train.json")


def command_parsers() -> list[tuple[str, object]]:
    """Every console script of pyproject.toml and the main job, with its argument parser."""
    import importlib
    import re

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    scripts = re.findall(r'^(llm-[a-z-]+) = "([a-z_.]+):main"$', text, re.M)
    assert len(scripts) == 15, scripts
    modules = [*scripts, ("python -m llm_training.main", "llm_training.cli.main_job")]
    return [(name, importlib.import_module(module).build_parser()) for name, module in modules]


def test_every_commands_help_shows_only_real_defaults_and_relevant_flags():
    helps = {name: p.format_help() for name, p in command_parsers()}
    for name, text in helps.items():
        flat = " ".join(text.split())
        assert "(default: None)" not in flat and "(default: True)" not in flat, name
        assert "(default: False)" not in flat and "(default: [])" not in flat, name
    assert "(default: 16)" in " ".join(helps["llm-evaluate"].split())  # real defaults are still shown
    flat = " ".join(helps["llm-export"].split())
    assert flat.count("--with-past") >= 1 and "(the default)" in flat
    for flag in ("--debug", "--profile-steps", "model.num_layers"):  # training switches
        assert flag not in helps["llm-prepare-data"]
        assert flag in helps["llm-train"] and flag in helps["python -m llm_training.main"]


def test_what_the_main_job_writes_in_a_clone_is_ignored_by_git():
    """Run from the repository (make run), the main job writes these into its root: git must ignore them."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    names = ["metrics.jsonl", "config.yaml", "checkpoints/model_final.pt", "logs/system.log", "runs/x",
             "prepared_data/train.json"]  # fmt: skip
    proc = subprocess.run(["git", "check-ignore", *names], cwd=root, capture_output=True, text=True)
    assert proc.stdout.split() == names
    assert subprocess.run(["git", "check-ignore", "-q", "config/training.yaml"], cwd=root).returncode == 1


BLOCKER = """\
import importlib.abc, os, sys
BLOCKED = set(os.environ["BLOCK_MODULES"].split(","))
class Block(importlib.abc.MetaPathFinder):  # as if these packages were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("blocked, args, extra", [
    ("fastapi,uvicorn", ["llm_training.cli.serve", "--model-path", "CKPT", "--port", "0"], "serve"),
    ("fastapi,uvicorn", ["llm_training.cli.dashboard", "--port", "0"], "monitor"),
    ("onnx,onnxruntime,onnxscript", ["llm_training.cli.export", "--checkpoint", "CKPT", "--format", "onnx"], "export"),
    ("transformers", ["llm_training.cli.export", "--checkpoint", "CKPT", "--format", "huggingface"], "export"),
    ("gguf", ["llm_training.cli.export", "--checkpoint", "CKPT", "--format", "gguf"], "export"),
    ("safetensors", ["llm_training.cli.export", "--checkpoint", "CKPT", "--format", "safetensors"], "export"),
])  # fmt: skip
def test_a_missing_extra_is_one_line_naming_it(tmp_path, finished_run, blocked, args, extra):
    """A plain `pip install .` lacks the extras: each command that needs one says which, in one line."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    checkpoint = str(finished_run[0] / "checkpoints" / "model_final.pt")
    argv = ["-m", *[checkpoint if a == "CKPT" else a for a in args]]
    if "export" in args[0]:
        argv += ["--output-dir", str(tmp_path / "exports")]
    import os

    path = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    proc = run_cli(argv, tmp_path, {"BLOCK_MODULES": blocked, "PYTHONPATH": path})
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()  # a progress line ("exporting ...") may come first
    assert "Traceback" not in proc.stderr and sum("error" in line for line in lines) == 1, proc.stderr
    assert lines[-1].startswith("error: the module ") and f"pip install 'llm-training[{extra}]'" in lines[-1]
    if "export" in args[0]:  # nothing half-written
        assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").iterdir())


def test_prepare_data_says_what_it_did_instead_of_the_vocabulary_and_length_asked(tmp_path):
    from conftest import call_cli, corpus_records
    from llm_training.cli import prepare_data

    raw = tmp_path / "small.jsonl"
    records = corpus_records("shakespeare", 2, lambda r: r["id"].endswith("_gut"))
    raw.write_text("".join(json.dumps({"id": r["id"], "text": r["text"][:3000]}) + "\n" for r in records))
    args = [
        "--input",
        str(raw),
        "--output",
        str(tmp_path / "p"),
        "--vocab-size",
        "50000",
        "--max-length",
        "2048",
    ]
    proc = call_cli(prepare_data.main, [*args, "--quiet", "--workers", "1"])
    assert proc.returncode == 0, proc.stderr
    vocab = json.loads((tmp_path / "p" / "train.json").read_text())["vocab_size"]
    assert vocab < 50000
    assert f"note: vocabulary: {vocab:,} tokens, not the 50,000 asked" in proc.stdout
    assert (
        "note: --max-length 2,048 is recorded in the manifests; training windows are the model's context, "
        in proc.stdout
    )
    plain = call_cli(prepare_data.main, ["--input", str(raw), "--output", str(tmp_path / "q"), "--quiet",
                                         "--vocab-size", "300", "--workers", "1"])  # fmt: skip
    assert plain.returncode == 0 and "note:" not in plain.stdout  # nothing asked that was not done


def test_job_notes_name_the_vocabulary_and_context_used(tmp_path):
    from llm_training.config import load_config
    from llm_training.data.notes import job_notes

    (tmp_path / "prepare_report.json").write_text(json.dumps({"vocab_size": 1201, "vocab_size_asked": 50000}))
    cfg = load_config(cli={"data.max_seq_length": 1024}, environ={}, default_file=None)
    notes = job_notes(cfg, tmp_path)
    assert notes[0].startswith("vocabulary: 1,201 tokens, not the 50,000 asked")
    assert notes[1].startswith("data.max_seq_length 1,024 is recorded") and "128 tokens" in notes[1]
    assert job_notes(load_config(environ={}, default_file=None), tmp_path / "absent") == []
