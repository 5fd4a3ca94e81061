"""``llm-evaluate`` on real text and on labelled files built here: every metric, every format, bad input."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from conftest import assert_user_error, call_cli, corpus_records, run_cli, train_on_plays
from llm_training.errors import DataError
from llm_training.eval.data import read_test_data
from llm_training.eval.metrics import macro_f1, parse_metrics

EVALUATE = ["-m", "llm_training.cli.evaluate"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small model trained for 60 steps on four Shakespeare plays; a fifth play is the test text."""
    root = tmp_path_factory.mktemp("evaluate")
    checkpoint, test_text, plays = train_on_plays(root, 60)
    return root, checkpoint, test_text, plays


def evaluate(args, cwd):
    return run_cli([*EVALUATE, *args], cwd)


def test_plain_text_metrics_agree_with_their_definitions(trained, tmp_path):
    root, checkpoint, text, _ = trained
    out = tmp_path / "results" / "eval.json"
    proc = evaluate(["--model-path", str(checkpoint), "--test-data", str(text), "--metrics",
                     "loss,perplexity,bits_per_byte,accuracy", "--output", str(out)], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["data_kind"] == "text" and r["tokens"] > 1000
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-9)
    bytes_ = len(text.read_text(encoding="utf-8").encode())
    assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / math.log(2) / bytes_, rel=1e-9)
    assert 0.05 < r["accuracy"] < 1 and r["loss"] < math.log(512)  # it learned something
    assert "perplexity" in proc.stdout


def test_the_guides_command_on_a_json_test_file_with_next_token_f1(trained, tmp_path):
    """The usage guide's command as written, on plain text in data/test.json; accuracy and F1 of next-token
    prediction recomputed here, window by window, with Counters."""
    import torch

    from llm_training.train.artifacts import load_trained

    _, checkpoint, text, _ = trained
    documents = [p for p in text.read_text(encoding="utf-8").split("\n\n") if p.strip()][:40]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.json").write_text(json.dumps([{"text": d} for d in documents], indent=2))
    proc = evaluate(["--model-path", str(checkpoint), "--test-data", "data/test.json", "--metrics",
                     "perplexity,accuracy,f1", "--output", "results/eval_results.json"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "results" / "eval_results.json").read_text())
    assert set(r) >= {"perplexity", "accuracy", "f1"} and "loss" not in r
    loaded = load_trained(checkpoint)
    model, tok = loaded.model.eval(), loaded.tokenizer
    stream = [t for d in documents for t in [*tok.encode(d), tok.eot_id]]
    context, truth, guess = model.cfg.max_seq_length, [], []
    with torch.no_grad():
        for start in range(0, len(stream) - 1, context):
            window = stream[start : start + context + 1]
            guess += model(torch.tensor([window[:-1]]))[0].argmax(-1).tolist()
            truth += window[1:]
    assert r["accuracy"] == pytest.approx(sum(t == g for t, g in zip(truth, guess, strict=True)) / len(truth))
    hits = Counter(t for t, g in zip(truth, guess, strict=True) if t == g)
    targets, guesses = Counter(truth), Counter(guess)
    f1 = [2 * hits[c] / (targets[c] + guesses[c]) for c in set(truth) | set(guess)]
    assert r["f1"] == pytest.approx(sum(f1) / len(f1), rel=1e-6) and 0 < r["f1"] < r["accuracy"]


def test_multiple_choice_and_classification(trained, tmp_path):
    _, checkpoint, _, plays = trained
    lines = [ln.strip() for ln in plays[4]["text"].splitlines() if len(ln.strip()) > 40][:12]
    choices = tmp_path / "choices.jsonl"
    with open(choices, "w", encoding="utf-8") as handle:
        for i, line in enumerate(lines):  # the real line against two strings no play contains
            options = [line[20:], "qzxv jjkw vvqp xxzq kkjw", "Zx9 #q@ 7Qv !! zz"]
            handle.write(json.dumps({"prompt": line[:20], "choices": options, "answer": 0 if i % 2 else options[0]}) + "\n")  # fmt: skip
    proc = evaluate(["--model-path", str(checkpoint), "--test-data", str(choices), "--metrics", "perplexity,accuracy,f1",
                     "--output", str(tmp_path / "mc.json")], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "mc.json").read_text())
    assert r["data_kind"] == "choices" and r["items"] == 12 and r["accuracy"] >= 0.9
    assert 0 <= r["f1"] <= 1 and r["perplexity"] > 1
    labelled = tmp_path / "labels.jsonl"
    bible = corpus_records("kjv_bible", 6)
    with open(labelled, "w", encoding="utf-8") as handle:
        for line in lines[:6]:
            handle.write(json.dumps({"text": line, "label": "play"}) + "\n")
        for record in bible:
            handle.write(json.dumps({"text": record["text"][:200], "label": "scripture"}) + "\n")
    proc = evaluate(["--model-path", str(checkpoint), "--test-data", str(labelled), "--metrics", "accuracy,f1",
                     "--output", str(tmp_path / "lab.json")], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "lab.json").read_text())
    assert r["data_kind"] == "labels" and r["labels"] == ["play", "scripture"] and r["items"] == 12
    assert 0 <= r["accuracy"] <= 1 and 0 <= r["f1"] <= 1
    # with no --metrics, the command and Trainer.evaluate give the same dictionary: every metric, f1 too
    from llm_training import Trainer

    default = evaluate(["--model-path", str(checkpoint), "--test-data", str(labelled), "--output",
                        str(tmp_path / "default.json")], tmp_path)  # fmt: skip
    assert default.returncode == 0, default.stderr
    cli = json.loads((tmp_path / "default.json").read_text())
    api = Trainer(output_dir=str(checkpoint.parents[1])).evaluate(test_data=str(labelled))
    for key in ("loss", "perplexity", "bits_per_byte", "accuracy", "f1"):
        assert api[key] == pytest.approx(cli[key], rel=1e-6), key
    assert cli["accuracy"] == r["accuracy"] and cli["f1"] == r["f1"]
    # llm-compare on the same labelled file: every metric per model, in the JSON and as a chart; a copy of
    # the model is indistinguishable from it (the noise resampled over the 12 items)
    out = tmp_path / "cmp" / "labelled.html"
    copy = tmp_path / "copy.pt"
    copy.write_bytes(checkpoint.read_bytes())
    proc = run_cli(["-m", "llm_training.cli.compare", "--models", str(checkpoint), str(copy), "--test-data",
                    str(labelled), "--output", str(out)], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    compared = json.loads(out.with_name("labelled.html.json").read_text())
    row = compared["models"][0]
    assert row["f1"] == pytest.approx(cli["f1"]) and row["accuracy"] == pytest.approx(cli["accuracy"])
    assert compared["ranked_by"] == "accuracy" and "units" not in row
    accuracy = next(v for v in compared["comparison"] if v["metric"] == "accuracy")
    assert accuracy["units"] == 12 and "over 12 items" in accuracy["noise"]
    assert sorted(accuracy["best"]) == sorted([str(checkpoint), str(copy)])
    assert out.read_text(encoding="utf-8").count("<svg") == 5


def test_macro_f1_and_metric_names():
    assert macro_f1([0, 0, 1, 1], [0, 0, 1, 1], 2) == 1.0
    # class 0: P=1/2, R=1/2 -> 0.5; class 1: P=1/2, R=1/2 -> 0.5
    assert macro_f1([0, 0, 1, 1], [0, 1, 0, 1], 2) == pytest.approx(0.5)
    assert macro_f1([0, 0, 0, 1], [0, 0, 0, 0], 2) == pytest.approx((6 / 7 + 0) / 2)
    assert parse_metrics("Perplexity, accuracy,f1") == ["perplexity", "accuracy", "f1"]
    with pytest.raises(Exception, match="unknown bleu; valid: loss, perplexity"):
        parse_metrics("perplexity,bleu")


def test_bad_test_data_is_named_with_its_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: not valid JSON"):
        read_test_data(bad)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "a", "choices": ["b", "c"], "answer": 0}\n{"text": "x", "label": "y"}\n')
    with pytest.raises(DataError, match=r"mixed.jsonl: line 2: a labels record in a file of choices records"):
        read_test_data(mixed)
    answer = tmp_path / "answer.jsonl"
    answer.write_text('{"prompt": "a", "choices": ["b", "c"], "answer": 5}\n')
    with pytest.raises(DataError, match=r"answer.jsonl: line 1: 'answer' 5 is neither"):
        read_test_data(answer)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty test file"):
        read_test_data(tmp_path / "empty.txt")
    # a .json list names the line where the bad record starts, in a list or under "data"
    records = [{"text": "a"}, {"text": "b"}, {"txt": "c"}]
    (tmp_path / "list.json").write_text(json.dumps(records, indent=2))
    with pytest.raises(DataError, match=r"list.json: line 8: no 'text'"):
        read_test_data(tmp_path / "list.json")
    (tmp_path / "wrapped.json").write_text(json.dumps({"name": "t", "data": records}, indent=2))
    with pytest.raises(DataError, match=r"wrapped.json: line 10: no 'text'"):
        read_test_data(tmp_path / "wrapped.json")
    # bytes that are not UTF-8, in every format
    for name in ("latin.txt", "latin.jsonl", "latin.json"):
        (tmp_path / name).write_bytes(
            b'["ok",\n{"text": "caf\xe9"}]'
            if name.endswith(".json")
            else b'{"text": "x"}\n{"text": "caf\xe9"}\n'
        )
        with pytest.raises(DataError, match=rf"{name}: line 2: not UTF-8 text"):
            read_test_data(tmp_path / name)


def test_command_line_errors(trained, tmp_path):
    _, checkpoint, text, _ = trained
    assert_user_error(evaluate(["--model-path", str(tmp_path / "none.pt"), "--test-data", str(text)], tmp_path),
                      "checkpoint not found")  # fmt: skip
    from llm_training.cli.evaluate import main as evaluate_main

    def in_process(
        args,
    ):  # the rest fail before any work: in this process (the run above shows the real exit)
        return call_cli(evaluate_main, args)

    assert_user_error(in_process(["--model-path", str(checkpoint), "--test-data", str(tmp_path / "none.jsonl")]),
                      "test data not found")  # fmt: skip
    assert_user_error(in_process(["--model-path", str(checkpoint), "--test-data", str(text), "--metrics", "bleu"]),
                      "unknown bleu")  # fmt: skip
    (tmp_path / "latin.txt").write_bytes(b"fine\ncaf\xe9\n")
    assert_user_error(in_process(["--model-path", str(checkpoint), "--test-data", str(tmp_path / "latin.txt")]),
                      "latin.txt: line 2: not UTF-8")  # fmt: skip
    not_a_checkpoint = tmp_path / "x.pt"
    not_a_checkpoint.write_text("hello")
    assert_user_error(in_process(["--model-path", str(not_a_checkpoint), "--test-data", str(text)]),
                      "not a readable checkpoint")  # fmt: skip


# ----------------------------------------------------------------------------------------- llm-infer

INFER = ["-m", "llm_training.cli.infer"]


def prompts_file(path, plays, n=9):
    lines = [ln.strip() for ln in plays[4]["text"].splitlines() if len(ln.strip()) > 30][:n]
    with open(path, "w", encoding="utf-8") as handle:
        for i, line in enumerate(lines):
            record = {"prompt": line[:30], "id": f"p{i}"}
            if i == 2:
                record["max_new_tokens"] = 3
            handle.write(json.dumps(record) + "\n")
    return lines


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_llm_infer_keeps_order_and_resumes_a_half_written_output(trained, tmp_path):
    _, checkpoint, _, plays = trained
    lines = prompts_file(tmp_path / "prompts.jsonl", plays)
    base = [
        *INFER,
        "--model",
        str(checkpoint),
        "--input",
        str(tmp_path / "prompts.jsonl"),
        "--max-new-tokens",
        "12",
    ]
    full = run_cli([*base, "--output", str(tmp_path / "all.jsonl"), "--batch-size", "4"], tmp_path)
    assert full.returncode == 0, full.stderr
    rows = read_jsonl(tmp_path / "all.jsonl")
    assert [r["id"] for r in rows] == [f"p{i}" for i in range(len(lines))]
    assert [r["prompt"] for r in rows] == [ln[:30] for ln in lines]
    assert rows[2]["new_tokens"] <= 3 and all(r["new_tokens"] <= 12 for r in rows)
    one_by_one = run_cli([*base, "--output", str(tmp_path / "single.jsonl"), "--batch-size", "1"], tmp_path)
    assert (
        one_by_one.returncode == 0 and read_jsonl(tmp_path / "single.jsonl") == rows
    )  # batching changes nothing
    # an interrupted run: 4 complete lines and a torn fifth
    partial = tmp_path / "partial.jsonl"
    text = (tmp_path / "all.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    partial.write_text("".join(text[:4]) + text[4][:10], encoding="utf-8")
    # by the same job (its record beside the output: model, input and settings)
    (tmp_path / "partial.jsonl.job.json").write_bytes((tmp_path / "all.jsonl.job.json").read_bytes())
    resumed = run_cli([*base, "--output", str(partial), "--batch-size", "4"], tmp_path)
    assert resumed.returncode == 0 and "(4 were already there)" in resumed.stdout
    # not a terminal: plain progress lines with the count, rate and the total, not a redrawn bar
    assert "\r" not in resumed.stderr and "infer: 100%" in resumed.stderr and "(9/9 in all)" in resumed.stderr
    assert partial.read_text(encoding="utf-8") == (tmp_path / "all.jsonl").read_text(encoding="utf-8")


def test_llm_infer_stop_strings_long_prompts_and_bad_input(trained, tmp_path):
    _, checkpoint, _, plays = trained
    prompts_file(tmp_path / "prompts.jsonl", plays, 3)
    base = [*INFER, "--model", str(checkpoint), "--input", str(tmp_path / "prompts.jsonl")]
    # --compile: accepted everywhere, it compiles only where decoding runs as CUDA graphs (not on a CPU)
    plain = run_cli(
        [*base, "--output", str(tmp_path / "a.jsonl"), "--max-new-tokens", "20", "--compile"], tmp_path
    )
    assert plain.returncode == 0, plain.stderr
    first = read_jsonl(tmp_path / "a.jsonl")[0]["completion"]
    stop = first.strip()[:2]
    stopped = run_cli(
        [*base, "--output", str(tmp_path / "b.jsonl"), "--max-new-tokens", "20", "--stop", stop], tmp_path
    )
    assert stopped.returncode == 0, stopped.stderr
    assert stop not in read_jsonl(tmp_path / "b.jsonl")[0]["completion"]
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": plays[4]["text"][:5000]}) + "\n", encoding="utf-8")
    cut = run_cli([*INFER, "--model", str(checkpoint), "--input", str(long), "--output", str(tmp_path / "c.jsonl"),
                   "--max-new-tokens", "4"], tmp_path)  # fmt: skip
    assert cut.returncode == 0 and "cut to its last" in cut.stderr
    refused = run_cli([*INFER, "--model", str(checkpoint), "--input", str(long), "--output", str(tmp_path / "d.jsonl"),
                       "--no-truncate"], tmp_path)  # fmt: skip
    assert_user_error(refused, "long.jsonl: line 1: prompt of", "does not fit the context of 64")
    (tmp_path / "empty.jsonl").write_text("\n")
    assert_user_error(run_cli([*INFER, "--model", str(checkpoint), "--input", str(tmp_path / "empty.jsonl"),
                               "--output", str(tmp_path / "e.jsonl")], tmp_path), "empty input")  # fmt: skip
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    assert_user_error(run_cli([*INFER, "--model", str(checkpoint), "--input", str(tmp_path / "bad.jsonl"),
                               "--output", str(tmp_path / "f.jsonl")], tmp_path), "bad.jsonl: line 2")  # fmt: skip
    assert_user_error(run_cli([*INFER, "--model", str(tmp_path / "no.pt"), "--input", str(tmp_path / "prompts.jsonl"),
                               "--output", str(tmp_path / "g.jsonl")], tmp_path), "checkpoint not found")  # fmt: skip
    # bad records and flags are named; a flag is checked before the model is even looked for
    from llm_training.cli.infer import main as infer_main

    for name, content, needle in (
        ("count.jsonl", '{"prompt": "a"}\n{"prompt": "b", "max_new_tokens": "ten"}\n', "count.jsonl: line 2: 'max_new_tokens'"),
        ("latin.jsonl", b'{"prompt": "a"}\n\n{"prompt": "caf\xe9"}\n', "latin.jsonl: line 3: not UTF-8"),
        ("null.jsonl", '{"prompt": "a", "max_new_tokens": null}\n{"prompt": "b", "max_new_tokens": -1}\n',
         "null.jsonl: line 2: 'max_new_tokens' must be"),  # null: the flag's value
    ):  # fmt: skip
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        assert_user_error(call_cli(infer_main, ["--model", str(checkpoint), "--input", str(tmp_path / name),
                                                "--output", str(tmp_path / "h.jsonl")]), needle)  # fmt: skip
    assert_user_error(call_cli(infer_main, ["--model", str(tmp_path / "no.pt"), "--input", str(tmp_path / "prompts.jsonl"),
                                            "--output", str(tmp_path / "g.jsonl"), "--top-p", "0"]), "top_p must be in")  # fmt: skip


# ----------------------------------------------------------------------------------------- llm-compare, Trainer


def test_llm_compare_writes_an_offline_report_checked_in_a_browser(trained, tmp_path):
    import torch
    from test_data_tools import _browser

    from llm_training.model.transformer import Transformer
    from llm_training.train.artifacts import load_trained
    from llm_training.train.checkpoint import load_checkpoint, save_checkpoint

    _, checkpoint, text, _ = trained
    state = load_checkpoint(checkpoint)
    torch.manual_seed(1)
    state["model"] = Transformer(
        load_trained(checkpoint).config.model
    ).state_dict()  # the same model untrained
    untrained = save_checkpoint(tmp_path / "untrained.pt", state)
    out = tmp_path / "report" / "comparison.html"
    proc = run_cli(["-m", "llm_training.cli.compare", "--models", str(checkpoint), str(untrained), "--test-data",
                    str(text), "--output", str(out)], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    numbers = json.loads(out.with_name("comparison.html.json").read_text())
    trained_r, untrained_r = numbers["models"]
    assert (
        trained_r["perplexity"] < untrained_r["perplexity"]
        and trained_r["accuracy"] > untrained_r["accuracy"]
    )
    page = out.read_text(encoding="utf-8")
    assert not any(
        ref in page for ref in ('src="http', "src='http", 'href="http', "url(http")
    )  # nothing fetched
    assert page.count("<svg") == 4
    dom = _browser(tmp_path, "--dump-dom", out.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Model comparison" in dom.stdout and "untrained.pt" in dom.stdout and "perplexity" in dom.stdout
    assert f"{trained_r['perplexity']:.4f}" in dom.stdout
    assert "lower is better" in dom.stdout
    missing = run_cli(["-m", "llm_training.cli.compare", "--models", str(tmp_path / "x.pt"), "--test-data", str(text),
                       "--output", str(out)], tmp_path)  # fmt: skip
    assert_user_error(missing, "checkpoint not found")


def test_llm_compare_ranks_by_bits_per_byte_and_says_what_is_within_noise(trained, tmp_path):
    """Four models on one play: the checkpoint, a copy with its weights nudged (perplexity a hair apart), its
    safetensors export (no step) and the same weights under another tokenizer: loss and perplexity are not
    compared across tokenizers, bits per byte ranks, and the first three are indistinguishable."""
    import torch

    from llm_training.config import model_config_json
    from llm_training.data.tokenizer import Tokenizer
    from llm_training.eval.metrics import evaluate_model
    from llm_training.export.weights import save_weights
    from llm_training.train.artifacts import load_trained
    from llm_training.train.checkpoint import load_checkpoint, save_checkpoint

    _, checkpoint, text, plays = trained
    # every scored token and every byte lands in one block: the blocks add up to the reported numbers
    loaded = load_trained(checkpoint)
    size = len(text.read_bytes())
    r = evaluate_model(loaded.model, loaded.tokenizer, read_test_data(text), ["loss", "accuracy"], units=True)
    units = r["units"]
    assert len(units["nll"]) == size // 1024 and sum(units["bytes"]) == size
    assert sum(units["tokens"]) == r["tokens"] and sum(units["nll"]) / r["tokens"] == pytest.approx(r["loss"])
    assert sum(units["hits"]) / r["tokens"] == pytest.approx(r["accuracy"])

    state = load_checkpoint(checkpoint)
    torch.manual_seed(0)
    state["model"] = {k: v + 2e-4 * torch.randn_like(v) if v.is_floating_point() else v
                      for k, v in state["model"].items()}  # fmt: skip
    nudged = save_checkpoint(tmp_path / "nudged.pt", state)
    other = Tokenizer.train(
        [p["text"][:30_000] for p in plays[:2]], vocab_size=loaded.model.cfg.vocab_size - 40
    )
    assert (
        other.fingerprint != loaded.tokenizer.fingerprint and other.vocab_size <= loaded.model.cfg.vocab_size
    )
    state = load_checkpoint(checkpoint)
    state["tokenizer_json"] = other.backend.to_str()
    retokenized = save_checkpoint(tmp_path / "retokenized.pt", state)
    export = tmp_path / "export" / "model.safetensors"
    export.parent.mkdir()
    save_weights(loaded.model, loaded.tokenizer, export, model_config_json(loaded.model.cfg))
    out = tmp_path / "cmp.html"
    models = [str(checkpoint), str(nudged), str(export), str(retokenized)]
    proc = run_cli(["-m", "llm_training.cli.compare", "--models", *models, "--test-data", str(text), "--output",
                    str(out)], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    numbers = json.loads(out.with_name("cmp.html.json").read_text())
    verdicts = {v["metric"]: v for v in numbers["comparison"]}
    first, second = numbers["models"][:2]
    assert 0 < abs(first["perplexity"] - second["perplexity"]) < 0.05 * first["perplexity"]
    for metric in ("loss", "perplexity", "accuracy"):  # per token: not across tokenizers
        assert not verdicts[metric]["comparable"] and "tokenize" in verdicts[metric]["reason"], metric
    bpb = verdicts["bits_per_byte"]
    assert numbers["ranked_by"] == "bits_per_byte" and bpb["comparable"] and bpb["units"] == size // 1024
    assert sorted(bpb["best"]) == sorted(models[:3]) and bpb["order"][-1] == str(retokenized)
    worse = {d["model"]: d for d in bpb["differences"]}
    far = worse[str(retokenized)]
    assert not far["within_noise"] and far["difference"] > far["margin"] > 0 and far["paired_low"] > 0
    assert all(
        abs(worse[m]["difference"]) <= worse[m]["margin"] for m in models if m in worse and m != models[3]
    )
    assert [m["step"] for m in numbers["models"]] == [60, 60, None, 60]
    page = out.read_text(encoding="utf-8")
    assert "indistinguishable" in page and "no single best" in page and "loss: not comparable" in page
    assert "<td>None</td>" not in page and "<td>—</td>" in page  # the export's step
    assert "no single best" in proc.stdout and "ranked by bits_per_byte" in proc.stdout


def test_noise_estimate_on_known_per_block_scores():
    """compare_metric on hand-made per-block scores: a consistent 0.01% difference is within noise (the
    paired interval alone would call it real), a 50% one is not; loss is not compared across tokenizers;
    too few blocks: no model is named best."""
    import numpy as np

    from llm_training.eval.noise import compare_metric
    from llm_training.report.compare import verdict_line

    rng = np.random.default_rng(1)
    nll = rng.uniform(300, 900, size=40)  # blocks that differ a lot, as real text does
    base = {"tokens": [250] * 40, "hits": [50] * 40, "bytes": [1000] * 40, "tokenizer": "a"}

    def model(name: str, scale: float, tokenizer: str = "a") -> tuple[dict, dict]:
        units = {**base, "nll": (nll * scale).tolist(), "tokenizer": tokenizer}
        total = float(np.sum(nll * scale))
        return {
            "model": name,
            "data_kind": "text",
            "loss": total / 10_000,
            "bits_per_byte": total / 40_000 / np.log(2),
        }, units

    results, units = zip(model("a", 1.0), model("b", 1.0001), model("c", 1.5, tokenizer="other"), strict=True)
    bpb = compare_metric("bits_per_byte", list(results), list(units))
    near, far = bpb["differences"]
    assert bpb["best"] == ["a", "b"] and near["within_noise"] and near["paired_low"] > 0
    assert not far["within_noise"] and far["model"] == "c" and far["difference"] > far["margin"]
    assert "a, b are indistinguishable" in verdict_line(bpb) and "no single best" in verdict_line(bpb)
    assert not compare_metric("loss", list(results), list(units))["comparable"]
    assert compare_metric("loss", list(results[:2]), list(units[:2]))["best"] == ["a", "b"]
    short = [{k: v[:5] if isinstance(v, list) else v for k, v in u.items()} for u in units[:2]]
    few = compare_metric("bits_per_byte", list(results[:2]), short)
    assert "units" not in few and "no model is named best" in verdict_line(few)


def test_trainer_evaluate_returns_the_same_dictionary(trained, tmp_path):
    from llm_training import Trainer

    root, checkpoint, text, _ = trained
    trainer = Trainer(output_dir=str(root / "run"))
    results = trainer.evaluate(test_data=str(text))
    cli = run_cli([*EVALUATE, "--model-path", str(checkpoint), "--test-data", str(text), "--output",
                   str(tmp_path / "r.json")], tmp_path)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    expected = json.loads((tmp_path / "r.json").read_text())
    for key in ("loss", "perplexity", "bits_per_byte", "accuracy", "tokens"):
        assert results[key] == pytest.approx(expected[key], rel=1e-6)
