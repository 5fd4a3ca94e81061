"""QLoRA (``llm-finetune --qlora``): the adapted block layers' frozen weights in 4-bit NF4 through bitsandbytes,
LoRA adapters on top through peft. On the tiny random Qwen2 of test_finetune.py: the loss falls, a resume
continues exactly, the checkpoint holds the base weights dequantized (plain LoRA names) so llm-evaluate and
llm-export read it, and the Hugging Face export gives transformers our logits. NF4 of a dequantized NF4 weight
gives back its codes. Runs on CUDA when present (bitsandbytes' GPU kernels), else on the CPU (its CPU backend).
The missing-extra and bad-setting checks need no 4-bit kernels."""

from __future__ import annotations

import json
import os

import pytest
import torch
from test_cli import BLOCKER
from test_finetune import chat_file, evals, finetune, qwen2_folder  # noqa: F401  (fixtures)

from conftest import assert_user_error, call_cli, run_cli
from llm_training.cli.finetune import main as finetune_main

transformers = pytest.importorskip("transformers")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def needs_4bit():
    """bitsandbytes with 4-bit forward and backward on DEVICE, or a skip saying why not."""
    pytest.importorskip("peft")
    from llm_training.errors import UserError
    from llm_training.train.qlora import check_4bit, compute_dtype, import_bitsandbytes

    try:
        import_bitsandbytes()
    except ImportError:
        pytest.skip("bitsandbytes is not installed (the 'finetune' extra)")

    try:
        check_4bit(torch.device(DEVICE), compute_dtype(torch.device(DEVICE), "bf16"))
    except UserError as exc:
        pytest.skip(f"bitsandbytes cannot run 4-bit layers here ({exc}); run on a CUDA GPU")


def test_nf4_of_dequantized_nf4_gives_back_the_codes():
    """A weight quantized, dequantized (what checkpoints hold) and quantized again: the same 4-bit codes. The
    dequantized weights move a little (double quantization stores the scales in 8 bits around their mean,
    which the dequantized weights do not carry; without it the round trip is exact), so loading a state keeps
    a layer's codes and scales when they already give exactly the stored weights: a resume is exact."""
    needs_4bit()
    import bitsandbytes.functional as bnbf

    from llm_training.train.qlora import dequantized, requantize, to_nf4

    torch.manual_seed(0)
    device = torch.device(DEVICE)
    linear = torch.nn.Linear(320, 192, bias=True)
    with torch.no_grad():
        linear.weight.mul_(torch.linspace(0.1, 10, 192)[:, None])  # rows of very different scales
    first = to_nf4(linear, device, torch.float32)
    codes, weights = first.weight.data.clone(), dequantized(first).clone()
    assert first.weight.dtype == torch.uint8 and tuple(first.weight.quant_state.shape) == (192, 320)
    nf4_error = (weights - linear.weight.to(device)).abs().max().item()

    again = to_nf4(linear, device, torch.float32)
    requantize(again, weights)
    diff = (dequantized(again) - weights).abs().max().item()
    single = bnbf.quantize_4bit(
        linear.weight.to(device), blocksize=64, compress_statistics=False, quant_type="nf4"
    )
    plain = bnbf.dequantize_4bit(*single)
    twice = bnbf.quantize_4bit(plain, blocksize=64, compress_statistics=False, quant_type="nf4")
    exact = (bnbf.dequantize_4bit(*twice) - plain).abs().max().item()
    print(
        f"NF4 round trip: codes equal {torch.equal(again.weight.data, codes)}; max abs diff of the dequantized "
        f"weights {diff:.2e} (NF4's own error {nf4_error:.2e}; without double quantization {exact:.1e})"
    )
    assert torch.equal(again.weight.data, codes) and torch.equal(twice[0], single[0])
    assert diff < 0.05 * nf4_error and exact == 0.0

    state = first.state_dict()  # plain float tensors under plain names
    assert sorted(state) == ["bias", "weight"] and state["weight"].dtype == torch.float32
    assert torch.equal(state["weight"], weights)
    same = to_nf4(linear, device, torch.float32)  # the same weights: codes and scales kept as they are
    scales = same.weight.quant_state
    same.load_state_dict(state)
    assert same.weight.quant_state is scales and torch.equal(dequantized(same), weights)
    fresh = to_nf4(torch.nn.Linear(320, 192), device, torch.float32)  # other weights: quantized again
    fresh.load_state_dict(state)
    x = torch.randn(3, 320, device=device)
    assert torch.equal(fresh.weight.data, codes) and (dequantized(fresh) - weights).abs().max().item() == diff
    assert (fresh(x) - first(x)).abs().max().item() < 0.05 * nf4_error * x.abs().sum(1).max().item()
    with pytest.raises(RuntimeError, match="size mismatch"):
        to_nf4(torch.nn.Linear(64, 192), device, torch.float32).load_state_dict(state)


def test_qlora_trains_resumes_exactly_and_every_reader_merges(tmp_path, qwen2_folder, chat_file):  # noqa: F811
    """--qlora: the block layers are 4-bit, only the adapters train and the loss falls; a resume from the step-8
    checkpoint (the model quantized, the adapters injected, then the checkpoint loaded) ends where the run that
    never stopped ended; the checkpoint's base weights are the pretrained ones through NF4, in float, and
    llm-evaluate and llm-export read it as a plain model whose Hugging Face export gives transformers our logits."""
    needs_4bit()
    from llm_training.cli.evaluate import main as evaluate_main
    from llm_training.cli.export import main as export_main
    from llm_training.export.hf_import import load_hf
    from llm_training.train.artifacts import load_trained
    from llm_training.train.qlora import dequantized, to_nf4

    qlora = ["--qlora", "--lora-alpha", "64", "--learning-rate", "1e-2", "--device", DEVICE,
             "--max-steps", "16"]  # fmt: skip
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    proc = finetune(qwen2_folder, chat_file, run, *qlora, "--set", "training.checkpoint_interval=8")
    assert "note: QLoRA rank 16 on qkv,proj,up,down: 8 linear layers in 4-bit NF4" in proc.stdout
    first, last = evals(run)[0], evals(run)[-1]
    print(f"qwen2 QLoRA validation loss: step {first[0]} {first[1]:.3f} -> step {last[0]} {last[1]:.3f}")
    assert last[0] == 16 and last[1] < first[1] - 0.05  # as with LoRA: a random model's loss falls little

    final = run / "checkpoints" / "model_final.pt"
    saved = torch.load(final, weights_only=True)
    state = saved["model"]
    assert saved["config"]["finetune"]["qlora"] and saved["config"]["finetune"]["lora_rank"] == 16
    base, _ = load_hf(qwen2_folder)
    original = base.state_dict()
    for name in ("blocks.0.attn.qkv", "blocks.1.mlp.down"):
        stored = state[f"{name}.base_layer.weight"]
        nf4 = dequantized(to_nf4(base.get_submodule(name), torch.device(DEVICE), torch.float32)).cpu()
        assert stored.dtype == torch.float32 and torch.equal(stored, nf4)  # the base through NF4, in float
        assert not torch.equal(stored, original[f"{name}.weight"])
    assert torch.equal(state["blocks.0.attn.qkv.base_layer.bias"], original["blocks.0.attn.qkv.bias"])
    assert torch.equal(state["embed.weight"], original["embed.weight"])  # embeddings and norms untouched
    assert torch.equal(state["blocks.0.norm1.weight"], original["blocks.0.norm1.weight"])
    assert state["blocks.1.mlp.down.lora_B.default.weight"].abs().max() > 0  # the adapters moved

    middle = run / "checkpoints" / "model_step_8.pt"
    finetune(qwen2_folder, chat_file, resumed, *qlora, "--resume", str(middle))
    other = torch.load(resumed / "checkpoints" / "model_final.pt", weights_only=True)["model"]
    adapters = [k for k in state if ".lora_" in k]
    diff = max((state[k] - other[k]).abs().max().item() for k in adapters)
    print(f"QLoRA resumed at step 8 against the run without a stop: max abs adapter difference {diff:.1e}")
    if DEVICE == "cpu":  # exact on the CPU; a GPU's kernels may sum in another order
        assert diff == 0.0 and all(torch.equal(state[k], other[k]) for k in state)
    else:
        assert diff < 1e-2

    ours = load_trained(final).model  # the merged, plain model every reader gets
    export = tmp_path / "hf"
    proc = call_cli(export_main, ["--checkpoint", str(final), "--format", "hf", "--output", str(export)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    x = torch.tensor([[50257, 882, 198, 15496, 50258, 198, 50257, 562, 11, 502]])
    with torch.no_grad():
        diff = (
            (transformers.AutoModelForCausalLM.from_pretrained(export).eval()(x).logits - ours(x)).abs().max()
        )
    print(f"qwen2 QLoRA export: max abs logit difference {diff.item():.2e}")
    assert diff.item() < 1e-4

    test = tmp_path / "test.jsonl"
    replies = [json.loads(line)["messages"][1]["content"] for line in chat_file.read_text().splitlines()]
    test.write_text("".join(json.dumps({"text": r}) + "\n" for r in replies[:20]))
    proc = call_cli(evaluate_main, ["--model-path", str(final), "--test-data", str(test), "--output",
                                    str(tmp_path / "eval.json")])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)
    assert json.loads((tmp_path / "eval.json").read_text())["perplexity"] > 1


def test_a_missing_bitsandbytes_is_one_line_naming_the_extra(tmp_path, qwen2_folder, chat_file):  # noqa: F811
    """Without bitsandbytes, --qlora stops with the 'finetune' extra to install, before any training."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])
    args = ["-m", "llm_training.cli.finetune", "--model", str(qwen2_folder), "--data", str(chat_file),
            "--output-dir", str(tmp_path / "run"), "--qlora", "--device", "cpu"]  # fmt: skip
    proc = run_cli(args, tmp_path, {"BLOCK_MODULES": "bitsandbytes", "PYTHONPATH": path})
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert (
        lines[0] == "error: the module 'bitsandbytes' is not installed: pip install 'llm-training[finetune]'"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_qlora_settings_and_devices_without_4bit_kernels(tmp_path, qwen2_folder, chat_file):  # noqa: F811
    """--qlora sets finetune.qlora (the API's qlora=True too); FSDP is refused in one line; a device where
    bitsandbytes cannot run a 4-bit layer is one line naming it."""
    from llm_training.api.finetune import finetune_config
    from llm_training.cli.finetune import build_parser, config_values

    args = build_parser().parse_args(["--model", "m", "--data", "d", "--qlora"])
    cfg = finetune_config(None, config_values(args))
    assert cfg.finetune.qlora and cfg.finetune.lora_rank == 0  # the rank comes at setup: 16 unless given
    assert not finetune_config(
        None, config_values(build_parser().parse_args(["--model", "m", "--data", "d"]))
    ).finetune.qlora
    proc = call_cli(finetune_main, ["--model", str(qwen2_folder), "--data", str(chat_file), "--output-dir",
                                    str(tmp_path / "run"), "--qlora", "--set", "resources.strategy=fsdp"])  # fmt: skip
    assert_user_error(proc, "finetune.qlora", "resources.strategy ddp")

    from llm_training.errors import UserError
    from llm_training.train.qlora import check_4bit, import_bitsandbytes

    try:
        import_bitsandbytes()
    except ImportError:
        pytest.skip("bitsandbytes is not installed (the 'finetune' extra)")

    with pytest.raises(
        UserError, match=r"cannot run 4-bit layers on meta \(.*\); train on a CUDA GPU"
    ) as err:
        check_4bit(torch.device("meta"), torch.float32)  # bitsandbytes quantizes nothing on the meta device
    assert "\n" not in str(err.value)
