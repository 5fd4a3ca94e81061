"""Preference tuning with ``llm-finetune --method dpo|simpo``, on pairs made from a play: the prompt is a line,
the chosen reply the line that follows it, the rejected reply that line with its words in reverse order.
Tiny random Qwen2 and GPT-2 models (test_finetune's). Checks: DPO's loss is ln 2 at step 0 (the cached
reference equals the policy) and falls, the validation reward accuracy rises above chance, the reference
log-probs are scored once and re-used by --resume auto (same file, same inode and mtime), the resumed steps
are exactly the uninterrupted run's; SimPO trains without a reference; DPO with LoRA through the Python API;
bad inputs are one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_finetune import GPT2_FILES, finetune, gpt2_folder, gpt2_tokenizer, qwen2_folder  # noqa: F401 (fixtures)

from conftest import assert_user_error, call_cli, corpus_records
from llm_training.cli.finetune import main as finetune_main

transformers = pytest.importorskip("transformers")
LN2 = math.log(2)
EVERY_STEP = ["--set", "training.log_interval=1", "--set", "training.checkpoint_interval=10",
              "--set", "checkpoint.keep_last=100"]  # fmt: skip


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """A line of a play as the prompt, the next line as the chosen reply, its words reversed as the rejected."""
    text = corpus_records("shakespeare", 1, lambda r: r["id"].endswith("_gut"))[0]["text"]
    lines = [x.strip() for x in text[5_000:60_000].splitlines() if len(x.strip()) > 20][:401]
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for prompt, reply in zip(lines[0:400:2], lines[1:401:2], strict=True):
            rejected = " ".join(reversed(reply.split()))
            handle.write(json.dumps({"prompt": prompt, "chosen": reply, "rejected": rejected}) + "\n")
    return path


def records(run, event: str) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["event"] == event]


def step_losses(run) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in records(run, "step_end") if "loss" in r
    }  # a replayed step: its last


def test_dpo_learns_and_resumes_exactly_with_its_cached_reference(tmp_path, qwen2_folder, pairs_file):  # noqa: F811
    run = tmp_path / "run"
    proc = finetune(qwen2_folder, pairs_file, run, "--method", "dpo", "--beta", "0.5", "--max-steps", "20",
                    *EVERY_STEP)  # fmt: skip
    evals = records(run, "eval_end")
    first, last = evals[0], evals[-1]
    print(f"dpo: validation loss {first['val_loss']:.4f} -> {last['val_loss']:.4f}, reward accuracy "
          f"{first['val_reward_accuracy']:.2f} -> {last['val_reward_accuracy']:.2f}, margin {last['val_margin']:.3f}")  # fmt: skip
    assert first["step"] == 0 and abs(first["val_loss"] - LN2) < 1e-4  # the policy is the reference
    assert first["val_margin"] == pytest.approx(0.0, abs=1e-3)
    assert last["step"] == 20 and last["val_loss"] < LN2 - 0.05
    assert last["val_reward_accuracy"] > 0.7 and last["val_margin"] > 0
    assert "scored 200 pairs with the starting model" in proc.stdout
    assert "validation reward accuracy" in proc.stdout  # in the summary

    prepared = run / "prepared_preference"
    manifest = json.loads((prepared / "train.json").read_text())
    assert manifest["kind"] == "preference" and manifest["num_items"] + 10 == 200
    cache = prepared / "reference.npz"
    with np.load(cache) as arrays:
        assert arrays["train"].shape == (190, 2) and arrays["validation"].shape == (10, 2)
        assert arrays["train"].dtype == np.float32 and (arrays["train"] < 0).all()
    before = cache.stat()
    state = torch.load(run / "checkpoints" / "model_final.pt", weights_only=True)
    assert state["config"]["finetune"]["method"] == "dpo" and state["config"]["finetune"]["reference"]
    assert state["model_kind"] == "text"

    # --resume auto from step 10: the cache is re-used, not scored again, and steps 11-20 replay exactly
    losses, final = step_losses(run), state["model"]
    for name in ("model_final.pt", "model_step_20.pt"):
        (run / "checkpoints" / name).unlink()
    proc = finetune(qwen2_folder, pairs_file, run, "--method", "dpo", "--beta", "0.5", "--max-steps", "20",
                    *EVERY_STEP, "--resume", "auto")  # fmt: skip
    assert "re-used the reference log-probs" in proc.stdout and "scored" not in proc.stdout
    after = cache.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert step_losses(run) == losses
    resumed = torch.load(run / "checkpoints" / "model_final.pt", weights_only=True)["model"]
    assert resumed.keys() == final.keys() and all(torch.equal(resumed[k], final[k]) for k in final)


def test_simpo_trains_without_a_reference(tmp_path, gpt2_folder, pairs_file):  # noqa: F811
    """A base GPT-2 (dropout 0.1, turned off for preference tuning) with ChatML added: SimPO's loss falls
    and nothing is scored beforehand."""
    run = tmp_path / "run"
    proc = finetune(gpt2_folder, pairs_file, run, "--method", "simpo", "--chat-template", "chatml",
                    "--max-steps", "20")  # fmt: skip
    evals = records(run, "eval_end")
    first, last = evals[0], evals[-1]
    print(f"simpo: validation loss {first['val_loss']:.4f} -> {last['val_loss']:.4f}, reward accuracy "
          f"{first['val_reward_accuracy']:.2f} -> {last['val_reward_accuracy']:.2f}")  # fmt: skip
    assert last["val_loss"] < first["val_loss"] - 0.1
    assert last["val_reward_accuracy"] > 0.6
    assert not (run / "prepared_preference" / "reference.npz").exists() and "scored" not in proc.stdout
    config = torch.load(run / "checkpoints" / "model_final.pt", weights_only=True)["config"]
    assert config["model"]["dropout"] == 0.0 and config["finetune"]["method"] == "simpo"


def test_dpo_with_lora_through_the_api(tmp_path, qwen2_folder, pairs_file):  # noqa: F811
    """Trainer.finetune(method="dpo", lora_rank=8): the reference is the base model's (loss ln 2 at step 0),
    only the adapters move, and the loss falls (little: as test_finetune's LoRA test says, adapters on the
    blocks of a random model with tied embeddings move its log-probs little; 0.693 -> 0.671 when written)."""
    pytest.importorskip("peft")
    from llm_training.api.trainer import Trainer
    from llm_training.export.hf_import import load_hf

    # 40 validation pairs: with 10, one pair moves the figures a lot
    settings = {"batch_size": 8, "learning_rate": 1e-2, "eval_interval": 10, "eval_batches": 8, "sample_tokens": 4,
                "warmup_steps": 3, "resources.device": "cpu", "logging.tensorboard": False,
                "logging.progress_bar": False, "finetune.lora_alpha": 64, "data.validation_fraction": 0.2}  # fmt: skip
    result = Trainer(output_dir=str(tmp_path / "run")).finetune(
        str(qwen2_folder), str(pairs_file), method="dpo", lora_rank=8, beta=0.5, max_steps=20, **settings
    )
    print(f"dpo + LoRA: validation loss {result.first_val_loss:.4f} -> {result.val_loss:.4f}, "
          f"reward accuracy {result.metrics['val_reward_accuracy']:.2f}")  # fmt: skip
    assert abs(result.first_val_loss - LN2) < 1e-4 and result.val_loss < LN2 - 0.01
    assert any(note.startswith("LoRA rank 8") for note in result.notes)
    state = torch.load(result.final_checkpoint, weights_only=True)["model"]
    original = load_hf(qwen2_folder)[0].state_dict()
    assert torch.equal(state["blocks.0.attn.qkv.base_layer.weight"], original["blocks.0.attn.qkv.weight"])
    assert state["blocks.1.mlp.down.lora_B.default.weight"].abs().max() > 0


def test_pairs_are_batched_both_sides_at_once_and_dpo_starts_at_ln2(tmp_path, pairs_file):
    """In process: a batch holds each pair's chosen and rejected rows padded to one width, labels only on the
    replies; the reference scored by the model itself gives a DPO loss of exactly ln 2 and zero margins."""
    from llm_training.api.finetune import prepare_chat_data
    from llm_training.config import load_config
    from llm_training.data.chat import add_template_tokens
    from llm_training.data.chat_template import load_chat_template
    from llm_training.data.preference_prepare import PreferenceDataset
    from llm_training.data.tokenizer import Tokenizer
    from llm_training.model import build_model
    from llm_training.train.device import resolve_runtime
    from llm_training.train.preference import PreferenceTuning, score_pairs

    gpt2_tokenizer(chatml=False)  # skips without the tokenizer files
    tokenizer = Tokenizer.load(GPT2_FILES)
    template = load_chat_template("chatml")
    add_template_tokens(tokenizer, template)
    values = {"output_dir": str(tmp_path / "a"), "model.max_seq_length": 96, "model.hidden_size": 32,
              "model.num_layers": 1, "model.vocab_size": tokenizer.vocab_size, "finetune.method": "simpo",
              "resources.device": "cpu"}  # fmt: skip
    cfg = load_config(cli=values, environ={}, default_file=None)
    folder, note = prepare_chat_data(cfg, pairs_file, tokenizer, template)
    assert folder.name == "prepared_preference" and note.startswith("prepared 200 of 200 preference pairs")
    data = PreferenceDataset(folder / "validation.json", 96)
    batch = data.batch([0, 1, 2])
    assert batch["input_ids"].shape[:2] == (3, 2) and batch["labels"].shape == batch["input_ids"].shape
    for side in (0, 1):
        ids, labels = data.example(1, ("chosen", "rejected")[side])
        n = len(ids) - 1
        assert batch["input_ids"][1, side, :n].tolist() == ids[:-1].tolist()
        assert batch["labels"][1, side, :n].tolist() == labels[1:].tolist()
        assert (batch["labels"][1, side, n:] == -100).all()
        reply = tokenizer.backend.decode(ids[labels != -100].tolist(), skip_special_tokens=False)
        assert reply.endswith("<|im_end|>") and "<|im_start|>" not in reply  # the reply, never the prompt
    chosen, rejected = data.example(1, "chosen")[0], data.example(1, "rejected")[0]
    prompt = int(np.flatnonzero(data.example(1)[1] != -100)[0])
    assert chosen[:prompt].tolist() == rejected[:prompt].tolist()  # the same prompt on both sides

    torch.manual_seed(0)
    model, runtime = build_model(cfg).eval(), resolve_runtime(cfg)
    reference = score_pairs(model, data, runtime, batch_size=4)
    dpo = PreferenceTuning(None, PreferenceDataset(folder / "validation.json", 96, reference), "dpo")
    with torch.no_grad():
        loss, sums = dpo.measure(model, dpo.val_set.batch(range(4)), runtime)
    assert loss.item() == pytest.approx(LN2, abs=1e-6) and sums["margin"].abs().item() < 1e-5
    assert sums["correct"].item() == 0  # no pair's chosen reward is above its rejected one's yet
    simpo = PreferenceTuning(None, data, "simpo")
    assert (simpo.beta, simpo.gamma) == (2.0, 1.0)


def test_bad_preference_inputs_are_one_line(tmp_path, gpt2_folder, pairs_file):  # noqa: F811
    out = ["--output-dir", str(tmp_path / "run"), "--chat-template", "chatml", "--device", "cpu"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Who goes there?", "chosen": "A friend.", "rejected": "friend A."}\n'
                   '{"prompt": "Who goes there?", "chosen": "A friend."}\n')  # fmt: skip
    proc = call_cli(finetune_main, ["--model", str(gpt2_folder), "--data", str(bad), "--method", "dpo", *out])
    assert_user_error(proc, f"{bad}: line 2")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    )
    proc = call_cli(
        finetune_main, ["--model", str(gpt2_folder), "--data", str(chat), "--method", "dpo", *out]
    )
    assert_user_error(proc, str(chat), "preference pairs")
    proc = call_cli(finetune_main, ["--model", str(gpt2_folder), "--data", str(pairs_file), *out])
    assert_user_error(proc, str(pairs_file), "--method dpo or simpo")
    proc = call_cli(finetune_main, ["--model", str(gpt2_folder), "--data", str(pairs_file), "--method", "dpo",
                                    "--train-on-prompt", *out])  # fmt: skip
    assert_user_error(proc, "finetune.train_on_prompt")
    proc = call_cli(finetune_main, ["--model", str(gpt2_folder), "--data", str(pairs_file), "--method", "dpo",
                                    "--beta", "0", *out])  # fmt: skip
    assert_user_error(proc, "finetune.beta")
