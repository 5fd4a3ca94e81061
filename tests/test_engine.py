"""The training engine on CPU: compiled = eager, activation checkpointing, schedules, token-weighted
accumulation with ignored labels, Muon and AdamW steps, ModelInitializer, best checkpoint and logged metrics."""

from __future__ import annotations

import json

import pytest
import torch

from llm_training import ModelInitializer, ModelInitializerInput, load_checkpoint, load_config
from llm_training.model.transformer import Transformer
from llm_training.train.device import Runtime
from llm_training.train.optim import build_optimizer, lr_at
from llm_training.train.step import train_step


def tiny(style: str, **extra):
    values = {"model.model_type": style, "model.num_layers": 2, "model.hidden_size": 32,
              "model.num_attention_heads": 4, "model.max_seq_length": 16, "model.vocab_size": 97, **extra}  # fmt: skip
    return load_config(cli=values, environ={}, default_file=None)


def batch(seed: int = 0, size: int = 4):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 97, (size, 17), generator=g)
    return {"input_ids": data[:, :-1], "labels": data[:, 1:].clone()}


CPU = Runtime(torch.device("cpu"), "fp32", False)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_compiled_model_matches_eager(style):
    torch.manual_seed(0)
    model = Transformer(tiny(style, **{"model.num_kv_heads": 2}).model)
    b = batch()
    eager_loss = model(b["input_ids"], b["labels"])
    eager_loss.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model)
    compiled_loss = compiled(b["input_ids"], b["labels"])
    compiled_loss.backward()
    assert torch.allclose(eager_loss, compiled_loss, atol=1e-5)
    for eager, p in zip(eager_grads, model.parameters(), strict=True):
        assert torch.allclose(eager, p.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_activation_checkpointing_gives_the_same_gradients(style):
    b = batch()
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = Transformer(tiny(style, **{"model.activation_checkpointing": flag}).model)
        model(b["input_ids"], b["labels"]).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, c in zip(*grads, strict=True):
        assert torch.allclose(a, c, atol=1e-6)


def test_schedules_after_warm_up():
    base = {"training.learning_rate": 1.0, "training.warmup_steps": 10, "training.min_lr_ratio": 0.1}
    schedules = {
        name: load_config(cli={**base, "training.lr_schedule": name}, environ={}, default_file=None).training
        for name in ("cosine", "linear", "constant")
    }
    assert lr_at(4, 0.0, schedules["linear"]) == pytest.approx(0.5)  # warm-up
    assert lr_at(50, 0.5, schedules["linear"]) == pytest.approx(0.55)
    assert lr_at(50, 1.0, schedules["linear"]) == pytest.approx(0.1)
    assert lr_at(50, 0.5, schedules["cosine"]) == pytest.approx(0.55)
    assert lr_at(50, 0.25, schedules["cosine"]) > lr_at(50, 0.25, schedules["linear"])
    assert lr_at(50, 0.9, schedules["constant"]) == 1.0
    with pytest.raises(Exception, match="training.lr_schedule"):
        load_config(cli={"training.lr_schedule": "step"}, environ={}, default_file=None)


def test_accumulation_weights_micro_batches_by_counted_tokens():
    """Two micro-batches with different numbers of ignored labels give the gradient of one batch."""
    b = batch(size=4)
    b["labels"][:2, :10] = -100  # the first half has far fewer counted tokens
    first = {k: v[:2] for k, v in b.items()}
    second = {k: v[2:] for k, v in b.items()}
    results = []
    for micro in ([b], [first, second]):
        torch.manual_seed(0)
        model = Transformer(tiny("llama").model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the gradient itself
        loss, _ = train_step(model, micro, optimizer, CPU, grad_clip=0.0)
        results.append((loss, [p.detach().clone() for p in model.parameters()]))
    (loss_one, params_one), (loss_two, params_two) = results
    assert torch.allclose(loss_one, loss_two, atol=1e-6)
    for a, c in zip(params_one, params_two, strict=True):
        assert torch.allclose(a, c, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_steps_reduce_the_loss(optimizer):
    cfg = tiny("llama", **{"training.optimizer": optimizer, "training.learning_rate": 0.01})
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.training, torch.device("cpu"))
    if optimizer == "muon":
        muon_params = {id(p) for p in opt.optimizers[0].param_groups[0]["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in muon_params}
        assert names and all(n.startswith("blocks.") and n.endswith(".weight") for n in names)
        assert "embed.weight" not in names
    b = batch()
    losses = [float(train_step(model, [b], opt, CPU, grad_clip=1.0)[0]) for _ in range(15)]
    assert losses[-1] < losses[0] - 0.5


def test_model_initializer_from_the_guide(tmp_path):
    init = ModelInitializer()
    spec = ModelInitializerInput(
        architecture={"model_type": "transformer", "num_layers": 2, "hidden_size": 64,
                      "num_attention_heads": 4, "vocab_size": 500},
        initialization={"method": "random", "seed": 42},
    )  # fmt: skip
    a, b = init.initialize(spec), init.initialize(spec)
    assert a.model_id != b.model_id and a.num_parameters == sum(p.numel() for p in a.model.parameters())
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters(), strict=True))
    assert a(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 500)
    assert a.flops_per_token > 6 * a.model.num_parameters(non_embedding=True)
    path = tmp_path / "m.pt"
    from llm_training.train.checkpoint import save_checkpoint

    save_checkpoint(path, {"model": a.model.state_dict(), "config": {"model": vars(a.config)}})
    loaded = init.initialize(
        ModelInitializerInput(initialization={"method": "checkpoint", "path": str(path)})
    )
    assert all(
        torch.equal(x, y) for x, y in zip(a.model.parameters(), loaded.model.parameters(), strict=True)
    )
    with pytest.raises(Exception, match="vocab_size"):
        init.initialize(ModelInitializerInput(architecture={"num_layers": 2}))


def test_best_checkpoint_and_logged_metrics(tmp_path, shakespeare_jsonl):
    from llm_training.api.jobs import run_training

    cfg = load_config(
        cli={"output_dir": str(tmp_path / "run"), "data.input_file": str(shakespeare_jsonl),
             "data.vocab_size": 400, "model.num_layers": 2, "model.hidden_size": 64,
             "model.num_attention_heads": 4, "model.max_seq_length": 32, "training.batch_size": 8,
             "training.max_steps": 24, "training.eval_interval": 8, "training.eval_batches": 4,
             "training.log_interval": 4, "training.sample_tokens": 5, "logging.progress_bar": False},
        environ={}, default_file=None,
    )  # fmt: skip
    result = run_training(cfg, console=False)
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "model_best.pt")
    assert best["best_val_loss"] <= result.val_loss + 1e-9
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "loss" in x and "tokens_per_second" in x]
    assert logged and all(x["memory_gb"] > 0 and "mfu" not in x for x in logged)  # no MFU without a known GPU


def test_batch_size_auto(tmp_path):
    from llm_training.train.autobatch import resolve_batch

    cfg = tiny("llama", **{"training.batch_size": "auto", "training.global_batch_size": 24})
    assert cfg.training.batch_size == "auto"
    model = Transformer(cfg.model)
    assert resolve_batch(model, cfg.training, CPU, 16, 97) == (24, 1)  # CPU: one micro-batch
    fixed = tiny("llama", **{"training.batch_size": "8", "training.gradient_accumulation_steps": 3})
    assert fixed.training.batch_size == 8 and resolve_batch(model, fixed.training, CPU, 16, 97) == (8, 3)
    with pytest.raises(Exception, match="expects an integer or 'auto'"):
        tiny("llama", **{"training.batch_size": "big"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_batch_size_auto_on_gpu_keeps_the_global_batch():
    from llm_training.train.autobatch import resolve_batch
    from llm_training.train.device import resolve_runtime

    cfg = tiny("gpt2", **{"training.batch_size": "auto", "training.global_batch_size": 4096,
                          "model.hidden_size": 512, "model.num_attention_heads": 8, "model.max_seq_length": 1024})  # fmt: skip
    runtime = resolve_runtime(cfg)
    model = Transformer(cfg.model).to(runtime.device)
    micro, accumulation = resolve_batch(model, cfg.training, runtime, 1024, 97)
    assert micro * accumulation == 4096 and 1 <= micro < 4096


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_chunked_loss_equals_the_whole_loss(style):
    b = batch(size=4)
    b["labels"][0, :5] = -100
    results = []
    for chunk in (0, 7):  # 64 tokens in chunks of 7: uneven on purpose
        torch.manual_seed(0)
        model = Transformer(tiny(style, **{"model.loss_chunk_tokens": chunk}).model)
        loss = model(b["input_ids"], b["labels"])
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    for a, c in zip(results[0][1], results[1][1], strict=True):
        assert torch.allclose(a, c, atol=1e-6)


def test_chunked_loss_under_bf16_autocast_and_compile():
    b = batch(size=2)
    torch.manual_seed(0)
    whole = Transformer(tiny("llama").model)
    torch.manual_seed(0)
    chunked = Transformer(tiny("llama", **{"model.loss_chunk_tokens": 5}).model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = whole(b["input_ids"], b["labels"])
        got = torch.compile(chunked)(b["input_ids"], b["labels"])
    got.backward()
    expected.backward()
    assert torch.allclose(expected.float(), got.float(), atol=2e-2)
    head = chunked.lm_head.weight.grad
    assert torch.allclose(whole.lm_head.weight.grad, head, atol=5e-3, rtol=5e-2)
