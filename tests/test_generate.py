"""Generation: the KV cache gives the same tokens as recomputing, batches of different lengths match single
prompts, and each sampling control does what it says."""

from __future__ import annotations

import logging

import pytest
import torch

from llm_training.config import ModelConfig
from llm_training.model.generate import Sampling, fit_prompt, generate_tokens
from llm_training.model.transformer import KVCache, Transformer


def model_of(style: str, **extra) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(model_type=style, num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=97,
                      max_seq_length=48, **extra)  # fmt: skip
    return Transformer(cfg).eval()


PROMPTS = [[5, 17, 3, 44, 9, 12, 30], [8], [60, 2, 71, 15]]
GREEDY = Sampling(max_new_tokens=12, temperature=0)


@pytest.mark.parametrize(
    "style, extra", [("gpt2", {}), ("llama", {}), ("llama", {"num_kv_heads": 2, "qk_norm": True})]
)
def test_cache_matches_recomputing_and_batches_match_single_prompts(style, extra):
    model = model_of(style, **extra)
    cached = generate_tokens(model, PROMPTS, GREEDY)
    assert cached == generate_tokens(model, PROMPTS, GREEDY, use_cache=False)
    assert cached == [generate_tokens(model, [p], GREEDY)[0] for p in PROMPTS]
    assert all(len(row) == 12 for row in cached)


def test_cached_logits_equal_the_full_forward():
    model = model_of("llama")
    ids = torch.tensor([[5, 17, 3, 44, 9, 12]])
    full = model(ids)
    cache = KVCache(model, 1, 6, torch.device("cpu"))
    cache.step(torch.ones(1, 4, dtype=torch.bool))
    first = model(ids[:, :4], cache=cache)
    cache.advance()
    cache.step(torch.ones(1, 2, dtype=torch.bool))
    second = model(ids[:, 4:], cache=cache)
    assert torch.allclose(torch.cat([first, second], 1), full, atol=1e-5)


def test_sampling_controls():
    model = model_of("gpt2")
    sampled = Sampling(max_new_tokens=10, temperature=1.0, seed=3)
    a = generate_tokens(model, PROMPTS, sampled)
    assert a == generate_tokens(model, PROMPTS, sampled)  # the seed makes it reproducible
    assert a != generate_tokens(model, PROMPTS, Sampling(max_new_tokens=10, temperature=1.0, seed=4))
    greedy = generate_tokens(model, PROMPTS, Sampling(max_new_tokens=10, temperature=0))
    assert (
        generate_tokens(model, PROMPTS, Sampling(max_new_tokens=10, temperature=1.0, top_k=1, seed=5))
        == greedy
    )
    assert (
        generate_tokens(model, PROMPTS, Sampling(max_new_tokens=10, temperature=1.0, top_p=1e-6, seed=5))
        == greedy
    )
    no_repeats = generate_tokens(
        model, [[1]], Sampling(max_new_tokens=30, temperature=0, repetition_penalty=1e6)
    )[0]
    assert len(set(no_repeats)) == len(no_repeats) and 1 not in no_repeats
    with pytest.raises(ValueError, match="top_p"):
        generate_tokens(model, PROMPTS, Sampling(top_p=0))


def test_end_of_text_stop_sequences_and_stop_check():
    model = model_of("llama")
    distinct = Sampling(max_new_tokens=12, temperature=0, repetition_penalty=1e6)  # no token twice
    greedy = generate_tokens(model, [PROMPTS[0]], distinct)[0]
    eos = greedy[3]
    assert generate_tokens(model, [PROMPTS[0]], distinct, eos_id=eos)[0] == greedy[:3]
    assert generate_tokens(model, [PROMPTS[0]], distinct, stop_ids=[greedy[4:6]])[0] == greedy[:4]
    cut_at_five = generate_tokens(
        model, [PROMPTS[0]], distinct, stop_check=lambda out: 1 if len(out) == 5 else 0
    )
    assert cut_at_five[0] == greedy[:4]


def test_long_prompts_are_cut_from_the_left_or_refused(caplog):
    model = model_of("llama")
    long = list(range(1, 60))
    with caplog.at_level(logging.WARNING, logger="llm_training.generate"):
        out = generate_tokens(model, [long], GREEDY)
    assert len(out[0]) == 12 and "cut to its last 47" in caplog.text
    assert fit_prompt(long, 12, 48) == long[-36:]
    with pytest.raises(ValueError, match="exceeds the context of 48"):
        generate_tokens(model, [long], GREEDY, truncate=False)
    assert generate_tokens(model, [], GREEDY) == []


def test_generation_slides_past_the_context():
    model = model_of("llama")
    long = Sampling(max_new_tokens=80, temperature=0)
    cached, recomputed = (
        generate_tokens(model, PROMPTS, long),
        generate_tokens(model, PROMPTS, long, use_cache=False),
    )
    assert [len(r) for r in cached] == [80, 80, 80]
    # identical until the first row fills the context (48 - 7 prompt tokens); then the cache restarts from the
    # recent half while recomputing keeps a full window
    assert [r[:41] for r in cached] == [r[:41] for r in recomputed]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_cuda_graph_decoding_matches_eager(style):
    """Decoding steps replayed as CUDA graphs give the eager steps' tokens, also across a context slide
    (which starts a new cache and a new graph) and with prompts of different lengths."""
    model = model_of(style, num_kv_heads=2 if style == "llama" else None).cuda()
    sampling = Sampling(max_new_tokens=70, temperature=0)  # past the context of 48: the window slides
    graphed = generate_tokens(model, PROMPTS, sampling, cuda_graphs=True)
    eager = generate_tokens(model, PROMPTS, sampling, cuda_graphs=False)
    assert graphed == eager and all(len(row) == 70 for row in graphed)
    seeded = Sampling(max_new_tokens=20, temperature=0.9, top_k=20, seed=3)
    assert generate_tokens(model, PROMPTS, seeded) == generate_tokens(
        model, PROMPTS, seeded, cuda_graphs=False
    )


def test_compile_changes_nothing_without_cuda_graphs():
    model = model_of("gpt2")
    assert generate_tokens(model, PROMPTS, GREEDY, compile=True) == generate_tokens(model, PROMPTS, GREEDY)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_compiled_decoding_step_matches_eager():
    """The decoding step compiled by torch.compile, then recorded: the same greedy tokens as eager decoding
    (float32, so that fused kernels cannot part the paths by rounding), across a context slide and for two
    batch shapes."""
    model = model_of("llama", num_kv_heads=2).cuda()
    sampling = Sampling(max_new_tokens=70, temperature=0)
    for prompts in (PROMPTS, PROMPTS[:1]):
        compiled = generate_tokens(model, prompts, sampling, compile=True)
        eager = generate_tokens(model, prompts, sampling, cuda_graphs=False)
        assert compiled == eager and all(len(row) == 70 for row in compiled)
