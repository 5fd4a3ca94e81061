"""``llm-finetune`` on several CPU processes with gloo: full fine-tuning and LoRA under DDP (``--num-gpus 2``)
and LoRA under FSDP2 (``torchrun``) give the step losses of one process with the same global batch, the data
is prepared once (by the launcher's parent, or by rank 0 under torchrun), a checkpoint of 2 processes
resumes on 1, and bad inputs are one line from the parent. The tiny Qwen2 chat model and the chat file are
test_finetune.py's fixtures."""

from __future__ import annotations

import pytest
import test_finetune
import torch

from conftest import assert_user_error, call_cli, run_cli, set_flags
from llm_training.cli.finetune import main as finetune_main
from llm_training.monitor.files import step_losses

# test_finetune.py's fixtures, under their names here (pytest finds a fixture by the module's names)
qwen2_folder, chat_file, evals = test_finetune.qwen2_folder, test_finetune.chat_file, test_finetune.evals

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

FINETUNE = ["-m", "llm_training.cli.finetune"]
TORCHRUN = ["-m", "torch.distributed.run", "--nproc-per-node", "2"]
GLOO = ["--num-gpus", "2", "--distributed-backend", "gloo"]
STEPS = 8
# every step logged, validation at 0 and 8, a checkpoint at step 4; the model has no dropout, and LoRA's
# is off, so that one process and two compute the same steps
SETTINGS = ["--device", "cpu", "--learning-rate", "3e-3", "--max-steps", str(STEPS), *set_flags({
    "training.warmup_steps": 2, "training.log_interval": 1, "training.eval_interval": STEPS,
    "training.eval_batches": 2, "training.checkpoint_interval": 4, "training.sample_tokens": 0,
    "logging.tensorboard": False, "logging.progress_bar": False, "checkpoint.keep_last": 10,
})]  # fmt: skip
LORA = ["--lora-rank", "4", "--lora-alpha", "64", "--lora-dropout", "0", "--learning-rate", "2e-2"]


def finetune(model, data, out, *extra, launcher=()):
    args = [*launcher, *FINETUNE, "--model", str(model), "--data", str(data), "--output-dir", str(out),
            *SETTINGS, *extra]  # fmt: skip
    proc = run_cli(args, out.parent, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def close(a: dict, b: dict, tol: float = 1e-3) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= tol for k in a)


def assert_matches(run, reference: dict, label: str) -> None:
    """The run's step losses equal one process's ``reference`` within ``close`` (both printed)."""
    losses = step_losses(run / "metrics.jsonl")
    print(f"{label}, 1 process:   ", [round(v, 4) for v in reference.values()])
    print(f"{label}, 2 processes: ", [round(v, 4) for v in losses.values()])
    assert close(losses, reference), (losses, reference)


@pytest.fixture(scope="module")
def single(qwen2_folder, chat_file, tmp_path_factory):
    """One process, 8 examples a step: the reference of full fine-tuning."""
    out = tmp_path_factory.mktemp("ft_single") / "run"
    finetune(qwen2_folder, chat_file, out, "--batch-size", "8")
    return out, step_losses(out / "metrics.jsonl")


@pytest.fixture(scope="module")
def single_lora(qwen2_folder, chat_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft_single_lora") / "run"
    finetune(qwen2_folder, chat_file, out, "--batch-size", "8", *LORA)
    return out, step_losses(out / "metrics.jsonl")


def test_ddp_full_finetuning_matches_one_process_and_resumes_on_one(
    tmp_path, qwen2_folder, chat_file, single
):
    two = tmp_path / "two"
    proc = finetune(qwen2_folder, chat_file, two, "--batch-size", "4", *GLOO)
    out = proc.stdout + proc.stderr
    assert "4 sequences x 2 process(es) x 1 accumulation step(s) = 8 sequences" in out
    # the parent prepared the data (one line), rank 0 re-used it, and rank 0 alone reports
    assert proc.stdout.count("examples into") == 1 and proc.stdout.startswith("prepared ")
    assert "note: re-used the prepared chat data" in proc.stdout and proc.stdout.count("done: ") == 1
    assert_matches(two, single[1], "full")
    first, last = evals(two)[0], evals(two)[-1]
    assert first[0] == 0 and last[0] == STEPS and last[1] < first[1] - 0.5
    # the checkpoint of step 4, written by 2 processes, holds the full state and continues on 1
    state = torch.load(two / "checkpoints" / "model_step_4.pt", weights_only=True)
    assert state["world_size"] == 2 and state["model"]["embed.weight"].shape == (50259, 64)
    one = tmp_path / "one"
    finetune(
        qwen2_folder,
        chat_file,
        one,
        "--batch-size",
        "8",
        "--resume",
        str(two / "checkpoints" / "model_step_4.pt"),
    )
    assert close(step_losses(one / "metrics.jsonl"), {s: v for s, v in single[1].items() if s > 4})


def test_ddp_lora_matches_one_process(tmp_path, qwen2_folder, chat_file, single_lora):
    run = tmp_path / "run"
    proc = finetune(qwen2_folder, chat_file, run, "--batch-size", "4", *LORA, *GLOO)
    assert "note: LoRA rank 4" in proc.stdout and proc.stdout.count("examples into") == 1
    assert_matches(run, single_lora[1], "LoRA DDP")
    first, last = evals(run)[0], evals(run)[-1]
    print(f"LoRA DDP validation loss {first[1]:.4f} -> {last[1]:.4f}")
    assert last[0] == STEPS and last[1] < first[1]


def test_fsdp2_lora_under_torchrun(tmp_path, qwen2_folder, chat_file, single_lora):
    """FSDP2 shards blocks that hold frozen base weights beside trainable adapters; rank 0 prepares the data
    while the other waits (no launcher's parent under torchrun); the checkpoint is whole and loads in one."""
    from llm_training.train.artifacts import load_trained

    run = tmp_path / "run"
    proc = finetune(qwen2_folder, chat_file, run, "--batch-size", "4", *LORA, "--set", "resources.strategy=fsdp",
                    "--set", "resources.distributed_backend=gloo", launcher=TORCHRUN)  # fmt: skip
    assert "2 processes (fsdp, cpu)" in proc.stdout + proc.stderr
    assert proc.stdout.count("examples into") == 1 and "note: prepared " in proc.stdout
    assert "re-used" not in proc.stdout
    assert_matches(run, single_lora[1], "LoRA FSDP2")
    final = run / "checkpoints" / "model_final.pt"
    state = torch.load(final, weights_only=True)
    assert (
        state["world_size"] == 2 and state["model"]["blocks.0.attn.qkv.lora_A.default.weight"].shape[0] == 4
    )
    reference = torch.load(single_lora[0] / "checkpoints" / "model_final.pt", weights_only=True)["model"]
    assert state["model"].keys() == reference.keys()
    assert max((state["model"][k] - reference[k]).abs().max().item() for k in reference) < 1e-3
    x = torch.tensor([[50257, 882, 198, 15496, 50258, 198, 50257, 562]])
    with torch.no_grad():
        assert torch.isfinite(load_trained(final).model(x)).all()  # one process reads it, adapters merged


def test_bad_inputs_fail_once_in_the_parent(tmp_path, qwen2_folder, chat_file):
    out = ["--output-dir", str(tmp_path / "run"), *GLOO]
    proc = call_cli(
        finetune_main, ["--model", str(qwen2_folder), "--data", str(tmp_path / "missing.jsonl"), *out]
    )
    assert_user_error(proc, "data file not found", "missing.jsonl")
    proc = call_cli(finetune_main, ["--model", str(tmp_path / "nope"), "--data", str(chat_file), *out])
    assert_user_error(proc, "model not found")
    proc = call_cli(finetune_main, ["--model", str(qwen2_folder), "--data", str(chat_file), "--chat-template",
                                    str(tmp_path / "none.jinja"), *out])  # fmt: skip
    assert_user_error(proc, "none.jinja")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"nothing": 1}\n')
    assert_user_error(
        call_cli(finetune_main, ["--model", str(qwen2_folder), "--data", str(bad), *out]), str(bad)
    )
    proc = call_cli(finetune_main, ["--model", str(qwen2_folder), "--data", str(chat_file), "--lora-rank", "4",
                                    "--lora-targets", "qkv,nope", *out])  # fmt: skip
    assert_user_error(proc, "finetune.lora_targets", "nope")
    assert not (tmp_path / "run" / "checkpoints").exists()  # no worker started


def test_the_parent_reads_a_checkpoint_without_its_weights(single, qwen2_folder):
    """What --num-gpus's parent reads of a .pt checkpoint (memory-mapped) or a folder equals the full load."""
    from llm_training.api.finetune import load_pretrained
    from llm_training.api.finetune_launch import read_pretrained

    for path in (single[0] / "checkpoints" / "model_final.pt", qwen2_folder):
        cfg, tokenizer, template = read_pretrained(path)
        model, full_tokenizer, full_template = load_pretrained(path)
        assert cfg == model.cfg and tokenizer.fingerprint == full_tokenizer.fingerprint
        assert (
            template.source == full_template.source
            and template.special_tokens == full_template.special_tokens
        )
