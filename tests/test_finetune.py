"""Chat SFT with ``llm-finetune``: a tiny random Qwen2 (ChatML template and tokens in its tokenizer) and a
GPT-2 base model (no template: --chat-template chatml adds the tokens and grows the embeddings), each made by
transformers beside GPT-2's real tokenizer, fine-tuned on Shakespeare lines as user/assistant turns. Checks:
the assistant-token validation loss falls, the prepared labels train exactly the replies and their end
marker, --resume auto continues, the Hugging Face export gives transformers our logits and carries the
template, and bad inputs are one line each."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import REPO, assert_user_error, call_cli, corpus_records, run_cli
from llm_training.cli.finetune import main as finetune_main
from llm_training.data.chat_template import CHATML

transformers = pytest.importorskip("transformers")

GPT2_FILES = REPO.parent / "shared" / "tokenizers" / "gpt2"
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "max_position_embeddings": 128, "tie_word_embeddings": True}  # fmt: skip
QUICK = ["--batch-size", "8", "--num-epochs", "5", "--learning-rate", "3e-3", "--device", "cpu", "--set", "training.eval_interval=10",
         "--set", "training.eval_batches=2", "--set", "training.sample_tokens=8", "--set", "training.log_interval=5",
         "--set", "logging.tensorboard=false", "--set", "training.warmup_steps=3"]  # fmt: skip


def gpt2_tokenizer(chatml: bool):
    if not GPT2_FILES.is_dir():
        pytest.skip(f"{GPT2_FILES} not present")
    vocab = json.loads((GPT2_FILES / "encoder.json").read_text())
    lines = (GPT2_FILES / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    tok = transformers.GPT2TokenizerFast(vocab=vocab, merges=[tuple(x.split(" ")) for x in lines if x])
    if chatml:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.eos_token, tok.chat_template = "<|im_end|>", CHATML
    return tok


def save_model(model, tokenizer, folder):
    torch.manual_seed(0)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory):
    """A random Qwen2 chat model: ChatML's tokens in its tokenizer (50,259 ids, 50,259 rows) and template."""
    tok = gpt2_tokenizer(chatml=True)
    config = transformers.Qwen2Config(**SMALL, vocab_size=len(tok))
    torch.manual_seed(0)  # the same random model whichever test asks first
    return save_model(transformers.Qwen2ForCausalLM(config), tok, tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A random GPT-2 base model: no chat template, no ChatML tokens (dropout 0.1, transformers' default)."""
    tok = gpt2_tokenizer(chatml=False)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=128)
    torch.manual_seed(0)
    return save_model(transformers.GPT2LMHeadModel(config), tok, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    """Consecutive lines of a play as a user's line and the assistant's answer (``messages`` records)."""
    text = corpus_records("shakespeare", 1, lambda r: r["id"].endswith("_gut"))[0]["text"]
    lines = [x.strip() for x in text[5_000:60_000].splitlines() if len(x.strip()) > 20][:400]
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for user, reply in zip(lines[0::2], lines[1::2], strict=False):
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def evals(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def finetune(model, data, out, *extra):
    args = ["-m", "llm_training.cli.finetune", "--model", str(model), "--data", str(data), "--output-dir",
            str(out), *QUICK, *extra]  # fmt: skip
    proc = run_cli(args, out.parent, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    return proc


def test_qwen2_sft_resume_export(tmp_path, qwen2_folder, chat_file):
    run = tmp_path / "run"
    proc = finetune(qwen2_folder, chat_file, run, "--max-steps", "30")
    first, last = evals(run)[0], evals(run)[-1]
    print(
        f"qwen2 assistant-token validation loss: step {first[0]} {first[1]:.3f} -> step {last[0]} {last[1]:.3f}"
    )
    assert first[0] == 0 and last[0] == 30 and last[1] < first[1] - 1.0
    assert "<|im_start|>assistant" in proc.stdout  # the sample: the prompt with its markup, then the reply

    # the labels train the assistant's reply and its end marker, nothing of the prompt
    prepared = run / "prepared_chat"
    manifest = json.loads((prepared / "train.json").read_text())
    assert manifest["kind"] == "chat" and manifest["num_items"] >= 150
    ids, labels = (np.load(prepared / f"train_{n}.npy") for n in ("ids", "labels"))
    offsets = np.load(prepared / "train_offsets.npy")
    tok = transformers.AutoTokenizer.from_pretrained(qwen2_folder)
    replies = {json.loads(x)["messages"][1]["content"] for x in chat_file.read_text().splitlines()}
    for i in range(3):
        span = slice(offsets[i], offsets[i + 1])
        trained = tok.decode(ids[span][labels[span] != -100])
        assert trained.endswith("<|im_end|>") and trained.removesuffix("<|im_end|>") in replies, trained
        assert (labels[span][labels[span] != -100] == ids[span][labels[span] != -100]).all()

    # --resume auto continues from the final checkpoint of step 30 and re-uses the prepared data
    mtime = (prepared / "train_ids.npy").stat().st_mtime_ns
    finetune(qwen2_folder, chat_file, run, "--max-steps", "40", "--resume", "auto")
    steps = [json.loads(x).get("step") for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 40 and evals(run)[-1][0] == 40
    assert (prepared / "train_ids.npy").stat().st_mtime_ns == mtime

    # llm-export --format hf: transformers' logits equal ours, and its tokenizer carries the template
    final = run / "checkpoints" / "model_final.pt"
    export = tmp_path / "hf"
    proc = run_cli(["-m", "llm_training.cli.export", "--checkpoint", str(final), "--format", "hf",
                    "--output", str(export)], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    from llm_training.train.artifacts import load_trained

    ours = load_trained(final)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)
    assert hf_tok.chat_template == CHATML
    chat = [{"role": "user", "content": "What say you, my lord?"}]
    text = hf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    x = torch.tensor([hf_tok(text, add_special_tokens=False)["input_ids"]])
    assert x[0, 0].item() == tok.convert_tokens_to_ids("<|im_start|>")
    with torch.no_grad():
        diff = (ours.model(x) - theirs(x).logits).abs().max().item()
    print(f"qwen2 export: max abs logit difference {diff:.2e}")
    assert diff < 1e-4


def test_gpt2_base_with_chatml(tmp_path, gpt2_folder, chat_file):
    run = tmp_path / "run"
    finetune(gpt2_folder, chat_file, run, "--chat-template", "chatml", "--max-steps", "20")
    first, last = evals(run)[0], evals(run)[-1]
    print(f"gpt2 + chatml validation loss: {first[1]:.3f} -> {last[1]:.3f}")
    assert last[1] < first[1] - 1.0
    state = torch.load(run / "checkpoints" / "model_final.pt", weights_only=True)
    assert state["config"]["model"]["vocab_size"] == 50259  # grown by ChatML's two tokens
    assert state["model_kind"] == "text" and state["config"]["finetune"]["template"] == CHATML
    # the export: transformers' logits over the grown vocabulary equal ours, and generate() stops at the end
    # of a turn (<|im_end|>) as well as at the base model's end-of-text
    final, export = run / "checkpoints" / "model_final.pt", tmp_path / "hf"
    proc = run_cli(["-m", "llm_training.cli.export", "--checkpoint", str(final), "--format", "hf",
                    "--output", str(export)], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    from llm_training.train.artifacts import load_trained

    x = torch.tensor([[50257, 882, 198, 15496, 50258, 198, 50257, 562]])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    with torch.no_grad():
        diff = (load_trained(final).model(x) - theirs(x).logits).abs().max().item()
    print(f"gpt2 + chatml export: max abs logit difference {diff:.2e}")
    assert diff < 1e-4 and theirs.generation_config.eos_token_id == [50256, 50258]


def test_api_finetunes_a_checkpoint(tmp_path, gpt2_folder, chat_file):
    """Trainer.finetune on the same core; a .pt checkpoint of a fine-tuning is fine-tuned further with the
    template it recorded (no --chat-template needed)."""
    from llm_training.api.trainer import Trainer

    settings = {"batch_size": 8, "learning_rate": 3e-3, "eval_interval": 5, "eval_batches": 2, "sample_tokens": 0,
                "resources.device": "cpu", "logging.tensorboard": False, "logging.progress_bar": False}  # fmt: skip
    first = Trainer(output_dir=str(tmp_path / "a")).finetune(
        str(gpt2_folder), str(chat_file), chat_template="chatml", max_steps=5, **settings
    )
    second = Trainer(output_dir=str(tmp_path / "b")).finetune(
        first.final_checkpoint, str(chat_file), max_steps=5, **settings
    )
    assert second.steps == 5 and second.val_loss < first.first_val_loss


def test_bad_inputs_are_one_line(tmp_path, gpt2_folder, chat_file):
    out = ["--output-dir", str(tmp_path / "run")]
    proc = call_cli(finetune_main, ["--model", str(tmp_path / "nope"), "--data", str(chat_file), *out])
    assert_user_error(proc, "model not found")
    (tmp_path / "empty").mkdir()
    proc = call_cli(finetune_main, ["--model", str(tmp_path / "empty"), "--data", str(chat_file), *out])
    assert_user_error(proc, "not a Hugging Face model folder")
    proc = call_cli(finetune_main, ["--model", str(gpt2_folder), "--data", str(chat_file), *out])
    assert_user_error(proc, "no chat template", "--chat-template chatml")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"nothing": 1}\n')
    proc = call_cli(finetune_main, ["--model", str(gpt2_folder), "--data", str(bad), "--chat-template", "chatml",
                                    *out])  # fmt: skip
    assert_user_error(proc, str(bad))
    proc = call_cli(finetune_main, ["--model", str(gpt2_folder), "--data", str(tmp_path / "missing.jsonl"),
                                    "--chat-template", "chatml", *out])  # fmt: skip
    assert_user_error(proc, "missing.jsonl")
    model_key = ["--set", "model.num_layers=4"]
    proc = call_cli(finetune_main, ["--model", str(gpt2_folder), "--data", str(chat_file), *model_key, *out])
    assert_user_error(proc, "model.num_layers", "architecture of --model")
    proc = call_cli(
        finetune_main, ["--model", str(gpt2_folder), "--data", str(chat_file), "--method", "ppo", *out]
    )
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    # a prepared_chat folder holding the user's own files is not replaced
    (tmp_path / "run" / "prepared_chat").mkdir(parents=True)
    (tmp_path / "run" / "prepared_chat" / "mine.txt").write_text("keep me")
    proc = call_cli(finetune_main, ["--model", str(gpt2_folder), "--data", str(chat_file), "--chat-template",
                                    "chatml", *out])  # fmt: skip
    assert_user_error(proc, "did not write")
    assert (tmp_path / "run" / "prepared_chat" / "mine.txt").read_text() == "keep me"
    shutil.rmtree(tmp_path / "run")


def test_lora_adapters_resume_and_merge_for_every_reader(tmp_path, qwen2_folder, chat_file):
    """--lora-rank: only the adapters train (the base weights in the checkpoint are the model's own), a resume
    continues them, and every reader sees the merged model: load_trained's logits equal the adapted model's,
    and the Hugging Face export's equal both."""
    pytest.importorskip("peft")
    from llm_training.export.hf_import import load_hf
    from llm_training.train.artifacts import load_trained
    from llm_training.train.lora import add_lora

    run = tmp_path / "run"
    lora = ["--lora-rank", "8", "--lora-alpha", "64", "--learning-rate", "1e-2"]
    proc = finetune(qwen2_folder, chat_file, run, *lora, "--max-steps", "15")
    assert "note: LoRA rank 8" in proc.stdout
    finetune(qwen2_folder, chat_file, run, *lora, "--max-steps", "20", "--resume", "auto")
    first, last = evals(run)[0], evals(run)[-1]
    print(f"qwen2 LoRA validation loss: step {first[0]} {first[1]:.3f} -> step {last[0]} {last[1]:.3f}")
    # a random model's tied embeddings (std 0.02) cap its logits near 1, which adapters on the blocks cannot
    # raise: the loss falls little (full fine-tuning moves the embeddings themselves), but it falls
    assert last[0] == 20 and last[1] < first[1] - 0.05

    final = run / "checkpoints" / "model_final.pt"
    state = torch.load(final, weights_only=True)["model"]
    base, _ = load_hf(qwen2_folder)
    original = base.state_dict()
    assert torch.equal(state["blocks.0.attn.qkv.base_layer.weight"], original["blocks.0.attn.qkv.weight"])
    assert torch.equal(state["embed.weight"], original["embed.weight"])
    assert state["blocks.1.mlp.down.lora_B.default.weight"].abs().max() > 0  # the adapters moved

    x = torch.tensor([[11, 502, 1234, 50257, 7, 99, 3000, 50258, 42]])
    add_lora(base, 8, 64.0, 0.0, "qkv,proj,up,down")
    base.load_state_dict(state)
    merged = load_trained(final).model
    with torch.no_grad():
        adapted, ours = base.eval()(x), merged(x)
    assert (adapted - ours).abs().max().item() < 1e-4
    export = tmp_path / "hf"
    proc = run_cli(["-m", "llm_training.cli.export", "--checkpoint", str(final), "--format", "hf",
                    "--output", str(export)], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        diff = (transformers.AutoModelForCausalLM.from_pretrained(export).eval()(x).logits - ours).abs().max()
    print(f"qwen2 LoRA export: max abs logit difference {diff.item():.2e}")
    assert diff.item() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_cuda_bf16_compiled(tmp_path, qwen2_folder, chat_file, lora):
    """On a GPU (bf16 autocast, torch.compile): the loss falls, and the result exports with transformers'
    logits equal to ours (compared on the CPU in fp32)."""
    run = tmp_path / "run"
    extra = ["--lora-rank", "8", "--lora-alpha", "64", "--learning-rate", "1e-2"] if lora else []
    proc = finetune(qwen2_folder, chat_file, run, "--max-steps", "30", "--device", "cuda", *extra)
    assert "on cuda" in proc.stdout and "(bf16)" in proc.stdout
    first, last = evals(run)[0], evals(run)[-1]
    print(f"cuda {'LoRA' if lora else 'full'}: validation loss {first[1]:.3f} -> {last[1]:.3f}")
    assert last[1] < first[1] - (0.05 if lora else 1.0)
    final, export = run / "checkpoints" / "model_final.pt", tmp_path / "hf"
    proc = run_cli(["-m", "llm_training.cli.export", "--checkpoint", str(final), "--format", "hf",
                    "--output", str(export)], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    from llm_training.train.artifacts import load_trained

    x = torch.tensor([[50257, 882, 198, 15496, 50258, 198, 50257, 562]])
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(export).eval()(x).logits
        diff = (load_trained(final).model(x) - theirs).abs().max().item()
    print(f"cuda {'LoRA' if lora else 'full'} export: max abs logit difference {diff:.2e}")
    assert diff < 1e-4


def test_prepared_batches_shift_labels_and_pad(tmp_path, chat_file, monkeypatch):
    """In process: batches are ids[:-1] against labels[1:], right-padded with the pad id and -100; bits per
    byte count the trained text; --train-on-prompt trains every token after the first; a too-long example is
    cut to max_length and counted; an unchanged folder is re-used."""
    from llm_training.api.finetune import prepare_chat_data
    from llm_training.config import load_config
    from llm_training.data import chat_prepare
    from llm_training.data.chat import add_template_tokens
    from llm_training.data.chat_prepare import ChatDataset
    from llm_training.data.chat_template import load_chat_template
    from llm_training.data.tokenizer import Tokenizer

    gpt2_tokenizer(chatml=False)  # skips without the tokenizer files
    tokenizer = Tokenizer.load(GPT2_FILES)
    template = load_chat_template("chatml")
    add_template_tokens(tokenizer, template)
    cfg = load_config(cli={"output_dir": str(tmp_path / "a"), "model.max_seq_length": 40, "data.seed": 3},
                      environ={}, default_file=None)  # fmt: skip
    folder, note = prepare_chat_data(cfg, chat_file, tokenizer, template)
    assert note.startswith("prepared 200 of 200") and "truncated" in note
    assert prepare_chat_data(cfg, chat_file, tokenizer, template)[1].startswith("re-used")
    report = json.loads((folder / "prepare_report.json").read_text())
    assert report["encoding"]["truncated"] > 0 and report["end_of_turn"] == "<|im_end|>"
    data = ChatDataset(folder / "train.json", 64)
    assert data.seq_len == 39  # the longest example (40 after truncation) less one
    batch = data.batch([0, 1])
    shortest = sorted(range(data.num_windows), key=lambda i: len(data.example(i)[0]))[:2]
    width = -(-max(len(data.example(i)[0]) - 1 for i in shortest) // 8) * 8
    monkeypatch.setattr(chat_prepare, "PAD_MULTIPLE", 8)  # a batch is as wide as its longest, in steps of 8
    assert width < 39 and data.batch(shortest)["input_ids"].shape[1] == width
    for row in range(2):
        ids, labels = data.example(row)
        n = len(ids) - 1
        assert batch["input_ids"][row, :n].tolist() == ids[:-1].tolist()
        assert batch["labels"][row, :n].tolist() == labels[1:].tolist()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_id).all() and (
            batch["labels"][row, n:] == -100
        ).all()
        trained = labels[labels != -100]
        assert len(trained) and (trained == ids[labels != -100]).all()
    text_bytes = data.manifest["num_bytes"] / data.manifest["num_trained_tokens"]
    assert (
        data.bytes_per_token == text_bytes and 2 < text_bytes < 6
    )  # English words, and <|im_end|> as 0 bytes

    cfg.output_dir, cfg.finetune.train_on_prompt = str(tmp_path / "b"), True
    everything = ChatDataset(prepare_chat_data(cfg, chat_file, tokenizer, template)[0] / "train.json", 64)
    ids, labels = everything.example(0)
    assert (labels[1:] == ids[1:]).all()
