"""The LoRA adapter as peft keeps it, and chat data in ``llm-evaluate``.

``llm-export --format peft`` of a LoRA fine-tuning (test_finetune.py's tiny Qwen2 and GPT-2 models and chat
file): ``PeftModel.from_pretrained`` on the exported base gives our merged model's logits, and so does its
``merge_and_unload()``; adapter_config.json has the run's rank, alpha, dropout and transformers' module names.
``llm-evaluate`` on chat records gives the run's own final validation loss on its validation examples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_finetune import chat_file, evals, finetune, gpt2_folder, qwen2_folder  # noqa: F401 (fixtures)

from conftest import assert_user_error, call_cli, run_cli, train_on_plays
from llm_training.cli.evaluate import main as evaluate_main
from llm_training.cli.export import main as export_main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

X = torch.tensor([[11, 502, 1234, 50257, 7, 99, 3000, 50258, 42, 198, 50256, 13]])


def export_peft(final, out, *extra):
    proc = run_cli(["-m", "llm_training.cli.export", "--checkpoint", str(final), "--format", "peft", "--output",
                    str(out), *extra], out.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout, proc.stderr)
    return proc


def peft_logits(base_folder, adapter_folder) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of X through PeftModel.from_pretrained on ``base_folder``, then through its merge_and_unload()."""
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder).eval()
    adapted = peft.PeftModel.from_pretrained(base, adapter_folder).eval()
    with torch.no_grad():
        first = adapted(input_ids=X).logits
        merged = adapted.merge_and_unload().eval()
        return first, merged(input_ids=X).logits


def test_llama_style_adapter_loads_in_peft(tmp_path, qwen2_folder, chat_file):  # noqa: F811
    from llm_training.train.artifacts import load_trained

    run = tmp_path / "run"
    lora = ["--lora-rank", "4", "--lora-alpha", "32", "--lora-dropout", "0.1", "--learning-rate", "1e-2"]
    finetune(qwen2_folder, chat_file, run, *lora, "--max-steps", "8")
    final, out = run / "checkpoints" / "model_final.pt", tmp_path / "sft_peft"
    proc = export_peft(final, out)
    assert "max logit diff" in proc.stdout and sorted(p.name for p in out.glob("[!.]*")) == [
        "adapter",
        "base",
    ]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    print({k: config[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out")})
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == (
        "LORA",
        "CAUSAL_LM",
        4,
        32,
    )
    assert config["lora_dropout"] == 0.1 and not config["fan_in_fan_out"]
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert config["base_model_name_or_path"] == str((out / "base").resolve())

    ours = load_trained(final).model
    with torch.no_grad():
        reference = ours(X)
    adapted, merged = peft_logits(out / "base", out / "adapter")
    diffs = [(adapted - reference).abs().max().item(), (merged - reference).abs().max().item()]
    # no tokens were added: the base is the starting model, and the adapter fits its own folder too
    original, _ = peft_logits(qwen2_folder, out / "adapter")
    diffs.append((original - reference).abs().max().item())
    print(f"qwen2 LoRA adapter: max abs logit diff PeftModel {diffs[0]:.2e}, merge_and_unload {diffs[1]:.2e}, "
          f"on the original folder {diffs[2]:.2e}; the adapters move logits by {(reference - _base(out)).abs().max():.2e}")  # fmt: skip
    assert max(diffs) < 1e-4

    # the folder is the user's now: a second export needs --overwrite, and a checkpoint without adapters
    # or --prune is refused in one line
    proc = call_cli(export_main, ["--checkpoint", str(final), "--format", "peft", "--output", str(out)])
    assert_user_error(proc, "exists", "--overwrite")
    proc = call_cli(export_main, ["--checkpoint", str(final), "--format", "peft", "--prune", "0.5"])
    assert_user_error(proc, "--prune", "--format hf")


def _base(out) -> torch.Tensor:
    with torch.no_grad():
        return transformers.AutoModelForCausalLM.from_pretrained(out / "base").eval()(input_ids=X).logits


def test_export_refuses_a_checkpoint_without_adapters(tmp_path):
    final, _, _ = train_on_plays(tmp_path / "plain", 2)
    proc = call_cli(
        export_main, ["--checkpoint", str(final), "--format", "peft", "--output", str(tmp_path / "p")]
    )
    assert_user_error(proc, "no LoRA adapters", "--format hf")
    assert not (tmp_path / "p").exists()


@pytest.fixture(scope="module")
def gpt2_lora_run(tmp_path_factory, gpt2_folder, chat_file):  # noqa: F811
    """GPT-2 + ChatML (two tokens added: the embeddings grow and train) with adapters on c_attn and the MLP's
    c_proj only (not the attention's c_proj)."""
    run = tmp_path_factory.mktemp("gpt2_lora") / "run"
    finetune(gpt2_folder, chat_file, run, "--chat-template", "chatml", "--lora-rank", "8", "--lora-alpha", "16",
             "--lora-targets", "qkv,down", "--learning-rate", "1e-2", "--max-steps", "12")  # fmt: skip
    return run


def test_gpt2_adapter_with_grown_vocabulary(tmp_path, gpt2_lora_run, gpt2_folder):  # noqa: F811
    from llm_training.train.artifacts import load_trained

    final, out = gpt2_lora_run / "checkpoints" / "model_final.pt", tmp_path / "gpt2_peft"
    export_peft(final, out)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["c_attn", "mlp.c_proj"] and config["fan_in_fan_out"]
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.05)
    # the base carries the grown vocabulary with its trained rows (the adapter holds the LoRA factors only)
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base")
    start = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
    wte = base.transformer.wte.weight
    assert wte.shape[0] == 50259 and not torch.equal(wte[:50257], start.transformer.wte.weight)
    assert torch.equal(base.transformer.h[0].attn.c_attn.weight, start.transformer.h[0].attn.c_attn.weight)

    with torch.no_grad():
        reference = load_trained(final).model(X)
    adapted, merged = peft_logits(out / "base", out / "adapter")
    diffs = [(adapted - reference).abs().max().item(), (merged - reference).abs().max().item()]
    print(f"gpt2 LoRA adapter: max abs logit diff PeftModel {diffs[0]:.2e}, merge_and_unload {diffs[1]:.2e}")
    assert max(diffs) < 1e-4


def _validation_records(run, chat_file) -> list[dict]:  # noqa: F811
    """The records of ``chat_file`` in the run's validation split, found by their replies."""
    from llm_training.data.tokenizer import Tokenizer

    prepared = run / "prepared_chat"
    tokenizer = Tokenizer.load(prepared / "vocab.json")
    ids, labels = (np.load(prepared / f"validation_{n}.npy") for n in ("ids", "labels"))
    offsets = np.load(prepared / "validation_offsets.npy")
    replies = set()
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        trained = ids[start:end][labels[start:end] != -100].tolist()
        replies.add(tokenizer.backend.decode(trained, skip_special_tokens=True))
    records = [json.loads(x) for x in chat_file.read_text().splitlines()]
    found = [r for r in records if r["messages"][1]["content"] in replies]
    assert len(found) == len(offsets) - 1 == len(replies)
    return found


def test_evaluate_chat_data_equals_the_runs_validation(tmp_path, gpt2_lora_run, gpt2_folder, chat_file):  # noqa: F811
    run = gpt2_lora_run
    step, val_loss = evals(run)[-1]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val_bpb = [r["val_bpb"] for r in rows if "val_bpb" in r][-1]
    assert step == 12
    records = _validation_records(run, chat_file)
    # the same conversations in four of the record formats llm-finetune reads
    forms = {
        "messages": records,
        "prompt_completion": [{"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]}
                              for r in records],
        "alpaca": [{"instruction": r["messages"][0]["content"], "input": "", "output": r["messages"][1]["content"]}
                   for r in records],
        "sharegpt": [{"conversations": [{"from": "human", "value": r["messages"][0]["content"]},
                                        {"from": "gpt", "value": r["messages"][1]["content"]}]} for r in records],
    }  # fmt: skip
    final = run / "checkpoints" / "model_final.pt"
    for name, rows in forms.items():
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = tmp_path / f"{name}.json"
        proc = call_cli(evaluate_main, ["--model-path", str(final), "--test-data", str(data), "--device", "cpu",
                                        "--output", str(out)])  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        result = json.loads(out.read_text())
        print(f"{name}: loss {result['loss']:.6f} bits/byte {result['bits_per_byte']:.6f} over "
              f"{result['tokens']} tokens; the run's final validation loss {val_loss:.6f}, bits/byte {val_bpb:.6f}")  # fmt: skip
        assert result["data_kind"] == "chat" and result["format"] == name
        assert result["examples"] == len(records) and result["truncated"] == result["skipped"] == 0
        assert abs(result["loss"] - val_loss) < 1e-4 and abs(result["bits_per_byte"] - val_bpb) < 1e-4
        assert abs(result["perplexity"] - np.exp(result["loss"])) < 1e-6 * result["perplexity"]

    # a model without a template, or whose tokenizer lacks the template's tokens; preference pairs
    data = tmp_path / "messages.jsonl"
    proc = call_cli(evaluate_main, ["--model-path", str(gpt2_folder), "--test-data", str(data)])
    assert_user_error(proc, "no chat template", "--chat-template")
    proc = call_cli(evaluate_main, ["--model-path", str(gpt2_folder), "--test-data", str(data), "--chat-template",
                                    "chatml"])  # fmt: skip
    assert_user_error(proc, "<|im_start|>", "llm-finetune --chat-template")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "go away"}) + "\n")
    proc = call_cli(evaluate_main, ["--model-path", str(final), "--test-data", str(pairs)])
    assert_user_error(proc, f"{pairs}: line 1", "preference")


def test_evaluate_chat_data_on_a_hugging_face_folder(tmp_path, qwen2_folder, chat_file):  # noqa: F811
    """A Hugging Face folder's own template renders the records; the loss equals one computed independently
    with transformers: the reply's tokens after the rendered prompt, up to and with ``<|im_end|>``."""
    records = [json.loads(x) for x in chat_file.read_text().splitlines()[:10]]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "result.json"
    proc = call_cli(evaluate_main, ["--model-path", str(qwen2_folder), "--test-data", str(data), "--device", "cpu",
                                    "--batch-size", "3", "--output", str(out)])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())

    tok = transformers.AutoTokenizer.from_pretrained(qwen2_folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(qwen2_folder).eval()
    nll, count = 0.0, 0
    for r in records:
        prompt, full = _hf_ids(tok, r["messages"][:1], True), _hf_ids(tok, r["messages"], False)
        assert full[: len(prompt)] == prompt and tok.decode(full[-2:]) == "<|im_end|>\n"
        x = torch.tensor([full[:-2]])  # predicting the reply and <|im_end|> (not the newline after it)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)
        targets = torch.tensor(full[len(prompt) : -1])
        nll -= logp[len(prompt) - 1 :].gather(1, targets[:, None]).sum().item()
        count += len(targets)
    print(f"qwen2 folder on chat records: llm-evaluate loss {result['loss']:.6f} over {result['tokens']} tokens; "
          f"transformers {nll / count:.6f} over {count}")  # fmt: skip
    assert result["tokens"] == count and abs(result["loss"] - nll / count) < 1e-4


def _hf_ids(tok, messages: list[dict], prompt: bool) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]
