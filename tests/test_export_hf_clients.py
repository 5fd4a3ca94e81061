"""The Hugging Face export as real users load it: a checkpoint of each style exported with this package,
then loaded by tests/hf_client.py in a separate interpreter that does not import llm_training, once with
transformers 5.x (this environment's) and once with transformers 4.x (venv-clients/tf4, made by
scripts/client_envs.sh, or the interpreter in $LLM_TRAINING_TF4_PYTHON). ``model(**tok(text))``,
``generate(**tok(text))`` and a padded batch must give this package's logits and greedy tokens."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, prepared_plays

pytest.importorskip("transformers")

CLIENT = Path(__file__).with_name("hf_client.py")
TEXT = "ROMEO:\nBut soft, what light through yonder window breaks?"
SHORT = "JULIET:\nAy me!"
STYLES = {"gpt2": {"model.model_type": "gpt2"},
          # grouped-query attention and a RoPE base other than transformers' default (10000)
          "llama": {"model.model_type": "llama", "model.num_kv_heads": 2, "model.rope_theta": 50_000.0}}  # fmt: skip


def tf4_python() -> str:
    """An interpreter with transformers 4.x and without this package; skips with the reason when none."""
    given = os.environ.get("LLM_TRAINING_TF4_PYTHON")
    python = Path(given) if given else REPO / "venv-clients" / "tf4" / "bin" / "python"
    if not python.exists():
        where = f"LLM_TRAINING_TF4_PYTHON={given}" if given else str(python)
        pytest.skip(
            f"no transformers 4.x client environment ({where} missing): run bash scripts/client_envs.sh"
        )
    return str(python)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return prepared_plays(tmp_path_factory.mktemp("plays"), 2)


@pytest.fixture(scope="module", params=list(STYLES))
def exported(request, data, tmp_path_factory):
    """(style, the trained checkpoint's model, its tokenizer, the exported folder): 2 x 64, 20 steps."""
    from llm_training.config import load_config
    from llm_training.export.exporter import ExportOptions, export_checkpoint
    from llm_training.train.artifacts import load_trained
    from llm_training.train.loop import train

    root = tmp_path_factory.mktemp(request.param)
    values = {"output_dir": str(root / "run"), "model.num_layers": 2, "model.hidden_size": 64,
              "model.num_attention_heads": 4, "model.max_seq_length": 64, "training.batch_size": 8,
              "training.max_steps": 20, "training.sample_tokens": 0, "training.eval_interval": 1000,
              "logging.progress_bar": False, **STYLES[request.param]}  # fmt: skip
    checkpoint = train(load_config(cli=values, environ={}, default_file=None), data, handle_signals=False)
    checkpoint = checkpoint.final_checkpoint
    result = export_checkpoint(checkpoint, ExportOptions(format="hf", output=root / "exports" / "model_hf"))
    trained = load_trained(checkpoint)
    return request.param, trained.model.float().eval(), trained.tokenizer, result.export_path


def run_client(python: str, folder: Path) -> dict:
    """The client under ``python -I`` (no user site, no script folder on the path) and without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([python, "-I", str(CLIENT), str(folder), TEXT, SHORT], capture_output=True, text=True,
                          env=env, cwd=folder.parent, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def greedy(model, ids: list[int], steps: int, eot: int) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(steps):
            out.append(int(model(torch.tensor([ids + out]))[0, -1].argmax()))
            if out[-1] == eot:
                break
    return out


@pytest.mark.parametrize("major", ["5", "4"])
def test_transformers_clients_get_our_logits_and_tokens(exported, major):
    style, model, tokenizer, folder = exported
    python = sys.executable if major == "5" else tf4_python()
    got = run_client(python, folder)
    assert got["version"].split(".")[0] == major and not got["imported_llm_training"]
    assert got["model_class"] == ("GPT2LMHeadModel" if style == "gpt2" else "LlamaForCausalLM")
    assert got["ids"] == tokenizer.encode(TEXT)
    with torch.no_grad():
        ours = model(torch.tensor([got["ids"]]))[0]
    diff = (torch.tensor(got["logits"]) - ours).abs().max().item()
    print(f"{style} transformers {got['version']}: max |logit diff| {diff:.3g}")
    assert diff < 1e-4
    # the tokenizer gives only what both models take: transformers 4 added token_type_ids, which GPT-2
    # adds to its embeddings (other logits) and Llama's generate refuses
    assert got["input_names"] == ["attention_mask", "input_ids"]
    # a padded batch (right padding with our pad token): each row's real positions give its own logits
    for row, mask, logits in zip(got["padded_ids"], got["padded_mask"], got["padded_logits"], strict=True):
        n = sum(mask)
        assert row[n:] == [tokenizer.pad_id] * (len(row) - n)
        with torch.no_grad():
            alone = model(torch.tensor([row[:n]]))[0]
        assert (torch.tensor(logits)[:n] - alone).abs().max() < 1e-4
    # generate(**tok(text)): greedy, the same new tokens (it stops early only at end-of-text)
    assert got["generated"] == greedy(model, got["ids"], 5, tokenizer.eot_id)


def test_exported_files_are_readable_by_everyone_the_umask_allows(exported):
    """safetensors writes through a 0600 temporary file: the export gets the modes cp would give."""
    folder = exported[3]
    mask = os.umask(0o022)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        expected = (0o777 if path.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
