"""The Hugging Face format, checked with the real ``transformers``: AutoModelForCausalLM and AutoTokenizer
load the folder as it is, give our logits and our token ids, and the folder imports back exactly."""

from __future__ import annotations

import pytest
import torch

from conftest import corpus_records
from llm_training.config import ModelConfig
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import UserError
from llm_training.export.hf import load_hf, save_hf
from llm_training.model.transformer import Transformer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tokenizer():
    text = [r["text"][:50_000] for r in corpus_records("shakespeare", 3)]
    return Tokenizer.train(text, 400)


def model_of(style: str, vocab: int, **extra) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(model_type=style, num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=vocab,
                      max_seq_length=64, **extra)  # fmt: skip
    model = Transformer(cfg).eval()
    with torch.no_grad():  # trained-looking weights: non-trivial norms and biases
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


CASES = [("gpt2", {}), ("gpt2", {"bias": True, "tie_embeddings": False}), ("llama", {"num_kv_heads": 2}),
         ("llama", {"bias": True, "tie_embeddings": False}),
         ("llama", {"qkv_bias": True, "head_dim": 8, "rope_type": "llama3", "rope_factor": 8.0,
                    "rope_original_context": 16}),
         ("llama", {"qk_norm": True, "num_kv_heads": 2, "head_dim": 32, "rope_type": "linear", "rope_factor": 2.0})]  # fmt: skip
CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qkv_bias": "Qwen2ForCausalLM",
           "qk_norm": "Qwen3ForCausalLM"}  # fmt: skip


@pytest.mark.parametrize("style, extra", CASES)
def test_transformers_loads_the_folder_with_the_same_logits_and_tokens(tmp_path, tokenizer, style, extra):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = model_of(style, 448, **extra)
    folder = save_hf(model, tokenizer, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    kind = next((key for key in ("qk_norm", "qkv_bias") if key in extra), style)
    assert type(hf).__name__ == CLASSES[kind]
    text = "To be, or not to be, that is the question"
    hf_tok = AutoTokenizer.from_pretrained(folder)
    assert hf_tok.encode(text) == tokenizer.encode(text) and hf_tok.decode(tokenizer.encode(text)) == text
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max() < 1e-4
    # and back: the folder imports to the same model
    back, back_tok = load_hf(folder)
    assert torch.equal(back.eval()(ids), ours) and back_tok.encode(text) == tokenizer.encode(text)


def test_model_initializer_continues_from_a_pretrained_folder(tmp_path, tokenizer):
    from llm_training import ModelInitializer, ModelInitializerInput

    model = model_of("llama", 448)
    save_hf(model, tokenizer, tmp_path / "hf")
    out = ModelInitializer().initialize(
        ModelInitializerInput(initialization={"method": "pretrained", "path": str(tmp_path / "hf")})
    )
    ids = torch.tensor([[5, 9, 33, 2]])
    assert torch.equal(out.model.eval()(ids), model(ids))


def test_unsupported_shapes_and_folders_are_refused(tmp_path, tokenizer):
    with pytest.raises(UserError, match="these biases .* and QK-norm has no transformers class"):
        save_hf(model_of("llama", 448, qk_norm=True, bias=True), tokenizer, tmp_path / "a")
    with pytest.raises(UserError, match="grouped-query attention or QK-norm has no transformers class"):
        save_hf(model_of("gpt2", 448, num_kv_heads=2), tokenizer, tmp_path / "b")
    with pytest.raises(UserError, match="no config.json"):
        load_hf(tmp_path)
