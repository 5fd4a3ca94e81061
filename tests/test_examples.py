"""The examples of examples/ run end to end at their --tiny sizes, each in a fresh folder, as a user runs them."""

from __future__ import annotations

import pytest

from conftest import REPO, run_cli

EXAMPLES = sorted(p.name for p in (REPO / "examples").glob("0*.py"))
EXPECTED = {
    "01_basic_training.py": ["trained 10 steps", "held-out perplexity", "exported"],
    "02_custom_data.py": ["connected: {'files':", "prepared:", "trained 10 steps on text folder"],
    "03_distributed.py": ["2 processes (gloo): 10 steps"],
    "04_fine_tuning.py": [
        "base model",
        "fine-tuned from the checkpoint",
        "fine-tuned from the Hugging Face folder",
    ],
    "05_export_deploy.py": [
        "model.onnx",
        "'runtime': 'onnxruntime'",
        "completion:",
        "server stopped with status 0",
    ],
    "06_chat_sft.py": ["base model", "fine-tuned 10 steps", "exported", "the export's chat template renders"],
}


def test_every_example_is_listed():
    assert sorted(EXPECTED) == EXAMPLES


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs(name, tmp_path):
    proc = run_cli([str(REPO / "examples" / name), "--tiny"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for needle in EXPECTED[name]:
        assert needle in proc.stdout, (needle, proc.stdout[-2000:])
    assert "Traceback" not in proc.stderr
