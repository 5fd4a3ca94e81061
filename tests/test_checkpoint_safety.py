"""Damaged checkpoints are never used silently, loading a ``.pt`` never runs code, and a run never replaces
another run's model (issue 19): real checkpoints of a tiny run, damaged on disk, through the real commands."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from conftest import assert_user_error, call_cli, prepared_plays, run_cli, set_flags
from llm_training.cli.compare import main as compare_main
from llm_training.cli.evaluate import main as evaluate_main
from llm_training.cli.export import main as export_main
from llm_training.cli.infer import main as infer_main
from llm_training.cli.main_job import cli_main as main_job
from llm_training.cli.serve import main as serve_main
from llm_training.cli.train import main as train_main
from llm_training.train import checkpoint as ckpt

SETTINGS = {
    "model.num_layers": 1, "model.hidden_size": 32, "model.num_attention_heads": 4, "model.max_seq_length": 32,
    "training.batch_size": 4, "training.log_interval": 1, "training.eval_interval": 3, "training.eval_batches": 1,
    "training.checkpoint_interval": 3, "training.sample_tokens": 0, "training.max_steps": 6,
    "resources.device": "cpu", "resources.num_threads": 1, "logging.progress_bar": False,
    "checkpoint.keep_last": 100,
}  # fmt: skip


@pytest.fixture(scope="module")
def plays(tmp_path_factory):
    """Two prepared data sets with their own tokenizers (four plays, and three)."""
    four, three = tmp_path_factory.mktemp("four"), tmp_path_factory.mktemp("three")
    return prepared_plays(four, 4), prepared_plays(three, 3, chars=20_000)


@pytest.fixture(scope="module")
def finished(plays, tmp_path_factory):
    """A finished run (steps 3 and 6, final, best) on the four plays, never touched: tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = call_cli(train_main, train_args(plays[0], out))
    assert proc.returncode == 0, proc.stderr
    return out


def train_args(data: Path, out: Path, *extra: str, **settings) -> list[str]:
    return ["--data-dir", str(data), "--output-dir", str(out), *set_flags({**SETTINGS, **settings}), *extra]


@pytest.fixture
def run(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def flip_a_tensor_byte(path: Path) -> None:
    """Flip one byte inside the largest tensor record of the archive (not padding or a header)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = (int.from_bytes(data[info.header_offset + o : info.header_offset + o + 2], "little")
                           for o in (26, 28))  # fmt: skip
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ damaged checkpoints


def test_flipped_byte_without_sidecar_is_refused_by_every_command(run, plays, tmp_path):
    final = run / "checkpoints" / "model_final.pt"
    ckpt.sidecar_path(final).unlink()
    assert ckpt.load_checkpoint(final)["step"] == 6  # intact without its sidecar: the CRCs vouch for it
    flip_a_tensor_byte(final)
    text = tmp_path / "test.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 20)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ROMEO:"}\n')
    assert_user_error(call_cli(evaluate_main, ["--model-path", str(final), "--test-data", str(text), "--device", "cpu"]),
                   "model_final.pt: corrupted", "CRC")  # fmt: skip
    assert_user_error(call_cli(export_main, ["--checkpoint", str(final), "--format", "safetensors", "--output",
                                          str(tmp_path / "m.safetensors")]), "model_final.pt: corrupted")  # fmt: skip
    assert not (tmp_path / "m.safetensors").exists()
    assert_user_error(call_cli(infer_main, ["--model", str(final), "--input", str(prompts), "--output",
                                         str(tmp_path / "out.jsonl"), "--device", "cpu"]), "corrupted")  # fmt: skip
    assert_user_error(call_cli(train_main, train_args(plays[0], run, "--resume", str(final), **{"training.max_steps": 9})),
                   "model_final.pt: corrupted")  # fmt: skip


def test_auto_resume_skips_a_damaged_checkpoint_without_sidecar_on_the_console(run, plays):
    folder = run / "checkpoints"
    for side in folder.glob("*.pt.json"):
        side.unlink()
    (folder / "model_final.pt").unlink()
    flip_a_tensor_byte(folder / "model_step_6.pt")
    proc = call_cli(train_main, train_args(plays[0], run, "--resume", "auto"))
    assert proc.returncode == 0, proc.stderr
    assert "warning: resume auto: skipping" in proc.stderr and "model_step_6.pt: corrupted" in proc.stderr
    assert f"continuing from {folder / 'model_step_3.pt'} (step 3)" in proc.stderr
    assert "done: 6 steps" in proc.stdout
    assert ckpt.load_checkpoint(folder / "model_step_6.pt")["step"] == 6  # the replayed step saved again


def test_every_checkpoint_damaged_starts_from_step_zero_on_the_console(run, plays):
    folder = run / "checkpoints"
    for path in folder.glob("model_*.pt"):
        ckpt.sidecar_path(path).unlink()
        flip_a_tensor_byte(path)
    proc = call_cli(train_main, train_args(plays[0], run, "--resume", "auto"))
    assert proc.returncode == 0, proc.stderr
    assert "every checkpoint in" in proc.stderr and "training starts from step 0" in proc.stderr
    assert "model_step_3.pt" in proc.stderr and "model_step_6.pt" in proc.stderr


MALFORMED = {
    "bytes a string": lambda r: {**r, "bytes": str(r["bytes"])},
    "bytes null": lambda r: {**r, "bytes": None},
    "bytes a list": lambda r: {**r, "bytes": [r["bytes"]]},
    "step not a number": lambda r: {**r, "step": "six"},
    "sha256 not text": lambda r: {**r, "sha256": 12},
    "not json": lambda r: '{"sha256": ',
    "json not an object": lambda r: [r],
    "huge": lambda r: {**r, "pad": "x" * (2 << 20)},
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_sidecar_is_a_damaged_checkpoint_in_one_line(run, plays, tmp_path, kind):
    folder = run / "checkpoints"
    side = ckpt.sidecar_path(folder / "model_final.pt")
    value = MALFORMED[kind](json.loads(side.read_text()))
    side.write_text(value if isinstance(value, str) else json.dumps(value))
    final, text = folder / "model_final.pt", tmp_path / "t.txt"
    text.write_text("Enter ROMEO.\n" * 20)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"O"\n')
    for proc in (
        call_cli(evaluate_main, ["--model-path", str(final), "--test-data", str(text), "--device", "cpu"]),
        call_cli(export_main, ["--checkpoint", str(final), "--format", "gguf", "--output", str(tmp_path / "m.gguf")]),
        call_cli(infer_main, ["--model", str(final), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl")]),
        call_cli(train_main, train_args(plays[0], run, "--resume", str(final), **{"training.max_steps": 9})),
    ):  # fmt: skip
        assert_user_error(proc, "model_final.pt: its checksum file model_final.pt.json is damaged")
    # resume auto lists and skips it (its step is not trusted), continuing from model_step_6.pt
    assert ckpt.latest_checkpoint(folder) == folder / "model_step_6.pt"


# ------------------------------------------------------------------------------------ TorchScript is code

EVIL = """
import sys, torch
from typing import Tuple
class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.x = torch.zeros(1)
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return ids
    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, bool]:
        return (self.x, self.training)
    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:
        print("TORCHSCRIPT CODE RAN")
        self.x = state[0]
        self.training = state[1]
torch.jit.save(torch.jit.script(M()), sys.argv[1])
"""


def test_a_torchscript_archive_named_pt_is_refused_and_never_run(finished, tmp_path):
    """Its load would print (TorchScript's own __setstate__ runs in torch.jit.load): loaded as a checkpoint it
    is refused in one line and prints nothing; with --format torchscript it runs, as asked."""
    evil, script = tmp_path / "model_final.pt", tmp_path / "make_evil.py"
    script.write_text(EVIL)  # torch.jit.script reads the class's source from a file
    made = run_cli([str(script), str(evil)], tmp_path)
    assert made.returncode == 0, made.stderr
    text = tmp_path / "t.txt"
    text.write_text("Enter ROMEO.\n" * 20)
    command = ["-m", "llm_training.cli.evaluate", "--model-path", str(evil), "--test-data", str(text)]
    refused = run_cli(command, tmp_path)
    assert_user_error(
        refused, "model_final.pt: a TorchScript archive, not a checkpoint", "--format torchscript"
    )
    assert "CODE RAN" not in refused.stdout + refused.stderr
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"O"\n')
    infer = call_cli(
        infer_main, ["--model", str(evil), "--input", str(prompts), "--output", str(tmp_path / "o.jsonl")]
    )
    assert_user_error(infer, "a TorchScript archive")
    trusted = run_cli([*command, "--format", "torchscript"], tmp_path)
    assert "TORCHSCRIPT CODE RAN" in trusted.stdout  # the same file does run code when asked to load it
    assert_user_error(trusted, "TorchScript without llm_training's config.json")


def test_the_exporters_torchscript_loads_by_name_or_with_format(finished, tmp_path):
    from llm_training.export.exporter import ExportOptions, export_checkpoint

    exported = tmp_path / "model.torchscript.pt"
    export_checkpoint(finished / "checkpoints" / "model_final.pt",
                      ExportOptions(format="torchscript", output=exported))  # fmt: skip
    text = tmp_path / "t.txt"
    text.write_text("Enter ROMEO.\n" * 20)
    by_name = call_cli(
        evaluate_main, ["--model-path", str(exported), "--test-data", str(text), "--device", "cpu"]
    )
    assert by_name.returncode == 0, by_name.stderr
    renamed = shutil.copyfile(exported, tmp_path / "renamed.pt")
    args = ["--model-path", str(renamed), "--test-data", str(text), "--device", "cpu"]
    assert_user_error(call_cli(evaluate_main, args), "a TorchScript archive", "--format torchscript")
    trusted = call_cli(evaluate_main, [*args, "--format", "torchscript"])
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.stdout.split("loss")[1].split()[0] == by_name.stdout.split("loss")[1].split()[0]
    assert_user_error(call_cli(evaluate_main, [*args, "--format", "tflite"]), "unknown model format 'tflite'")
    # llm-serve checks the model before starting its workers; llm-compare takes --format too
    served = call_cli(serve_main, ["--model", str(renamed), "--workers", "2", "--port", "1"])
    assert_user_error(served, "renamed.pt: a TorchScript archive")
    report = tmp_path / "compare.html"
    compared = call_cli(compare_main, ["--models", str(renamed), "--test-data", str(text), "--output", str(report),
                                       "--device", "cpu", "--format", "torchscript"])  # fmt: skip
    assert compared.returncode == 0, compared.stderr
    assert json.loads(report.with_name("compare.html.json").read_text())["models"][0]["loss"] > 0


# ------------------------------------------------------------------------------------ failed final save


def test_on_save_error_continue_says_the_final_checkpoint_was_not_saved(plays, tmp_path, monkeypatch):
    original = ckpt._open_tmp

    def open_tmp(path):
        if "model_final" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path)

    monkeypatch.setattr(ckpt, "_open_tmp", open_tmp)
    out = tmp_path / "run"
    proc = call_cli(train_main, train_args(plays[0], out, **{"checkpoint.on_save_error": "continue"}))
    assert proc.returncode == 1, proc.stderr
    assert "final checkpoint: NOT SAVED (disk full)" in proc.stdout
    assert f"warning: could not save {out / 'checkpoints' / 'model_final.pt'}: disk full" in proc.stderr
    assert f"error: {out / 'checkpoints' / 'model_final.pt'} was not saved (disk full)" in proc.stderr
    assert not (out / "checkpoints" / "model_final.pt").exists()
    assert (out / "checkpoints" / "model_step_6.pt").is_file()


# ------------------------------------------------------------------------------------ another run's model


def test_resume_on_data_of_another_tokenizer_is_refused_before_anything_is_written(run, plays):
    before = snapshot(run)
    step3 = run / "checkpoints" / "model_step_3.pt"
    proc = call_cli(train_main, train_args(plays[1], run, "--resume", str(step3)))
    assert_user_error(proc, "the data was tokenized with another tokenizer", "model_step_3.pt's")
    # the reported case: the main job resumed without --input-file would train on the built-in sample
    proc = call_cli(main_job, ["--output-dir", str(run), "--resume-from", str(step3), *set_flags(SETTINGS)])
    assert_user_error(proc, "would be prepared with a newly trained tokenizer", "model_step_3.pt")
    assert snapshot(run) == before  # byte for byte: no log, no prepared data, no checkpoint


def test_a_fresh_run_does_not_replace_another_runs_checkpoints(run, plays):
    before = snapshot(run)
    other_data = call_cli(train_main, train_args(plays[1], run))
    assert_user_error(other_data, "another tokenizer", "--resume auto", "--output-dir")
    assert snapshot(run) == before  # refused before anything is written
    # other raw text is prepared first (a bad file is reported as in an empty folder), then refused
    sample = call_cli(main_job, ["--output-dir", str(run), *set_flags(SETTINGS)])
    assert_user_error(sample, "another tokenizer", "the checkpoints already in", "--output-dir")
    assert snapshot(run / "checkpoints") == {
        k.removeprefix("checkpoints/"): v for k, v in before.items() if k.startswith("checkpoints/")
    }
    # the same job again, on the same data, retrains and replaces its own model (as the main job always has)
    again = call_cli(train_main, train_args(plays[0], run, **{"training.max_steps": 3}))
    assert again.returncode == 0, again.stderr
    assert ckpt.load_checkpoint(run / "checkpoints" / "model_final.pt")["step"] == 3
