"""Sequence packing in chat SFT: a packed window's loss (and gradients) equal the sum of its examples' run
one at a time, for a RoPE (Qwen2-style) and a learned-position (GPT-2-style) model, with activation
checkpointing and the chunked loss too; the packed datasets keep every example whole and count the same
trained tokens as padding; ``llm-finetune --packing`` trains (assistant-token loss falls) and resumes.

The chat data and tiny Hugging Face models are test_finetune's (lines of a play as user/assistant turns)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_finetune import GPT2_FILES, chat_file, evals, finetune, gpt2_tokenizer, qwen2_folder  # noqa: F401

from llm_training.config import ModelConfig, load_config
from llm_training.model.transformer import Transformer

QWEN2 = {"model_type": "llama", "num_kv_heads": 2, "qkv_bias": True, "rope_theta": 1e6}
GPT2 = {"model_type": "gpt2", "bias": True}
WINDOW = 128  # input tokens a packed window (the models' context): several of the play's exchanges each


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, chat_file):  # noqa: F811
    """The chat file prepared in GPT-2's tokenizer with ChatML (examples at most 128 tokens)."""
    from llm_training.api.finetune import prepare_chat_data
    from llm_training.data.chat import add_template_tokens
    from llm_training.data.chat_template import load_chat_template
    from llm_training.data.tokenizer import Tokenizer

    gpt2_tokenizer(chatml=False)  # skips without the tokenizer files
    tokenizer = Tokenizer.load(GPT2_FILES)
    template = load_chat_template("chatml")
    add_template_tokens(tokenizer, template)
    out = tmp_path_factory.mktemp("prepared")
    cfg = load_config(
        cli={"output_dir": str(out), "model.max_seq_length": 128}, environ={}, default_file=None
    )
    return prepare_chat_data(cfg, chat_file, tokenizer, template)[0], tokenizer.vocab_size


def tiny(style: dict, vocab: int, **more) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, max_seq_length=128, vocab_size=vocab,
                      tie_embeddings=False, **style, **more)  # fmt: skip
    return Transformer(cfg).float().train()


def gradients(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize(
    "name, style, more",
    [("qwen2", QWEN2, {}), ("gpt2", GPT2, {}),
     ("qwen2 checkpointed, chunked loss", QWEN2, {"activation_checkpointing": True, "loss_chunk_tokens": 40})],
)  # fmt: skip
def test_packed_loss_equals_examples_alone(prepared, name, style, more):
    """Over the two packed windows holding the most examples: the summed loss equals the sum of the losses
    of their examples run one at a time, unpadded (ids[:-1] against labels[1:]), so do the gradients and
    each example's logits. Without the segment ids (one causal sequence) the loss differs: attention and
    positions would cross examples."""
    from llm_training.data.chat_prepare import PackedChatDataset

    folder, vocab = prepared
    data = PackedChatDataset(folder / "train.json", WINDOW)
    model = tiny(style, vocab, **more)
    windows = sorted(range(data.num_windows), key=lambda w: -len(data.plan[w]))[:2]
    batch = data.batch(windows)
    count = (batch["labels"] != -100).sum()
    packed = model(**batch) * count
    packed.backward()
    packed_grads = gradients(model)
    with torch.no_grad():
        packed_logits = model(batch["input_ids"], position_ids=batch["position_ids"],
                              segment_ids=batch["segment_ids"])  # fmt: skip

    alone, logit_diff, members = torch.zeros(()), 0.0, 0
    for row, window in enumerate(windows):
        start = 0
        for index in data.plan[window]:
            ids, labels = (torch.from_numpy(a) for a in data.example(index))
            loss = model(ids[None, :-1], labels[None, 1:]) * (labels[1:] != -100).sum()
            loss.backward()
            alone += loss.detach()
            with torch.no_grad():
                own = model(ids[None, :-1])[0]
            logit_diff = max(
                logit_diff, (packed_logits[row, start : start + len(ids) - 1] - own).abs().max().item()
            )
            start, members = start + len(ids), members + 1
    alone_grads = gradients(model)
    assert members >= 8 and set(packed_grads) == set(alone_grads)

    diff = (packed.detach() - alone).abs().item()
    grad_diff = max((packed_grads[n] - alone_grads[n]).abs().max().item() for n in packed_grads)
    print(f"{name}: {members} examples in 2 windows, {int(count)} trained tokens; summed loss packed "
          f"{packed.item():.4f}, alone {alone.item():.4f}: max abs diff {diff:.2e} ({diff / count:.1e} a token); "
          f"logits {logit_diff:.2e}; gradients {grad_diff:.2e}")  # fmt: skip
    assert diff / count < 1e-5 and logit_diff < 1e-5 and grad_diff < 1e-5

    with torch.no_grad():  # one causal sequence a window, positions running on: not the examples' logits
        crossing = (model(batch["input_ids"]) - packed_logits).abs().max().item()
    print(f"  without segment ids and positions: logits differ by up to {crossing:.2e}")
    assert crossing > 100 * max(logit_diff, 1e-7)


def test_packed_windows_hold_every_example_once(prepared):
    """Every example is in exactly one window, whole, at its own positions; the padding and the first token
    of each example train nothing; packed and padded batches count the same trained tokens (the loss
    averages over those in both, so an epoch's mean loss is the same) in fewer windows than examples."""
    from llm_training.data.chat_prepare import ChatDataset, PackedChatDataset

    folder, _ = prepared
    packed, padded = (
        PackedChatDataset(folder / "train.json", WINDOW),
        ChatDataset(folder / "train.json", WINDOW),
    )
    assert sorted(i for members in packed.plan for i in members) == list(range(padded.num_windows))
    assert packed.num_windows < padded.num_windows / 2 and packed.seq_len == WINDOW
    batch = packed.batch(range(packed.num_windows))
    assert all(t.shape == (packed.num_windows, WINDOW) for t in batch.values())
    trained = int((batch["labels"] != -100).sum())
    assert (
        trained
        == packed.manifest["num_trained_tokens"]
        == int((padded.batch(range(padded.num_windows))["labels"] != -100).sum())
    )
    for row, members in enumerate(packed.plan):
        start = 0
        for segment, index in enumerate(members):
            ids, labels = packed.example(index)
            span = slice(start, start + len(ids) - 1)  # the inputs: the last token predicts nothing
            assert batch["input_ids"][row, span].tolist() == ids[:-1].tolist()
            assert batch["labels"][row, span].tolist() == labels[1:].tolist()
            assert batch["position_ids"][row, span].tolist() == list(range(len(ids) - 1))
            assert (batch["segment_ids"][row, span] == segment).all()
            start += len(ids)
        assert (batch["segment_ids"][row, start:] == -1).all() and (
            batch["labels"][row, start - 1 :] == -100
        ).all()


def test_flex_attention_in_a_compiled_model_equals_the_sdpa_mask(prepared):
    """The CUDA path: FlexAttention inside a compiled model gives the logits of SDPA's boolean mask, and on
    CUDA the same loss and gradients (FlexAttention has no backward on a CPU: logits only there)."""
    from llm_training.data.chat_prepare import PackedChatDataset
    from llm_training.model.packed_attention import flex_available

    if not flex_available():
        pytest.skip("this torch has no FlexAttention")
    folder, vocab = prepared
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = PackedChatDataset(folder / "train.json", WINDOW).batch([0, 1, 2])
    batch = {k: v.to(device) for k, v in batch.items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    results = {}
    for backend in ("sdpa", "flex"):
        model = tiny(QWEN2, vocab).to(device)
        model.attention_backend = backend
        run = torch.compile(model) if backend == "flex" else model
        with torch.no_grad():
            logits = run(**inputs)
        grads = {}
        if device == "cuda":
            run(**batch).backward()
            grads = gradients(model)
        results[backend] = logits, grads
    diff = (results["flex"][0] - results["sdpa"][0]).abs().max().item()
    grad_diff = max(
        [(results["flex"][1][n] - g).abs().max().item() for n, g in results["sdpa"][1].items()] or [0]
    )
    print(f"{device}: compiled FlexAttention against the SDPA mask: logits differ by up to {diff:.2e}, "
          f"gradients {grad_diff:.2e}")  # fmt: skip
    assert diff < 1e-4 and grad_diff < 1e-4


def test_finetune_with_packing_trains_and_resumes(tmp_path, qwen2_folder, chat_file):  # noqa: F811
    """``llm-finetune --packing``: the assistant-token validation loss falls, the run says what was packed,
    a step is 4 windows of the model's context, and ``Trainer.finetune(packing=True, resume="auto")``
    continues to the new step count."""
    run, packing = tmp_path / "run", ["--packing", "--batch-size", "4"]
    proc = finetune(qwen2_folder, chat_file, run, *packing, "--max-steps", "16")
    assert "packed 190 training examples into" in proc.stdout and "windows of 128 tokens" in proc.stdout
    first, last = evals(run)[0], evals(run)[-1]
    print(f"qwen2 packed: assistant-token validation loss step {first[0]} {first[1]:.3f} -> step {last[0]} "
          f"{last[1]:.3f}")  # fmt: skip
    assert first[0] == 0 and last[0] == 16 and last[1] < first[1] - 1.0
    state = torch.load(run / "checkpoints" / "model_final.pt", weights_only=True)
    assert state["config"]["finetune"]["packing"] is True
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows if r.get("step") == 16 and "tokens" in r][-1] == 16 * 4 * 128
    # Trainer.finetune(packing=True) resumes it in this process, to step 18
    from llm_training.api.trainer import Trainer

    quick = {"batch_size": 4, "num_epochs": 5, "learning_rate": 3e-3, "eval_interval": 10, "eval_batches": 2,
             "sample_tokens": 0, "warmup_steps": 3, "resources.device": "cpu", "logging.tensorboard": False,
             "logging.progress_bar": False}  # fmt: skip
    result = Trainer(output_dir=str(run)).finetune(
        str(qwen2_folder), str(chat_file), packing=True, resume="auto", max_steps=18, **quick
    )
    assert result.steps == 18 and evals(run)[-1][0] == 18 and np.isfinite(evals(run)[-1][1])
    assert any(note.startswith("packed 190 training examples") for note in result.notes)
