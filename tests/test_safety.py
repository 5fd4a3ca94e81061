"""Nothing the user owns is lost: output folders and files never replace what the tool did not write or what
it reads; temporaries are fresh files (a planted symlink is not followed); a full disk or an unreadable
file is one line, a non-zero exit and nothing half-written."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
from pathlib import Path

import pytest

from conftest import TINY, assert_user_error, call_cli, corpus_records, train_on_plays
from llm_training.cli import prepare_data
from llm_training.errors import UserError

PREPARE = ["--quiet", "--vocab-size", "300", "--workers", "1"]


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory) -> Path:
    """A folder holding one small text file of real prose."""
    folder = tmp_path_factory.mktemp("raw") / "raw"
    folder.mkdir()
    records = corpus_records("shakespeare", 2, lambda r: r["id"].endswith("_gut"))
    (folder / "plays.txt").write_text("\n\n".join(r["text"][:15_000] for r in records), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    checkpoint, test_text, plays = train_on_plays(root, 2)
    return root, checkpoint, test_text


def prepare(args: list[str]):
    return call_cli(prepare_data.main, [*PREPARE, *args])


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------- llm-prepare-data


def test_prepare_refuses_to_replace_its_input_or_the_current_folder(text_folder, tmp_path, monkeypatch):
    before = entries(text_folder)
    assert_user_error(prepare(["--input", str(text_folder), "--output", str(text_folder)]), "is the input")
    assert_user_error(
        prepare(["--input", str(text_folder / "plays.txt"), "--output", str(text_folder)]), "holds the input"
    )
    # even with --overwrite: the input is never replaced
    assert_user_error(
        prepare(["--input", str(text_folder), "--output", str(text_folder.parent), "--overwrite"]),
        "holds the input",
    )
    # nor written inside a folder it reads whole (the next run would read the output as input)
    assert_user_error(
        prepare(["--input", str(text_folder), "--output", str(text_folder / "prepared")]),
        "inside the input folder",
    )
    assert entries(text_folder) == before
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    assert_user_error(prepare(["--input", str(text_folder), "--output", "."]), "is the current folder")
    assert entries(tmp_path) == ["notes.txt"]


def test_prepare_keeps_a_foreign_folder_or_file_unless_told_to_overwrite(text_folder, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    proc = prepare(["--input", str(text_folder), "--output", str(other)])
    assert_user_error(proc, "precious.txt", "--overwrite")
    assert entries(other) == ["precious.txt"] and (other / "precious.txt").read_text() == "keep me"
    assert entries(tmp_path) == ["other"]  # no staging folder left beside it

    plain = tmp_path / "plain"
    plain.write_text("a file of mine")
    assert_user_error(prepare(["--input", str(text_folder), "--output", str(plain)]), "not a folder")
    assert plain.read_text() == "a file of mine" and entries(tmp_path) == ["other", "plain"]  # nothing hidden

    proc = prepare(["--input", str(text_folder), "--output", str(other), "--overwrite"])
    assert proc.returncode == 0, proc.stderr
    assert "precious.txt" not in entries(other) and (other / "train.json").is_file()
    assert entries(tmp_path) == ["other", "plain"]


def test_prepare_replaces_its_own_folder_and_nothing_more(text_folder, tmp_path):
    out = tmp_path / "prepared"
    assert prepare(["--input", str(text_folder), "--output", str(out)]).returncode == 0
    marker = json.loads((out / ".llm_training.json").read_text())
    assert marker["written_by"] == "llm-prepare-data" and "train.json" in marker["files"]
    first = (out / "vocab.json").read_text()
    again = prepare(["--input", str(text_folder), "--output", str(out), "--vocab-size", "320"])
    assert again.returncode == 0, again.stderr
    assert (out / "vocab.json").read_text() != first and entries(tmp_path) == ["prepared"]
    # a file added by the user makes the folder theirs
    (out / "my_notes.md").write_text("mine")
    assert_user_error(prepare(["--input", str(text_folder), "--output", str(out)]), "my_notes.md")
    assert (out / "my_notes.md").read_text() == "mine"


def test_reports_never_replace_the_data_they_describe(text_folder, tmp_path):
    from llm_training.cli import analyze_data, validate_data

    out = tmp_path / "prepared"
    assert prepare(["--input", str(text_folder), "--output", str(out)]).returncode == 0
    manifest = (out / "train.json").read_text()
    proc = call_cli(
        analyze_data.main, ["--data-file", str(out / "train.json"), "--output", str(out / "train.json")]
    )
    assert_user_error(proc, "--output", "is the input")
    proc = call_cli(validate_data.main, ["--data-dir", str(out), "--json", str(out / "train.json")])
    assert_user_error(proc, "--json", "is the input")
    assert (out / "train.json").read_text() == manifest


def test_merge_refuses_an_output_holding_its_inputs(tmp_path):
    from llm_training.data.merge import merge_prepared
    from llm_training.errors import UserError

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "precious.txt").write_text("x")
    with pytest.raises(UserError, match="holds the input"):
        merge_prepared([tmp_path / "a", tmp_path / "b"], tmp_path, overwrite=True)
    assert (tmp_path / "a" / "precious.txt").read_text() == "x"


def test_prepare_never_follows_or_replaces_a_link_and_checks_again_before_the_swap(text_folder, tmp_path):
    from llm_training.data.prepare import prepare_documents
    from llm_training.data.sources import Document

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(theirs)
    for extra in ([], ["--overwrite"]):  # even --overwrite replaces no link and nothing behind one
        assert_user_error(
            prepare(["--input", str(text_folder), "--output", str(link), *extra]), "symbolic link"
        )
    assert link.is_symlink() and entries(theirs) == ["keep.txt"]

    out = tmp_path / "prepared"
    assert prepare(["--input", str(text_folder), "--output", str(out)]).returncode == 0  # this tool's folder
    text = (text_folder / "plays.txt").read_text(encoding="utf-8")

    def documents():  # the user saves a file into the folder while it is being prepared again
        yield Document("a", text[: len(text) // 2])
        (out / "added_meanwhile.txt").write_text("mine")
        yield Document("b", text[len(text) // 2 :])

    with pytest.raises(UserError, match="added_meanwhile.txt"):
        prepare_documents(documents(), out, vocab_size=300)
    assert (out / "added_meanwhile.txt").read_text() == "mine" and (out / "train.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "prepared", "theirs"]  # no staging left


def test_results_and_configs_never_replace_a_file_of_the_users(trained, tmp_path):
    from llm_training.cli import evaluate, export, infer
    from llm_training.cli.main_job import cli_main

    root, checkpoint, test_text = trained
    args = ["--model-path", str(checkpoint), "--test-data", str(test_text), "--metrics", "perplexity"]
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "data"}')
    assert_user_error(
        call_cli(evaluate.main, [*args, "--output", str(mine)]), "was not written by this command"
    )
    link = tmp_path / "link.json"
    link.symlink_to(mine)
    assert_user_error(call_cli(evaluate.main, [*args, "--output", str(link)]), "symbolic link")
    ours = tmp_path / "results.json"
    for _ in range(2):  # its own earlier output is replaced
        assert call_cli(evaluate.main, [*args, "--output", str(ours)]).returncode == 0
    proc = call_cli(export.main, ["--checkpoint", str(checkpoint), "--format", "safetensors",
                                  "--output-dir", str(tmp_path / "exp"), "--json", str(mine)])  # fmt: skip
    assert_user_error(proc, "--json", "was not written by this command")
    assert not (tmp_path / "exp").exists()

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "A"}\n')
    (tmp_path / "out.jsonl.job.json").write_text("my own notes")
    proc = call_cli(infer.main, ["--model", str(checkpoint), "--input", str(prompts),
                                 "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "2"])  # fmt: skip
    assert_user_error(proc, "out.jsonl.job.json", "not a job record")
    assert (tmp_path / "out.jsonl.job.json").read_text() == "my own notes"

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("training:\n  batch_size: 4\n")  # a config file of the user's
    proc = call_cli(cli_main, ["--output-dir", str(run), "--max-time", "1s", *TINY])
    assert_user_error(proc, "config.yaml", "was not written by this command")
    assert (
        entries(run) == ["config.yaml"]
        and (run / "config.yaml").read_text() == "training:\n  batch_size: 4\n"
    )
    assert mine.read_text() == '{"my": "data"}' and link.is_symlink()


# ------------------------------------------------------------------------------------- temporaries


def test_export_never_replaces_what_it_reads_a_link_or_the_current_folder(trained, tmp_path, monkeypatch):
    """--overwrite replaces earlier exports only: never the folder that holds the checkpoint, the current
    folder, a link; a Hugging Face folder is swapped in whole and marked as the tool's."""
    import shutil

    from llm_training.cli import export

    _, checkpoint, _ = trained
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = Path(shutil.copy2(checkpoint, run / "checkpoints" / "model_final.pt"))
    before = ckpt.read_bytes()

    def export_to(output: str, fmt: str = "hf", *extra: str):
        return call_cli(export.main, ["--checkpoint", str(ckpt), "--format", fmt, "--output", output, *extra])

    assert_user_error(export_to(str(run), "hf", "--overwrite"), "holds the input")
    assert_user_error(export_to(str(ckpt), "safetensors", "--overwrite"), "is the input")
    monkeypatch.chdir(tmp_path)
    assert_user_error(export_to(".", "hf", "--overwrite"), "current folder")
    mine = tmp_path / "mine"
    mine.mkdir()
    (tmp_path / "link_hf").symlink_to(mine)
    assert_user_error(export_to(str(tmp_path / "link_hf"), "hf", "--overwrite"), "symbolic link")
    (tmp_path / "link.onnx").symlink_to(tmp_path / "elsewhere.onnx")
    assert_user_error(export_to(str(tmp_path / "link.onnx"), "onnx", "--overwrite"), "symbolic link")
    assert ckpt.read_bytes() == before and (tmp_path / "link_hf").is_symlink() and not entries(mine)
    hf = tmp_path / "hf"
    assert export_to(str(hf)).returncode == 0
    assert_user_error(export_to(str(hf)), "exists", "--overwrite")  # not replaced unless told
    (hf / "notes.txt").write_text("mine")
    assert export_to(str(hf), "hf", "--overwrite").returncode == 0  # told: replaced whole
    assert "notes.txt" not in entries(hf) and {"config.json", "model.safetensors"} <= set(entries(hf))
    assert json.loads((hf / ".llm_training.json").read_text())["written_by"] == "llm-export"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


def test_files_the_tool_reads_back_nested_too_deeply_are_one_line(trained, text_folder, tmp_path):
    """A marker, a checksum sidecar, a job record or a report nested 100,000 deep (json.loads raises
    RecursionError, not a ValueError) is damaged, said in one line; control codes in a path print as spaces."""
    import shutil

    from llm_training.cli import evaluate, infer
    from llm_training.train.checkpoint import sidecar_path

    _, checkpoint, test_text = trained
    deep = "[" * 100_000
    out = tmp_path / "out"
    out.mkdir()
    (out / ".llm_training.json").write_text(deep)
    (out / "train.json").write_text("{}")
    assert_user_error(prepare(["--input", str(text_folder), "--output", str(out)]), "did not write")
    copy = Path(shutil.copy2(checkpoint, tmp_path / "model.pt"))
    sidecar_path(copy).write_text(deep)
    proc = call_cli(evaluate.main, ["--model-path", str(copy), "--test-data", str(test_text)])
    assert_user_error(proc, "damaged")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "A"}\n')
    (tmp_path / "done.jsonl").write_text('{"id": 0}\n')
    (tmp_path / "done.jsonl.job.json").write_text(deep)
    proc = call_cli(infer.main, ["--model", str(checkpoint), "--input", str(prompts),
                                 "--output", str(tmp_path / "done.jsonl")])  # fmt: skip
    assert_user_error(proc, "not a job record")
    proc = call_cli(
        evaluate.main, ["--model-path", str(tmp_path / "a\x1b[31mred\rb.pt"), "--test-data", str(test_text)]
    )
    assert proc.returncode != 0 and "\x1b" not in proc.stderr and "\r" not in proc.stderr, proc.stderr


def test_a_symlink_planted_at_an_old_temporary_name_is_not_followed(tmp_path):
    from llm_training.config import load_config, save_config
    from llm_training.train.checkpoint import save_checkpoint

    victim = tmp_path / "victim.txt"
    victim.write_text("not yours")
    run = tmp_path / "run"
    run.mkdir()
    for old_name in ("config.yaml.tmp", f".model.pt.tmp-{os.getpid()}", f".model.pt.json.tmp-{os.getpid()}"):
        (run / old_name).symlink_to(victim)
    save_config(load_config(cli={}, environ={}, default_file=None), run / "config.yaml")
    save_checkpoint(run / "model.pt", {"weights": [1, 2, 3]})
    assert victim.read_text() == "not yours"
    assert "\nmodel:\n" in (run / "config.yaml").read_text()
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert sorted(leftovers) == sorted(["config.yaml.tmp", f".model.pt.tmp-{os.getpid()}",
                                        f".model.pt.json.tmp-{os.getpid()}"])  # fmt: skip


# ------------------------------------------------------------------------------------------ full disk


class _FullDisk:
    """A real file whose writes fail with ENOSPC after ``room`` bytes, as on a full disk."""

    def __init__(self, handle, room: int) -> None:
        self._handle, self._room = handle, room

    def write(self, data):
        if len(data) > self._room:
            self._handle.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __iter__(self):
        return iter(self._handle)


def full_disk_open(room: int = 100):
    """``open`` for a module whose writes should meet a full disk; reading works as usual."""

    def fake(file, mode="r", *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)  # noqa: SIM115 - the caller closes it
        return _FullDisk(handle, room) if any(c in mode for c in "wax+") else handle

    return fake


def hidden(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


def test_full_disk_while_preparing_is_one_line_and_leaves_nothing(text_folder, tmp_path, monkeypatch):
    from llm_training.data import prepare as prepare_module

    monkeypatch.setattr(prepare_module, "open", full_disk_open(1000), raising=False)
    proc = prepare(["--input", str(text_folder), "--output", str(tmp_path / "out")])
    assert_user_error(proc, "no space left", str(tmp_path))
    assert entries(tmp_path) == []  # no staging folder, no output
    # the main job prepares through the same code: one line, and no prepared folder or staging in the run
    from llm_training.cli import main_job

    proc = call_cli(main_job.cli_main, ["--input-file", str(text_folder / "plays.txt"), "--output-dir",
                                        str(tmp_path / "run"), *TINY, "--set", "training.max_steps=1"])  # fmt: skip
    assert_user_error(proc, "no space left", "prepared_data")
    assert entries(tmp_path / "run") == ["logs"]  # the log says what happened


def test_full_disk_while_saving_config_or_results(trained, tmp_path, monkeypatch):
    from llm_training import fileio
    from llm_training.cli import evaluate
    from llm_training.config import load_config, save_config
    from llm_training.errors import StorageError

    root, checkpoint, test_text = trained
    (tmp_path / "config.yaml").write_text("old: true\n")
    monkeypatch.setattr(fileio, "open", full_disk_open(10), raising=False)
    with pytest.raises(StorageError, match="config.yaml: no space left"):
        save_config(load_config(cli={}, environ={}, default_file=None), tmp_path / "config.yaml")
    assert (tmp_path / "config.yaml").read_text() == "old: true\n" and entries(tmp_path) == ["config.yaml"]
    out = tmp_path / "results.json"
    proc = call_cli(evaluate.main, ["--model-path", str(checkpoint), "--test-data", str(test_text),
                                    "--output", str(out), "--metrics", "perplexity"])  # fmt: skip
    assert_user_error(proc, "results.json: no space left")
    assert entries(tmp_path) == ["config.yaml"]  # no empty results file, no temporary


def test_full_disk_while_inferring_keeps_whole_batches_only(trained, tmp_path, monkeypatch):
    from llm_training.cli import infer

    root, checkpoint, _ = trained
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"To be {i}"}) + "\n" for i in range(6)))
    base = ["--model", str(checkpoint), "--input", str(prompts), "--max-new-tokens", "3", "--batch-size", "2"]
    monkeypatch.setattr(infer, "open", full_disk_open(20), raising=False)
    assert_user_error(call_cli(infer.main, [*base, "--output", str(tmp_path / "out.jsonl")]), "no space left")
    assert entries(tmp_path) == ["prompts.jsonl"]  # the new output and its record are gone
    monkeypatch.undo()
    assert call_cli(infer.main, [*base, "--output", str(tmp_path / "out.jsonl")]).returncode == 0
    whole = (tmp_path / "out.jsonl").read_text()
    # an output of this job with 2 of its lines: the disk fills during the next batch
    first_two = "".join(whole.splitlines(keepends=True)[:2])
    (tmp_path / "out.jsonl").write_text(first_two)
    monkeypatch.setattr(infer, "open", full_disk_open(20), raising=False)
    assert_user_error(call_cli(infer.main, [*base, "--output", str(tmp_path / "out.jsonl")]), "no space left")
    assert (tmp_path / "out.jsonl").read_text() == first_two  # no torn line
    monkeypatch.undo()
    resumed = call_cli(infer.main, [*base, "--output", str(tmp_path / "out.jsonl")])
    assert resumed.returncode == 0 and "(2 were already there)" in resumed.stdout
    assert (tmp_path / "out.jsonl").read_text() == whole


def test_infer_refuses_its_input_as_output_and_another_jobs_output(trained, tmp_path):
    from llm_training.cli import infer

    root, checkpoint, _ = trained
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"To be {i}"}) + "\n" for i in range(3)))
    before = prompts.read_text()
    base = ["--model", str(checkpoint), "--max-new-tokens", "2"]
    assert_user_error(call_cli(infer.main, [*base, "--input", str(prompts), "--output", str(prompts)]),
                      "is the input")  # fmt: skip
    assert prompts.read_text() == before
    out = tmp_path / "out.jsonl"
    foreign = '{"id": 0, "prompt": "To be 0", "completion": "from elsewhere", "new_tokens": 2}\n'
    out.write_text(foreign)
    args = [*base, "--input", str(prompts), "--output", str(out)]
    assert_user_error(call_cli(infer.main, args), "out.jsonl", "no record of the job", "another --output")
    assert out.read_text() == foreign
    out.unlink()
    assert call_cli(infer.main, args).returncode == 0
    record = json.loads((tmp_path / "out.jsonl.job.json").read_text())
    assert record["written_by"] == "llm-infer" and record["settings"]["max_new_tokens"] == 2
    done = out.read_text()
    assert "(3 were already there)" in call_cli(infer.main, args).stdout  # the same job: nothing to do
    changed = [*args[:3], "3", *args[4:]]  # --max-new-tokens 3
    assert_user_error(call_cli(infer.main, changed), "different settings")
    other = tmp_path / "other.jsonl"
    other.write_text(before.replace("To be", "Not to be"))
    assert_user_error(call_cli(infer.main, [*base, "--input", str(other), "--output", str(out)]),
                      "different input")  # fmt: skip
    assert out.read_text() == done


@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
def test_full_disk_while_exporting(trained, tmp_path, monkeypatch, fmt):
    from llm_training.cli import export

    root, checkpoint, _ = trained

    def half_written(path) -> None:  # the writer got 100 bytes out before the disk filled
        Path(path).write_bytes(b"\0" * 100)
        if fmt == "safetensors":  # what its Rust writer raises on a full disk
            from safetensors import SafetensorError

            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if fmt == "safetensors":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", lambda state, path, metadata: half_written(path))
    else:
        from llm_training.export import onnx

        monkeypatch.setattr(onnx, "_save", lambda proto, path, big: half_written(path))
    out = tmp_path / "exported"
    proc = call_cli(export.main, ["--checkpoint", str(checkpoint), "--format", fmt,
                                  "--output", str(out / f"model.{fmt}")])  # fmt: skip
    assert_user_error(proc, "no space left", f"model.{fmt}")
    assert entries(tmp_path) == []  # no staging folder, and the folder made for the export is gone


# ----------------------------------------------------------------------------------- unreadable files


@pytest.fixture
def unreadable(monkeypatch):
    """``unreadable(path)``: opening ``path`` fails as for a file the user may not read (chmod 000 alone
    does not stop root, so the error is raised at ``open``)."""

    def make(path: Path) -> Path:
        path.chmod(0)
        target, real = os.path.abspath(path), io.open

        def guarded(file, *args, **kwargs):
            if isinstance(file, str | os.PathLike) and os.path.abspath(file) == target:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
            return real(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded)
        monkeypatch.setattr(io, "open", guarded)
        return path

    return make


def test_an_unreadable_file_is_one_line_naming_it(trained, tmp_path, unreadable):
    from llm_training.cli import evaluate, infer, main_job, train

    root, checkpoint, test_text = trained
    cases = []
    for name, content in (("data.txt", "Some words. " * 200), ("config.yaml", "training:\n  batch_size: 4\n"),
                          ("test.txt", "A test. " * 100), ("prompts.jsonl", '{"prompt": "a"}\n')):  # fmt: skip
        (tmp_path / name).write_text(content)
    for name, main, args in (
        ("data.txt", prepare_data.main, ["--input", "{}", "--output", str(tmp_path / "p"), "--quiet"]),
        ("data.txt", main_job.cli_main, ["--input-file", "{}", "--output-dir", str(tmp_path / "run")]),
        ("config.yaml", train.main, ["--config", "{}"]),
        ("test.txt", evaluate.main, ["--model-path", str(checkpoint), "--test-data", "{}"]),
        ("prompts.jsonl", infer.main, ["--model", str(checkpoint), "--input", "{}", "--output", str(tmp_path / "o")]),
    ):  # fmt: skip
        cases.append((name, main, [str(tmp_path / name) if a == "{}" else a for a in args]))
    for name, _, _ in cases:
        unreadable(tmp_path / name)
    for name, main, args in cases:
        assert_user_error(call_cli(main, args), name, "permission denied")
    assert not (tmp_path / "p").exists() and not (tmp_path / "o").exists()
