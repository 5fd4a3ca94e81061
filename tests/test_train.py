"""The training step, schedule, checkpoints and the loop through the Python API."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from llm_training.config import ModelConfig, TrainingConfig, load_config
from llm_training.data.prepare import prepare_documents
from llm_training.data.sources import read_documents
from llm_training.errors import UserError
from llm_training.model.transformer import Transformer
from llm_training.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from llm_training.train.device import Runtime, pick_precision
from llm_training.train.loop import train
from llm_training.train.optim import lr_at
from llm_training.train.step import train_step

CPU = Runtime(torch.device("cpu"), "fp32", False)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(
        ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=50, max_seq_length=16)
    )


def test_accumulation_equals_one_large_batch():
    a = tiny_model()
    b = copy.deepcopy(a)
    # SGD keeps the comparison about gradients (Adam turns rounding noise in near-zero gradients into full steps)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.5), torch.optim.SGD(b.parameters(), lr=0.5)
    ids = torch.randint(0, 50, (8, 17))
    whole = [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}]
    halves = [{"input_ids": ids[i : i + 4, :-1], "labels": ids[i : i + 4, 1:]} for i in (0, 4)]
    loss_a, norm_a = train_step(a, whole, opt_a, CPU, grad_clip=1.0)
    loss_b, norm_b = train_step(b, halves, opt_b, CPU, grad_clip=1.0)
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and torch.allclose(norm_a, norm_b, atol=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainingConfig(learning_rate=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 0.0, cfg) == pytest.approx(0.1)
    assert lr_at(9, 0.0, cfg) == pytest.approx(1.0)
    values = [lr_at(10 + i, i / 100, cfg) for i in range(101)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(values, values[1:], strict=False))
    assert lr_at(10, 0.5, cfg) == pytest.approx(0.55)


def test_precision_choice_on_cpu():
    cpu = torch.device("cpu")
    assert pick_precision("auto", cpu) == "fp32" and pick_precision(True, cpu) == "fp32"
    assert pick_precision(False, cpu) == "fp32" and pick_precision("bf16", cpu) == "bf16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")
def test_resources_on_a_machine_without_gpus(tmp_path):
    from llm_training.errors import ConfigError
    from llm_training.train.device import resolve_runtime

    def runtime(**values):
        return resolve_runtime(load_config(cli=values, environ={}, default_file=None))

    assert runtime(**{"resources.gpu_count": 0}).device.type == "cpu"
    assert runtime().device.type == "cpu" and runtime().precision == "fp32" and not runtime().compile
    with pytest.raises(ConfigError, match="resources.gpu_count is 4 but 0 GPU"):
        runtime(**{"resources.gpu_count": 4})
    # a GPU config on this machine trains on the CPU; its process group uses gloo (pick_backend)
    assert (
        runtime(**{"resources.distributed": True, "resources.distributed_backend": "nccl"}).device.type
        == "cpu"
    )
    assert (
        runtime(**{"resources.distributed": True, "resources.distributed_backend": "gloo"}).device.type
        == "cpu"
    )


def test_checkpoint_round_trip_and_atomic_failure(tmp_path):
    path = tmp_path / "ck" / "model_step_1.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "config": {}, "step": 1})
    assert load_checkpoint(path)["step"] == 1
    with pytest.raises(Exception):  # noqa: B017 - any failure while writing
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "config": {}, "bad": lambda: 0})
    assert load_checkpoint(path)["model"]["w"].sum() == 2  # the old file survived
    # no temporary left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["model_step_1.pt", "model_step_1.pt.json"]
    save_checkpoint(tmp_path / "ck" / "model_step_10.pt", {"model": {}, "config": {}})
    assert latest_checkpoint(tmp_path / "ck").name == "model_step_10.pt"


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="bad.pt: not a readable checkpoint"):
        load_checkpoint(bad)
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not an llm_training checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "absent.pt")


@pytest.fixture
def prepared(tmp_path, shakespeare_jsonl):
    return prepare_documents(
        read_documents(shakespeare_jsonl), tmp_path / "data", vocab_size=400, validation_fraction=0.3
    ).output_dir


def tiny_config(tmp_path, **extra):
    values = {
        "output_dir": str(tmp_path / "run"),
        "model.num_layers": 2, "model.hidden_size": 64, "model.num_attention_heads": 4, "model.max_seq_length": 32,
        "training.batch_size": 8, "training.learning_rate": 3e-3, "training.warmup_steps": 2,
        "training.log_interval": 1, "training.eval_interval": 5, "training.eval_batches": 4,
        "training.checkpoint_interval": 4, "training.sample_tokens": 10, **extra,
    }  # fmt: skip
    return load_config(cli=values, environ={}, default_file=None)


def test_training_learns_and_checkpoints(tmp_path, prepared):
    cfg = tiny_config(tmp_path, **{"training.max_steps": 30})
    result = train(cfg, prepared)
    assert result.status == "completed" and result.steps == 30
    assert result.val_loss < result.first_val_loss - 0.5
    assert result.val_bpb == pytest.approx(
        result.val_loss / math.log(2) / _bytes_per_token(prepared), rel=0.2
    )
    names = {p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.suffix == ".pt"}
    # retention: the 3 newest step checkpoints (keep_last 3); model_step_20 is also the best scored one
    assert names == {
        "model_best.pt",
        "model_final.pt",
        "model_step_20.pt",
        "model_step_24.pt",
        "model_step_28.pt",
    }
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "model_final.pt")
    assert (
        state["step"] == 30 and state["config"]["model"]["vocab_size"] % 64 == 0 and "tokenizer_json" in state
    )
    assert isinstance(result.sample, str)


def _bytes_per_token(data_dir):
    manifest = json.loads((data_dir / "validation.json").read_text())
    return manifest["num_bytes"] / manifest["num_tokens"]


def test_resume_continues_from_the_checkpoint_step(tmp_path, prepared):
    cfg = tiny_config(tmp_path, **{"training.max_steps": 8})
    first = train(cfg, prepared)
    again = tiny_config(tmp_path, **{"training.max_steps": 8})
    resumed = train(again, prepared, resume_from=tmp_path / "run" / "checkpoints" / "model_step_4.pt")
    assert resumed.steps == 8
    # basic resume: same data order and RNG, so the final weights match the uninterrupted run closely
    a = load_checkpoint(first.final_checkpoint)["model"]
    b = load_checkpoint(resumed.final_checkpoint)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_accumulation_bf16_autocast_and_muon_in_the_loop(tmp_path, prepared):
    cfg = tiny_config(
        tmp_path,
        **{
            "training.max_steps": 4,
            "training.gradient_accumulation_steps": 2,
            "training.mixed_precision": "bf16",
            "training.optimizer": "muon",
        },
    )
    result = train(cfg, prepared)
    assert result.precision == "bf16" and result.steps == 4 and math.isfinite(result.val_loss)
    assert result.tokens == 4 * 2 * 8 * 32  # steps x accumulation x batch x context
    state = load_checkpoint(result.final_checkpoint)
    optim = state["optimizer"]["state"]  # keyed by parameter name: Muon on block matrices, AdamW on the rest
    assert "momentum_buffer" in optim["blocks.0.attn.qkv.weight"] and "exp_avg" in optim["embed.weight"]


def test_epochs_limit_the_run(tmp_path, prepared):
    cfg = tiny_config(tmp_path, **{"training.num_epochs": 1, "training.batch_size": 64})
    result = train(cfg, prepared)
    windows = json.loads((prepared / "train.json").read_text())["num_tokens"] // 32
    assert result.steps == windows // 64


def test_time_budget_stops_and_fits_the_schedule(tmp_path, prepared):
    cfg = tiny_config(tmp_path, **{"training.max_time": "3s", "training.eval_interval": 1000})
    result = train(cfg, prepared)
    # stopped by the budget; no upper bound, which a busy machine would break
    assert result.seconds >= 3.0 and result.steps > 0
    assert (
        load_checkpoint(result.final_checkpoint)["optimizer"]["param_groups"][0]["lr"] < 0.5 * 3e-3
    )  # decayed
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # the loop writes no metrics itself; sinks do
    state = load_checkpoint(result.final_checkpoint)
    assert state["elapsed"] >= 3.0


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs PyTorch 2.9+")
def test_cpu_muon_matches_torch_muon():
    from llm_training.train.muon import CPUMuon

    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(48, 32))
    b = torch.nn.Parameter(a.detach().clone())
    ours = CPUMuon([a], lr=0.01, weight_decay=0.1)
    theirs = torch.optim.Muon([b], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grad = torch.randn(48, 32)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    # theirs orthogonalises in bfloat16: equal up to its rounding
    assert torch.allclose(a, b, atol=2e-3), (a - b).abs().max()


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs PyTorch 2.9+")
def test_batched_muon_matches_torch_muon_and_shares_its_state():
    from llm_training.train.muon import BatchedMuon

    torch.manual_seed(0)
    shapes = [(48, 32), (32, 48), (48, 32), (32, 32), (32, 48)]  # wide, tall and square, shapes repeated
    ours = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = BatchedMuon(ours, lr=0.01, weight_decay=0.1)
    opt_theirs = torch.optim.Muon(theirs, lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for a, b in zip(ours, theirs, strict=True):
            grad = torch.randn_like(a)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_theirs.step()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    state = opt_theirs.state_dict()
    assert opt_ours.state_dict()["param_groups"][0].keys() == state["param_groups"][0].keys()
    opt_ours.load_state_dict(state)  # checkpoints move between the two
    assert torch.equal(
        opt_ours.state[ours[0]]["momentum_buffer"], opt_theirs.state[theirs[0]]["momentum_buffer"]
    )
