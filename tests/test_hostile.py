"""Hostile input, generated here (nothing stored), against every reader of user input: llm-prepare-data
--input, the main job's --input-file, llm-train --config / --set / environment, llm-evaluate --test-data and
llm-infer --input. Each case ends with one line and a non-zero exit (or exit 0 with the bad record counted,
where that is the command's documented behaviour), never a traceback; memory and time are bounded by design
(aliases counted before expansion, lines capped before they are held, sizes checked before allocation),
and the error line itself is short whatever the input quoted."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pytest

from conftest import call_cli, corpus_records, run_cli
from llm_training.config import RANGES, SECTIONS, Config, load_config
from llm_training.errors import ConfigError, quoted
from llm_training.limits import MAX_LINE_BYTES, MAX_NEW_TOKENS, yaml_load

GOOD = [
    {"id": f"good{i}", "text": f"Plain English sentence number {i} about the weather, the sea and the town."}
    for i in range(8)
]
DEEP = "[" * 100_000 + "]" * 100_000
BIG_INT = "9" * 5000
# 9 ** 8 = 43 million "lol"s from 300 bytes of YAML
LAUGHS = "".join(
    f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join([f'*{chr(96 + i)}'] * 9 if i else ['lol'] * 9)}]\n"
    for i in range(9)
)


def short_error(proc, *needles: str) -> str:
    """Exit 2, one short line on stderr ('error: ...'), no traceback; returns the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and len(lines[0]) < 1000, lines[0][:3000]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A one-layer model trained for one step on two plays (seconds): (checkpoint, prepared data)."""
    from llm_training.data.prepare import prepare_documents
    from llm_training.data.sources import Document
    from llm_training.train.loop import train

    root = tmp_path_factory.mktemp("hostile")
    plays = corpus_records("shakespeare", 2, lambda r: r["id"].endswith("_gut"))
    docs = [Document(r["id"], r["text"][:20_000]) for r in plays]
    data = prepare_documents(docs, root / "data", vocab_size=300, validation_fraction=0.5).output_dir
    values = {"output_dir": str(root / "run"), "model.num_layers": 1, "model.hidden_size": 32,
              "model.num_attention_heads": 2, "model.max_seq_length": 32, "training.batch_size": 4,
              "training.max_steps": 1, "training.sample_tokens": 0, "training.eval_at_start": False,
              "training.eval_batches": 1, "logging.progress_bar": False, "logging.tensorboard": False}  # fmt: skip
    result = train(load_config(cli=values, environ={}, default_file=None), data, handle_signals=False)
    return Path(result.final_checkpoint), Path(data)


# ------------------------------------------------------------------------------- llm-prepare-data --input

# (file name, content, reason counted in prepare_report.json): the good records are kept, the bad one counted
PREPARE_SKIPPED = {
    "deep_nesting": ("a.jsonl", jsonl(*GOOD, '{"text": ' + DEEP + "}"), "invalid_json"),
    "lone_surrogate_text": ("a.jsonl", jsonl(*GOOD, '{"text": "caf\\ud800 au lait"}'), "invalid_unicode"),
    "lone_surrogate_low": ("a.jsonl", jsonl(*GOOD, '{"text": "x \\udfff y"}'), "invalid_unicode"),
    "lone_surrogate_id": ("a.jsonl", jsonl(*GOOD, '{"id": "\\ud800", "text": "ok text"}'), "invalid_unicode"),
    "text_is_number": ("a.jsonl", jsonl(*GOOD, {"id": 1, "text": 5}), "text_not_a_string"),
    "text_is_null": ("a.jsonl", jsonl(*GOOD, {"text": None}), "text_not_a_string"),
    "text_is_object": ("a.jsonl", jsonl(*GOOD, {"text": {"a": [1]}}), "text_not_a_string"),
    "text_is_nan": ("a.jsonl", jsonl(*GOOD, '{"text": NaN}'), "text_not_a_string"),
    "duplicated_key": ("a.jsonl", jsonl(*GOOD, '{"text": "fine", "text": 7}'), "text_not_a_string"),
    "line_is_list": ("a.jsonl", jsonl(*GOOD, "[1, 2]"), "not_an_object"),
    "line_is_number": ("a.jsonl", jsonl(*GOOD, "42"), "not_an_object"),
    "line_is_null": ("a.jsonl", jsonl(*GOOD, "null"), "not_an_object"),
    "huge_integer": ("a.jsonl", jsonl(*GOOD, '{"id": ' + BIG_INT + ', "text": "x"}'), "invalid_json"),
    "not_utf8": ("a.jsonl", jsonl(*GOOD).encode() + b'{"text": "caf\xe9"}\n', "not_utf8"),
    "huge_line": ("a.jsonl", jsonl(*GOOD, {"text": "word " * 300_000}), "line_too_long"),
    "no_text_field": (
        "a.jsonl",
        jsonl(*GOOD, {"body": "x" * 10_000, **{f"k{i}": i for i in range(500)}}),
        "missing_text_field",
    ),  # fmt: skip
    "json_list_with_bad_items": ("a.json", json.dumps([*GOOD, 5]), "not_an_object"),
}


@pytest.mark.parametrize("case", sorted(PREPARE_SKIPPED))
def test_prepare_counts_a_hostile_record_and_keeps_the_rest(case, tmp_path):
    from llm_training.cli.prepare_data import main

    name, content, reason = PREPARE_SKIPPED[case]
    source = write(tmp_path / name, content)
    out = tmp_path / "out"
    proc = call_cli(main, ["--input", str(source), "--output", str(out), "--vocab-size", "260", "--workers", "1",
                           "--max-document-bytes", "1000000", "--quiet"])  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["problems"]["counts"] == {reason: 1}
    assert report["documents_read"] == len(GOOD)
    assert all(len(json.dumps(e)) < 2000 for e in report["problems"]["examples"])  # quoted, not copied


PREPARE_FAILS = {
    "empty_file": ("a.jsonl", b"", "input file is empty"),
    "only_deep_nesting": ("a.jsonl", '{"text": ' + DEEP + "}\n", "invalid_json: 1"),
    "deep_json_file": ("a.json", "[" + DEEP + "]", "invalid_json: 1"),
    "only_surrogates": ("a.jsonl", jsonl('{"text": "\\ud800"}', '{"text": "\\udc00"}'), "invalid_unicode: 2"),
    "binary_nul_bytes": ("a.jsonl", b'{"text": "a"}\n\x00\x00\x00\n', "binary_file: 1"),
    "json_is_a_number": ("a.json", "3.5", "invalid_json: 1"),
    "json_is_null": ("a.json", "null", "invalid_json: 1"),
}


@pytest.mark.parametrize("case", sorted(PREPARE_FAILS))
def test_prepare_with_nothing_usable_is_one_line(case, tmp_path):
    from llm_training.cli.prepare_data import main

    name, content, needle = PREPARE_FAILS[case]
    source = write(tmp_path / name, content)
    short_error(
        call_cli(main, ["--input", str(source), "--output", str(tmp_path / "out"), "--quiet"]), needle
    )


def test_prepare_reads_a_bom_crlf_file_and_a_csv_with_a_bom(tmp_path):
    from llm_training.data.sources import FileSource

    source = write(tmp_path / "a.jsonl", b"\xef\xbb\xbf" + jsonl(*GOOD).replace("\n", "\r\n").encode())
    reader = FileSource(source, on_error="fail")
    assert [d.id for d in reader.documents()] == [g["id"] for g in GOOD]
    table = write(tmp_path / "a.csv", b"\xef\xbb\xbfid,text\r\n1,hello there\r\n")
    assert [d.text for d in FileSource(table, on_error="fail").documents()] == ["hello there"]


# ------------------------------------------------------------------------------- the main job --input-file

MAIN_JOB = {
    "lone_surrogate": (jsonl(*GOOD, '{"text": "a\\ud800b"}'), "a.jsonl:9: a lone surrogate \\ud800"),
    "deep_nesting": (jsonl('{"text": ' + DEEP + "}"), "a.jsonl:1: invalid JSON (nested too deeply)"),
    "text_is_number": (jsonl({"text": 5}), "a.jsonl:1: field 'text' is int, not a string"),
    "huge_integer": (
        jsonl('{"text": "a", "n": ' + BIG_INT + "}"),
        "a.jsonl:1: invalid JSON (a number too long",
    ),
    "huge_line": (jsonl(*GOOD, {"text": "w " * 200_000}), "a.jsonl:9: line of 400,013 bytes is longer"),
    "line_is_list": (jsonl("[]"), "a.jsonl:1: expected an object"),
}


@pytest.mark.parametrize("case", sorted(MAIN_JOB))
def test_main_job_stops_at_a_hostile_record_with_its_line(case, tmp_path):
    from llm_training.cli.main_job import cli_main

    content, needle = MAIN_JOB[case]
    source = write(tmp_path / "a.jsonl", content)
    proc = call_cli(cli_main, ["--input-file", str(source), "--output-dir", str(tmp_path / "run"),
                               "--set", "data.max_document_bytes=300000"])  # fmt: skip
    short_error(proc, needle, "data.on_error=skip")


# -------------------------------------------------------------------- llm-train --config, --set, environment

CONFIGS = {
    "billion_laughs": (LAUGHS + "model:\n  num_layers: *i\n", "aliases expand to more than 100,000 values"),
    "billion_laughs_in_a_value": (
        "model:\n  num_layers: ["
        + ", ".join(LAUGHS.splitlines()[i].split(": ", 1)[1] for i in range(9))
        + "]\n",
        "aliases expand to more than 100,000 values",
    ),
    "recursive_alias": ("model:\n  num_layers: &a [*a]\n", "an alias refers to itself"),
    "deep_nesting": (
        "model:\n  num_layers: " + "[" * 100_000 + "]" * 100_000 + "\n",
        "nested deeper than 64",
    ),
    "deep_block_nesting": ("".join(" " * i + f"k{i}:\n" for i in range(200)), "nested deeper than 64"),
    "deep_mixed_nesting": (
        "model:\n  num_layers: " + '{"a": [' * 40 + "1" + "]}" * 40 + "\n",
        "nested deeper",
    ),
    "duplicated_key": ("model:\n  num_layers: 2\n  num_layers: 3\n", "line 3: key 'num_layers' repeated"),
    "duplicated_section": ("model: {}\ntraining: {}\nmodel: {}\n", "key 'model' repeated"),
    "huge_integer": (f"training:\n  max_steps: {BIG_INT}\n", "a value cannot be read"),
    "nan": (
        "training:\n  learning_rate: .nan\n",
        "'training.learning_rate' must be a finite number, got nan",
    ),
    "infinity": ("training:\n  grad_clip: .inf\n", "'training.grad_clip' must be a finite number, got inf"),
    "nan_in_a_list": ("vision:\n  mean: [.nan, 0, 0]\n", "'vision.mean' expects a list of numbers"),
    "top_level_list": ("- 1\n- 2\n", "expected a mapping of sections"),
    "top_level_number": ("42\n", "expected a mapping of sections"),
    "section_is_a_number": ("model: 5\n", "section 'model' must be a mapping"),
    "nul_byte": ("model:\n  num_layers: 2\x00\n", "invalid YAML"),
    "not_utf8": (b"model:\n  model_type: caf\xe9\n", "not UTF-8 text"),
    "lone_surrogate_escape": ('training:\n  sample_prompt: "a\\ud800"\n', "lone surrogate \\ud800"),
    "huge_string": (
        "training:\n  max_steps: " + "x" * 200_000 + "\n",
        "'training.max_steps' expects an integer",
    ),
    "long_key": ("model:\n  " + "k" * 1000 + ": 1\n", "unknown key 'model.kkkk"),
    "huge_key": ("model:\n  " + "k" * 200_000 + ": 1\n", "invalid YAML"),
    "too_large_a_file": ("# " + "x" * (1 << 18) + "\n", "too large for a config file"),
    "max_seq_length_1e8": ("model:\n  max_seq_length: 1e8\n", "model.max_seq_length must be from 1 to"),
    "vocab_2e9": ("model:\n  vocab_size: 2000000000\n", "parameters fit; lower model.hidden_size"),
    "vocab_3e9": ("model:\n  vocab_size: 3000000000\n", "model.vocab_size must be from 2 to 2,147,483,648"),
    "text_for_a_number": (
        "model:\n  num_layers: many\n",
        "'model.num_layers' expects an integer, got 'many'",
    ),
    "sample_tokens_1e9": (
        "training:\n  sample_tokens: 1000000000\n",
        "training.sample_tokens must be from 0",
    ),
    "max_time_1e300": ("training:\n  max_time: 1.0e+300\n", "training.max_time: at most"),
    "max_time_text": (
        "training:\n  max_time: " + "9" * 400 + "h\n",
        "training.max_time: the time budget must be positive and finite",
    ),
    "negative_batch": ("training:\n  batch_size: -4\n", "training.batch_size must be at least 1"),
    "zero_layers": ("model:\n  num_layers: 0\n", "model.num_layers must be at least 1"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_hostile_config_file_is_one_short_line(case, tmp_path, model):
    from llm_training.cli.train import main

    content, needle = CONFIGS[case]
    path = write(tmp_path / "c.yaml", content)
    args = ["--config", str(path), "--data-dir", str(model[1]), "--output-dir", str(tmp_path / "run")]
    if "laughs" in case:  # traced only here: tracing slows Python's allocations down a lot
        tracemalloc.start()
    try:
        proc = call_cli(main, args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    short_error(proc, needle)
    assert peak < 64 << 20, peak  # a 43-million-value alias bomb is refused unexpanded
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "settings, needle",
    [
        (["model.vocab_size=1000000000"], "parameters fit; lower model.hidden_size"),
        (["model.hidden_size=1048576"], "parameters fit; lower model.hidden_size"),
        (["model.num_layers=60000", "model.hidden_size=8192"], "parameters fit"),
        (["model.max_seq_length=16000000", "model.hidden_size=4096"], "of position tables alone"),
        (
            ["model.model_type=gpt2", "model.max_seq_length=16000000", "model.hidden_size=65536"],
            "parameters fit",
        ),
    ],
)
def test_absurd_sizes_are_refused_before_allocating_with_what_fits(settings, needle, tmp_path, model):
    """Against this machine's free memory (a GPU's when training runs there); never the allocator's traceback."""
    from llm_training.cli.train import main

    sets = [x for s in [*settings, "model.num_attention_heads=2"] for x in ("--set", s)]
    proc = call_cli(
        main, ["--data-dir", str(model[1]), "--output-dir", str(tmp_path / "run"), *sets, "--device", "cpu"]
    )
    short_error(proc, needle, "free")


@pytest.mark.parametrize(
    "setting, needle",
    [
        ("data.text_field=\udcff", "lone surrogate \\udcff"),  # argv bytes that are not UTF-8
        ("output_dir=a\x00b", "a NUL character"),
        ("training.max_steps=1e400", "must be a finite number"),
        ("training.learning_rate=nan", "must be a finite number, got nan"),
        ("training.max_steps=" + BIG_INT, "must be a finite number"),
        ("model.num_layers=" + LAUGHS.replace("\n", " "), "expects an integer"),
        ("training.batch_size=" + "9" * 30, "is out of range"),
        ("training.seed=-1", "training.seed must be from 0"),
        ("data.seed=4294967296", "data.seed must be from 0 to 4,294,967,295"),
        ("training.sample_prompt=" + "p" * 2_000_000, "2,000,000 characters"),
        ("no_equals_sign" * 10_000, "expected KEY=VALUE"),
    ],
)
def test_hostile_set_override_is_one_short_line(setting, needle, tmp_path, model):
    from llm_training.cli.train import main

    args = ["--data-dir", str(model[1]), "--output-dir", str(tmp_path / "run"), "--set", setting]
    short_error(call_cli(main, args), needle)


@pytest.mark.parametrize(
    "name, value, needle",
    [
        (
            "LLM_TRAINING__MODEL__HIDDEN_SIZE",
            "nan",
            "environment: 'model.hidden_size' must be a finite number",
        ),
        ("LLM_TRAINING__TRAINING__SAMPLE_PROMPT", "\udced\udca0", "lone surrogate"),
        ("LLM_TRAINING__MODEL__NUM_LAYERS", "-3", "model.num_layers must be at least 1"),
        ("LLM_TRAINING__MODEL__VOCAB_SIZE", "1e12", "model.vocab_size must be from 2 to"),
    ],
)
def test_hostile_environment_variable_is_one_short_line(name, value, needle, tmp_path, model, monkeypatch):
    from llm_training.cli.train import main

    monkeypatch.setitem(os.environ, name, value)
    short_error(call_cli(main, ["--data-dir", str(model[1]), "--output-dir", str(tmp_path / "run")]), needle)


def numeric_keys() -> list[str]:
    """Every config key that takes a number (alone or besides text or None)."""
    import typing

    cfg, keys = Config(), []
    for section in SECTIONS:
        for name, tp in typing.get_type_hints(type(getattr(cfg, section))).items():
            if set(typing.get_args(tp) or (tp,)) & {int, float}:
                keys.append(f"{section}.{name}")
    return keys


def test_every_numeric_config_key_has_a_range():
    keys = numeric_keys()
    assert len(keys) > 50 and "model.hidden_size" in keys and "training.max_time" in keys
    assert sorted(set(keys) - set(RANGES) - {"training.max_time", "resources.timeout"}) == []


@pytest.mark.parametrize("key", sorted(RANGES))
def test_each_numeric_key_refuses_values_outside_its_range(key):
    low, high = RANGES[key]
    for value in (low - 1, high * 2 + 1, float("nan"), float("inf"), -(10**30)):
        with pytest.raises(ConfigError) as info:
            load_config(cli={key: value}, environ={}, default_file=None)
        assert len(str(info.value)) < 500 and key.split(".")[1] in str(info.value)


def test_numbers_written_as_text_or_exponents_are_read():
    cfg = load_config(cli={"model.num_layers": "3", "training.max_steps": "1e3", "training.learning_rate": "6e-4",
                           "data.max_document_bytes": 2048.0}, environ={}, default_file=None)  # fmt: skip
    assert (cfg.model.num_layers, cfg.training.max_steps, cfg.data.max_document_bytes) == (3, 1000, 2048)
    with pytest.raises(ConfigError, match="'model.num_layers' expects an integer, got 2.5"):
        load_config(cli={"model.num_layers": 2.5}, environ={}, default_file=None)


def test_bounded_yaml_and_quoting_helpers():
    assert yaml_load("a: &x [1, 2]\nb: *x\n") == {"a": [1, 2], "b": [1, 2]}  # ordinary aliases still work
    assert yaml_load("base: &b {x: 1}\nother:\n  <<: *b\n  y: 2\n")["other"] == {"x": 1, "y": 2}
    bomb = ["lol"] * 9
    for _ in range(8):
        bomb = [bomb] * 9
    assert len(quoted(bomb)) <= 200 and len(quoted("x" * 10**7)) <= 200
    assert quoted(10**5000) == "<an integer of 16,610 bits>" and quoted("a\ud800") == "'a\\ud800'"


def test_a_config_with_a_bom_and_crlf_loads(tmp_path):
    path = write(tmp_path / "c.yaml", b"\xef\xbb\xbfmodel:\r\n  num_layers: 3\r\n")
    assert load_config(path, environ={}, default_file=None).model.num_layers == 3


# ------------------------------------------------------------------------------- llm-evaluate --test-data

EVALUATE = {
    "deep_jsonl": ("t.jsonl", jsonl('{"text": ' + DEEP + "}"), "t.jsonl: line 1: not valid JSON (nested too deeply)"),
    "deep_json": ("t.json", "[" + DEEP + "]", "t.json: line 1: not valid JSON (nested too deeply)"),
    "surrogate_text": ("t.jsonl", jsonl({"text": "ok"}, '{"text": "a\\ud800"}'), "t.jsonl: line 2: 'text' holds a lone"),
    "surrogate_prompt": ("t.jsonl", jsonl('{"prompt": "\\udc00", "choices": ["a", "b"], "answer": 0}'),
                         "line 1: 'prompt' holds a lone surrogate"),
    "surrogate_choice": ("t.jsonl", jsonl('{"prompt": "p", "choices": ["a", "\\ud801"], "answer": 0}'),
                         "line 1: a choice holds a lone surrogate"),
    "surrogate_label": ("t.jsonl", jsonl({"text": "a", "label": "x"}, '{"text": "b", "label": "\\ud800"}'),
                        "line 2: 'label' holds a lone surrogate"),
    "text_is_number": ("t.jsonl", jsonl({"text": 5}), "line 1: 'text' is int, not a string"),
    "text_is_null": ("t.jsonl", jsonl({"text": None}), "line 1: 'text' is null, not a string"),
    "text_is_nan": ("t.jsonl", jsonl('{"text": NaN}'), "line 1: 'text' is float, not a string"),
    "labelled_text_is_list": ("t.jsonl", jsonl({"text": [1], "label": "a"}, {"text": "b", "label": "c"}),
                              "line 1: a labelled record's 'text' is list, not a string"),
    "line_is_list": ("t.jsonl", jsonl("[1]"), "line 1: expected a JSON object, got list"),
    "line_is_number": ("t.jsonl", jsonl("7"), "line 1: expected a JSON object, got int"),
    "line_is_null": ("t.jsonl", jsonl("null"), "line 1: expected a JSON object, got NoneType"),
    "json_is_a_number": ("t.json", "12", "expected a JSON list of records"),
    "huge_integer_answer": ("t.jsonl", jsonl('{"prompt": "p", "choices": ["a", "b"], "answer": ' + BIG_INT + "}"),
                            "line 1: not valid JSON (a number too long to read)"),
    "answer_is_huge_list": ("t.jsonl", jsonl({"prompt": "p", "choices": ["a", "b"], "answer": list(range(10**5))}),
                            "'answer' [0, 1, 2"),
    "many_choices": ("t.jsonl", jsonl({"prompt": "p", "choices": [str(i) for i in range(1001)], "answer": 0}),
                     "1,001 choices, more than 1,000"),
    "many_labels": ("t.jsonl", jsonl(*({"text": "t", "label": i} for i in range(1001))),
                    "1,001 different labels, more than 1,000"),
    "huge_jsonl_line": ("t.jsonl", jsonl({"text": "a" * (MAX_LINE_BYTES + 10)}), "t.jsonl: line 1: 16,777,"),
    "huge_txt_line": ("t.txt", "short line\n" + "w" * (MAX_LINE_BYTES + 1), "t.txt: line 2: 16,777,217 bytes"),
    "empty_txt": ("t.txt", "", "empty test file"),
    "blank_jsonl": ("t.jsonl", "\n\n\r\n", "empty test file"),
    "not_utf8": ("t.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', "t.jsonl: line 2: not UTF-8"),
    "missing_fields": ("t.jsonl", jsonl({f"k{i}": i for i in range(10_000)}), "no 'text', 'prompt'"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(EVALUATE))
def test_hostile_test_data_is_one_line_naming_it(case, tmp_path, model):
    from llm_training.cli.evaluate import main

    name, content, needle = EVALUATE[case]
    path = write(tmp_path / name, content)
    short_error(
        call_cli(main, ["--model-path", str(model[0]), "--test-data", str(path), "--device", "cpu"]), needle
    )


def test_evaluate_reads_a_bom_crlf_file(tmp_path, model):
    from llm_training.cli.evaluate import main

    body = jsonl(*({"text": g["text"]} for g in GOOD)).replace("\n", "\r\n").encode()
    path = write(tmp_path / "t.jsonl", b"\xef\xbb\xbf" + body)
    proc = call_cli(main, ["--model-path", str(model[0]), "--test-data", str(path), "--device", "cpu",
                           "--output", str(tmp_path / "r.json")])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["tokens"] > 50


# ------------------------------------------------------------------------------------ llm-infer --input

INFER = {
    "max_new_tokens_1e9": (jsonl({"prompt": "a", "max_new_tokens": 10**9}),
                           "line 1: 'max_new_tokens' 1,000,000,000 is more than llm-infer generates"),
    "max_new_tokens_huge_integer": (jsonl('{"prompt": "a", "max_new_tokens": ' + BIG_INT + "}"),
                                    "line 1: not valid JSON (a number too long to read)"),
    "max_new_tokens_nan": (jsonl('{"prompt": "a", "max_new_tokens": NaN}'), "'max_new_tokens' must be a whole"),
    "max_new_tokens_text": (jsonl({"prompt": "a", "max_new_tokens": "10"}), "got '10'"),
    "max_new_tokens_negative": (jsonl({"prompt": "a", "max_new_tokens": -5}), "got -5"),
    "max_new_tokens_list": (jsonl({"prompt": "a", "max_new_tokens": list(range(10**5))}), "got [0, 1, 2"),
    "deep_nesting": (jsonl({"prompt": "ok"}, '{"prompt": ' + DEEP + "}"), "line 2: not valid JSON (nested too"),
    "surrogate_prompt": (jsonl({"prompt": "ok"}, '{"prompt": "x\\ud800"}'), "line 2: holds a lone surrogate"),
    "surrogate_string_line": (jsonl('"\\udfff"'), "line 1: holds a lone surrogate"),
    "surrogate_id": (jsonl('{"prompt": "ok", "id": "\\ud800"}'), "line 1: holds a lone surrogate"),
    "prompt_is_number": (jsonl({"prompt": 5}), "line 1: 'prompt' is int, not a string"),
    "text_is_list": (jsonl({"text": [1, 2]}), "line 1: 'text' is list, not a string"),
    "line_is_list": (jsonl("[1]"), 'line 1: expected {"prompt": "..."}'),
    "line_is_null": (jsonl("null"), 'line 1: expected {"prompt": "..."}'),
    "huge_line": (jsonl({"prompt": "a" * (MAX_LINE_BYTES + 10)}), "line 1: longer than the 16,777,216 bytes"),
    "not_utf8": (b'{"prompt": "a"}\n{"prompt": "\xc3\x28"}\n', "line 2: not UTF-8"),
    "empty": ("\n \n", "empty input"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(INFER))
def test_hostile_prompt_file_is_one_line_before_any_output(case, tmp_path, model):
    from llm_training.cli.infer import main

    content, needle = INFER[case]
    path = write(tmp_path / "p.jsonl", content)
    out = tmp_path / "out.jsonl"
    short_error(
        call_cli(main, ["--model", str(model[0]), "--input", str(path), "--output", str(out)]), needle
    )
    assert not out.exists()  # every line is checked before the model loads or anything is written


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--temperature", "nan"], "temperature must be finite"),
        (["--temperature", "inf"], "temperature must be finite"),
        (["--repetition-penalty", "inf"], "repetition_penalty must be positive and finite"),
        (["--top-p", "nan"], "top_p must be in (0, 1]"),
        (["--seed", "9" * 30], "--seed must be within"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--max-new-tokens", "-1"], "--max-new-tokens 0 to"),
    ],
)
def test_hostile_infer_flags_are_one_line(flags, needle, tmp_path, model):
    from llm_training.cli.infer import main

    path = write(tmp_path / "p.jsonl", jsonl({"prompt": "a"}))
    args = ["--model", str(model[0]), "--input", str(path), "--output", str(tmp_path / "o.jsonl"), *flags]
    short_error(call_cli(main, args), needle)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--vocab-size", "2000000000"], "data.vocab_size must be from 260 to"),
        (["--max-document-bytes", "0"], "data.max_document_bytes must be at least 1"),
        (["--workers", "100000"], "data.workers must be from 0 to 1,024"),
        (["--max-length", "-1"], "data.max_seq_length must be at least 1"),
        (["--validation-fraction", "nan"], "'data.validation_fraction' must be a finite number"),
        (["--min-quality", "inf"], "'data.min_quality' must be a finite number"),
        (["--seed", "-1"], "data.seed must be from 0"),
        (["--text-field", "te\udcffxt"], "'data.text_field' cannot be used as text"),
    ],
)
def test_hostile_prepare_flags_are_one_line(flags, needle, tmp_path):
    from llm_training.cli.prepare_data import main

    path = write(tmp_path / "a.jsonl", jsonl(*GOOD))
    short_error(call_cli(main, ["--input", str(path), "--output", str(tmp_path / "out"), *flags]), needle)


def test_infer_caps_the_max_new_tokens_flag_and_reads_a_bom_crlf_file(tmp_path, model):
    from llm_training.cli.infer import main

    path = write(
        tmp_path / "p.jsonl",
        b"\xef\xbb\xbf" + jsonl({"prompt": "the sea"}, '"and"').replace("\n", "\r\n").encode(),
    )
    out = tmp_path / "out.jsonl"
    args = ["--model", str(model[0]), "--input", str(path), "--output", str(out), "--device", "cpu"]
    short_error(
        call_cli(main, [*args, "--max-new-tokens", str(10**9)]), f"--max-new-tokens 0 to {MAX_NEW_TOKENS:,}"
    )
    proc = call_cli(main, [*args, "--max-new-tokens", "3"])
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["the sea", "and"] and all(r["new_tokens"] <= 3 for r in rows)


# ------------------------------------------------------------------------ the real entry points, once each


def test_real_commands_print_one_line_for_a_laughs_config_and_a_surrogate_prompt(tmp_path, model):
    config = write(tmp_path / "c.yaml", LAUGHS + "model:\n  num_layers: *i\n")
    proc = run_cli(
        ["-m", "llm_training.cli.train", "--config", str(config), "--data-dir", str(model[1])], tmp_path
    )
    short_error(proc, "c.yaml: line 6: its aliases expand to more than 100,000 values")
    prompts = write(tmp_path / "p.jsonl", jsonl({"prompt": "fine"}, '{"prompt": "\\ud800", "id": 2}'))
    proc = run_cli(["-m", "llm_training.cli.infer", "--model", str(model[0]), "--input", str(prompts),
                    "--output", str(tmp_path / "o.jsonl")], tmp_path)  # fmt: skip
    short_error(proc, "p.jsonl: line 2: holds a lone surrogate \\ud800")


# ------------------------------------------------------------------ prepared manifests (llm-train --data-dir)

MANIFESTS = {
    "deep_nesting": (lambda m: "[" * 100_000 + "]" * 100_000, "not a valid manifest"),
    "dtype_object": (lambda m: {**m, "dtype": "object"}, "'dtype' must be uint16 or uint32, got 'object'"),
    "negative_count": (lambda m: {**m, "num_tokens": -5}, "'num_tokens' must be a whole number"),
    "count_as_text": (lambda m: {**m, "vocab_size": "300"}, "'vocab_size' must be a whole number"),
    "nan_count": (lambda m: {**m, "num_bytes": float("nan")}, "'num_bytes' must be a whole number"),
    "shard_outside": (
        lambda m: {**m, "shards": [{"path": "../../x.bin", "num_tokens": 1}]},
        "'path' must be a file",
    ),
    "shards_not_a_list": (lambda m: {**m, "shards": {"a": 1}}, "'shards' must be a list"),
    "shard_count_huge": (lambda m: {**m, "shards": [{**m["shards"][0], "num_tokens": 10**30}]}, "shard 0"),
}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_hostile_manifest_is_one_line(case, tmp_path, model):
    import shutil

    from llm_training.cli.train import main

    data = shutil.copytree(model[1], tmp_path / "data")
    change, needle = MANIFESTS[case]
    manifest = json.loads((data / "train.json").read_text())
    changed = change(manifest)
    (data / "train.json").write_text(changed if isinstance(changed, str) else json.dumps(changed))
    proc = call_cli(main, ["--data-dir", str(data), "--output-dir", str(tmp_path / "run")])
    short_error(proc, "train.json", needle)
