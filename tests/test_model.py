"""The transformer in both styles: shapes, causality, learning, generation."""

from __future__ import annotations

import pytest
import torch

from llm_training.config import ModelConfig
from llm_training.model.generate import generate
from llm_training.model.transformer import Transformer

STYLES = ["gpt2", "llama"]


def tiny(style: str, **kw) -> ModelConfig:
    base = dict(
        model_type=style,
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=97,
        max_seq_length=16,
    )
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("style", STYLES)
def test_logits_shape_and_loss(style):
    torch.manual_seed(0)
    model = Transformer(tiny(style))
    ids = torch.randint(0, 97, (3, 16))
    logits = model(ids)
    assert logits.shape == (3, 16, 97)
    loss = model(ids, torch.randint(0, 97, (3, 16)))
    assert (
        loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5
    )  # near uniform at init


@pytest.mark.parametrize("style", STYLES)
def test_causal_future_tokens_do_not_change_the_past(style):
    torch.manual_seed(0)
    model = Transformer(tiny(style)).eval()
    ids = torch.randint(0, 97, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 97
    a, b = model(ids), model(changed)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-5)
    assert not torch.allclose(a[0, 10:], b[0, 10:], atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_overfits_one_batch(style):
    torch.manual_seed(0)
    model = Transformer(tiny(style))
    ids = torch.randint(0, 97, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(ids[:, :-1], ids[:, 1:]).item()
    for _ in range(150):
        loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 < first


def test_grouped_query_attention_and_options():
    cfg = tiny("llama", num_kv_heads=2, qk_norm=True, tie_embeddings=False, bias=True, dropout=0.1)
    model = Transformer(cfg)
    assert model.blocks[0].attn.n_kv == 2
    assert model(torch.randint(0, 97, (2, 8))).shape == (2, 8, 97)
    assert model.lm_head.weight is not model.embed.weight
    tied = Transformer(tiny("gpt2"))
    assert tied.lm_head.weight is tied.embed.weight


def test_head_dim_qkv_bias_and_the_parameter_count_from_the_config():
    """A head size of its own (Qwen3) and biases on q/k/v only (Qwen2): shapes, and footprint's count."""
    from llm_training.model.footprint import parameter_count

    for extra in (
        {"head_dim": 16, "qk_norm": True, "num_kv_heads": 2},
        {"qkv_bias": True},
        {"bias": True, "qkv_bias": False},
    ):
        cfg = tiny("llama", **extra)
        model = Transformer(cfg)
        attn = model.blocks[0].attn
        assert attn.head_dim == extra.get("head_dim", 8) and (attn.qkv.bias is not None) == extra.get(
            "qkv_bias", cfg.bias
        )
        assert (attn.proj.bias is not None) == cfg.bias and model(torch.randint(0, 97, (1, 8))).shape == (
            1,
            8,
            97,
        )
        assert parameter_count(cfg) == model.num_parameters()


def test_from_state_takes_the_tensors_and_ties_as_the_config_says():
    tied = Transformer(tiny("llama"))
    again = Transformer.from_state(tied.cfg, tied.state_dict())
    assert (
        again.lm_head.weight is again.embed.weight
        and again.embed.weight.data_ptr() == tied.embed.weight.data_ptr()
    )
    ids = torch.randint(0, 97, (1, 8))
    assert torch.equal(again(ids), tied(ids))
    untied = Transformer.from_state(tiny("llama", tie_embeddings=False), tied.state_dict())
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr() and torch.equal(
        untied(ids), tied(ids)
    )


def test_parameter_and_flop_counts():
    model = Transformer(tiny("gpt2"))
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    non_embed = model.num_parameters(non_embedding=True)
    assert non_embed == model.num_parameters() - 97 * 32 - 16 * 32
    assert model.flops_per_token() == 6 * (non_embed + 97 * 32) + 12 * 2 * 32 * 16


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="longer than the context"):
        Transformer(tiny("gpt2"))(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("style", STYLES)
def test_generate_extends_and_is_reproducible(style):
    torch.manual_seed(0)
    model = Transformer(tiny(style))
    prompt = torch.randint(0, 97, (2, 5))
    a = generate(model, prompt, 20, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompt, 20, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 25) and torch.equal(a, b) and torch.equal(a[:, :5], prompt)
    greedy = generate(model, prompt, 3, temperature=0)
    assert torch.equal(greedy[:, 5], model(prompt)[:, -1].argmax(-1))
