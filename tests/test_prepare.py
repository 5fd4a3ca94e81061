"""llm-prepare-data and the pipeline behind it on the real corpora: formats, sources, cleaning, quality,
deduplication, determinism, sharding, and every kind of bad input."""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPORA, corpus_records, run_cli
from llm_training import DataPreparationPipeline, DataSourceConnector
from llm_training.data.dedup import NearDuplicateIndex, signature
from llm_training.data.prepare import read_manifest
from llm_training.data.quality import quality_parts, quality_score
from llm_training.data.sources import DataSourceConnectorOutput, Document
from llm_training.data.tokenizer import Tokenizer

PREPARE = ["-m", "llm_training.cli.prepare_data"]
SMALL = ["--vocab-size", "400", "--quiet"]


def corpus(name: str) -> Path:
    path = CORPORA / f"{name}.jsonl.gz"
    if not path.is_file():
        pytest.skip(f"corpus {path} not present (tests read ../shared/corpora beside the repository)")
    return path


def report_of(folder: Path) -> dict:
    return json.loads((folder / "prepare_report.json").read_text())


def documents_of(folder: Path, split: str = "train") -> list[np.ndarray]:
    """Each prepared document's token ids (without its end-of-text token)."""
    manifest = read_manifest(folder / f"{split}.json")
    table = np.load(folder / manifest["documents"])
    shards = [np.fromfile(folder / s["path"], dtype=manifest["dtype"]) for s in manifest["shards"]]
    return [shards[r["shard"]][r["offset"] : r["offset"] + r["num_tokens"] - 1] for r in table]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


# ------------------------------------------------------------------------------------ the whole corpora
@pytest.fixture(scope="module")
def all_corpora(tmp_path_factory):
    for name in ("shakespeare", "kjv_bible", "wikipedia_sample", "fortunes"):
        corpus(name)
    out = tmp_path_factory.mktemp("all") / "prepared"
    proc = run_cli(
        [*PREPARE, "--input", str(CORPORA / "*.jsonl.gz"), "--output", str(out), "--vocab-size", "2048",
         "--min-quality", "0.5", "--deduplicate", "--workers", "2"],
        out.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_all_corpora_with_quality_and_deduplication(all_corpora):
    out, proc = all_corpora
    report = report_of(out)
    assert report["documents_read"] == 91 + 66 + 106 + 15_217
    dropped = report["dropped"]
    # the corpora hold exact copies (some under other ids, across files) and near copies among fortunes
    assert dropped["exact_duplicate"] > 50 and dropped["near_duplicate"] > 10 and dropped["low_quality"] > 100
    kept = report["train_documents"] + report["validation_documents"]
    assert kept + sum(dropped.values()) == report["documents_read"]
    example = report["duplicates"]["near_examples"][0]
    assert example["similarity"] >= 0.8 and example["id"] != example["duplicate_of"]
    # no two kept documents are the same
    docs = documents_of(out) + documents_of(out, "validation")
    assert len({hashlib.sha256(d.tobytes()).digest() for d in docs}) == len(docs) == kept
    assert "dropped: " in proc.stdout and "MB/s" in proc.stdout
    assert sum(report["quality_histogram"]["counts"]) == report["documents_read"] - dropped.get("empty", 0)
    for split in ("train", "validation"):
        manifest = read_manifest(out / f"{split}.json")
        for shard in manifest["shards"]:
            assert hashlib.sha256((out / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]


def test_kept_text_round_trips_and_scores_are_recorded(all_corpora):
    out, _ = all_corpora
    tokenizer = Tokenizer.load(out / "vocab.json")
    table = np.load(out / "train_documents.npy")
    assert (table["quality"] >= 0.5).all() and (table["quality"] <= 1.0).all()
    first = documents_of(out)[0]
    assert table["num_bytes"][0] == len(tokenizer.decode(first.tolist()).encode("utf-8"))


def test_preparation_is_deterministic_with_workers(tmp_path):
    source = corpus("wikipedia_sample")
    outs = []
    for name, workers in (("a", "2"), ("b", "1")):
        proc = run_cli(
            [*PREPARE, "--input", str(source), "--output", str(tmp_path / name), *SMALL, "--deduplicate",
             "--min-quality", "0.3", "--workers", workers],
            tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        outs.append(tmp_path / name)
    for name in ("train_000000.bin", "validation_000000.bin", "vocab.json", "train_documents.npy"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


# ----------------------------------------------------------------------------------- quality and dedup
def test_quality_score_separates_prose_from_junk():
    prose = corpus_records("wikipedia_sample", 1)[0]["text"][:5000]
    junk = {
        "ascii art": "\n".join(["+--+--+--+", "|##|  |##|", "+--+--+--+"] * 30),
        "numbers": "\n".join(f"{i} {i * 7.31:.2f} {i * 13} {i % 9}" for i in range(300)),
        "repeated": "Buy cheap watches now. Click here.\n" * 100,
        "tiny": "ok",
    }
    assert quality_score(prose) > 0.9
    for name, text in junk.items():
        assert quality_score(text) < 0.3, name
    parts = quality_parts(prose)
    assert set(parts) == {"length", "alphabetic", "symbols", "digits", "word_length", "repetition", "lines"}
    assert all(0.0 <= v <= 1.0 for v in parts.values())


def test_near_duplicate_signatures_estimate_jaccard():
    text = corpus_records("wikipedia_sample", 1)[0]["text"][:20000]
    words = text.split()
    edited = " ".join(w if i % 40 else w.upper() + "x" for i, w in enumerate(words))  # ~2.5% of words changed
    other = corpus_records("wikipedia_sample", 2)[1]["text"][:20000]
    sig = signature
    index = NearDuplicateIndex(threshold=0.7)
    index.add("original", sig(text))
    found = index.find(sig(edited))
    assert found is not None and found[0] == "original" and 0.7 <= found[1] < 1.0
    assert index.find(sig(other)) is None


# -------------------------------------------------------------------------------------- formats, sources
@pytest.fixture
def plays():
    return corpus_records("shakespeare", 4, lambda r: r["id"].endswith("_gut"))


def _prepare(tmp_path, *args) -> dict:
    out = tmp_path / "out"
    proc = run_cli([*PREPARE, "--output", str(out), *SMALL, *args], tmp_path)
    assert proc.returncode == 0, proc.stderr
    return report_of(out)


def test_every_format_and_compression(tmp_path, plays):
    records = [{"id": r["id"], "text": r["text"][:30_000]} for r in plays]
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", records[:1])
    (folder / "b.json").write_text(json.dumps(records[1:2]))
    with open(folder / "c.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["id", "text"])
        writer.writeheader()
        writer.writerows(records[2:3])
    (folder / "d.txt.gz").write_bytes(gzip.compress(records[3]["text"].encode()))
    import zstandard

    (folder / "e.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(json.dumps(records[0] | {"id": "copy"}).encode() + b"\n")
    )
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["p1"], "text": [records[1]["text"]]}), folder / "f.parquet")
    report = _prepare(tmp_path, "--input", str(folder))
    assert report["documents_read"] == 6 and report["problems"]["counts"] == {}
    # a glob, and --format overriding the extension (the guide's `--input raw_data.txt --format jsonl`)
    write_jsonl(tmp_path / "raw_data.txt", records)
    assert (
        _prepare(tmp_path, "--input", str(tmp_path / "raw_data.txt"), "--format", "jsonl")["documents_read"]
        == 4
    )
    assert _prepare(tmp_path, "--input", str(folder / "*.json*"))["documents_read"] == 3  # a, b, e


def test_http_url_through_fsspec(tmp_path, plays):
    pytest.importorskip("aiohttp")
    write_jsonl(tmp_path / "plays.jsonl", [{"id": r["id"], "text": r["text"][:20_000]} for r in plays])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/plays.jsonl"
        assert _prepare(tmp_path, "--input", url)["documents_read"] == 4
    finally:
        server.shutdown()


def test_hugging_face_dataset(tmp_path, plays):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "hf_plays"
    datasets.Dataset.from_dict(
        {"id": [r["id"] for r in plays], "body": [r["text"][:20_000] for r in plays]}
    ).save_to_disk(str(saved))
    report = _prepare(tmp_path, "--input", f"hf://{saved}", "--text-field", "body")
    assert report["documents_read"] == 4 and report["train_tokens"] > 10_000


def test_custom_data_source_connector_flows_into_the_pipeline(tmp_path, plays):
    class PlaySource(DataSourceConnector):
        def connect(self, input_data):
            self.records = input_data
            return DataSourceConnectorOutput("plays", "connected", {"records": len(input_data)})

        def documents(self):
            for record in self.records:
                yield Document(record["id"], record["text"][:20_000])

    source = PlaySource()
    assert source.connect(plays).metadata == {"records": 4}
    result = DataPreparationPipeline(output_dir=tmp_path / "p", vocab_size=400).run(
        input_file=source, max_seq_length=256
    )
    assert result.report["documents_read"] == 4
    assert read_manifest(tmp_path / "p" / "train.json")["max_seq_length"] == 256


def test_existing_gpt2_tokenizer_and_wide_vocabularies(tmp_path, plays):
    gpt2 = CORPORA.parent / "tokenizers" / "gpt2"
    if not gpt2.is_dir():
        pytest.skip(f"{gpt2} not present")
    source = write_jsonl(tmp_path / "plays.jsonl", [{"id": r["id"], "text": r["text"][:5000]} for r in plays])
    report = _prepare(tmp_path, "--input", str(source), "--tokenizer", str(gpt2))
    manifest = read_manifest(tmp_path / "out" / "train.json")
    assert manifest["dtype"] == "uint16" and manifest["eot_id"] == 50256 and report["vocab_size"] >= 50257
    wide = Tokenizer.load(gpt2)
    wide.backend.add_tokens([f"<extra_{i}>" for i in range(16_000)])
    wide.save(tmp_path / "wide.json")
    _prepare(tmp_path, "--input", str(source), "--tokenizer", str(tmp_path / "wide.json"))
    manifest = read_manifest(tmp_path / "out" / "train.json")
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] > 65_536
    ids = np.fromfile(tmp_path / "out" / manifest["shards"][0]["path"], dtype=np.uint32)
    assert Tokenizer.load(gpt2).decode(ids[:50].tolist()) in plays[0]["text"] or ids.size > 0


def test_sharded_preparation_merges_into_one_dataset(tmp_path):
    source = corpus("fortunes")
    tok = tmp_path / "tok"
    proc = run_cli(
        [*PREPARE, "--input", str(source), "--output", str(tok), *SMALL, "--tokenizer-only"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr and (tok / "vocab.json").is_file()
    for index in (0, 1):
        proc = run_cli(
            [*PREPARE, "--input", str(source), "--output", str(tmp_path / f"s{index}"), "--quiet",
             "--tokenizer", str(tok / "vocab.json"), "--num-shards", "2", "--shard-index", str(index),
             "--deduplicate"],
            tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    parts = [report_of(tmp_path / f"s{i}") for i in (0, 1)]
    assert all(p["dropped"]["other_shard"] > 5000 for p in parts)
    proc = run_cli(
        [*PREPARE, "--merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--output", str(tmp_path / "m")],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    merged = read_manifest(tmp_path / "m" / "train.json")
    assert merged["num_documents"] == sum(p["train_documents"] for p in parts)
    report = report_of(tmp_path / "m")
    kept = report["train_documents"] + report["validation_documents"]
    assert report["documents_read"] == 15_217 == kept + sum(report["dropped"].values())
    docs = documents_of(tmp_path / "m") + documents_of(tmp_path / "m", "validation")
    assert len({d.tobytes() for d in docs}) == len(docs)  # exact duplicates met in one shard
    from llm_training.data.loader import TokenDataset

    assert TokenDataset(tmp_path / "m" / "train.json", seq_len=64).num_windows > 100
    bad = run_cli(
        [*PREPARE, "--input", str(source), "--output", str(tmp_path / "x"), "--num-shards", "2"], tmp_path
    )
    assert bad.returncode == 2 and "needs one tokenizer for all shards" in bad.stderr


# ------------------------------------------------------------------------------------------- bad input
@pytest.fixture
def messy(tmp_path, plays):
    """A folder with every kind of bad record next to good ones."""
    folder = tmp_path / "messy"
    folder.mkdir()
    good = [json.dumps({"id": r["id"], "text": r["text"][:20_000]}) for r in plays]
    lines = [
        good[0],
        '{"text": broken json',
        json.dumps({"body": "no text field here"}),
        good[1],
        json.dumps({"id": "blank", "text": " \n\x00\x01 "}),
        good[2],
    ]
    (folder / "records.jsonl").write_bytes(
        "\n".join(lines).encode() + b'\n{"text": "caf\xe9"}\n' + good[3].encode() + b"\n"
    )
    (folder / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 10)
    packed = gzip.compress("\n".join(good).encode())
    (folder / "cut.jsonl.gz").write_bytes(packed[: len(packed) * 6 // 10])  # ends inside the third record
    with open(folder / "huge.jsonl", "wb") as handle:  # one 100 MB line, then a good record
        handle.write(b'{"text": "')
        chunk = b"a" * (1 << 20)
        for _ in range(100):
            handle.write(chunk)
        handle.write(b'"}\n' + good[0].replace(plays[0]["id"], "after-huge").encode() + b"\n")
    return folder


def test_bad_records_are_skipped_and_counted_with_file_and_line(tmp_path, messy):
    report = _prepare(tmp_path, "--input", str(messy))
    counts = report["problems"]["counts"]
    assert counts == {
        "binary_file": 1,
        "invalid_json": 1,
        "line_too_long": 1,
        "missing_text_field": 1,
        "not_utf8": 1,
        "truncated_or_unreadable": 1,
    }
    assert report["dropped"]["empty"] == 1
    where = {(e["reason"], Path(e["source"]).name, e["line"]) for e in report["problems"]["examples"]}
    assert {("invalid_json", "records.jsonl", 2), ("missing_text_field", "records.jsonl", 3),
            ("not_utf8", "records.jsonl", 7), ("line_too_long", "huge.jsonl", 1)} <= where  # fmt: skip
    # 4 good records, the good head of the truncated file, the record after the huge line
    assert sum(report["quality_histogram"]["counts"]) == 6


def test_on_error_fail_stops_at_the_first_bad_record(tmp_path, messy):
    proc = run_cli([*PREPARE, "--output", str(tmp_path / "out"), "--input", str(messy / "records.jsonl"),
                    "--on-error", "fail", *SMALL], tmp_path)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "records.jsonl:2: invalid JSON" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_zero_surviving_documents_is_an_error_and_keeps_the_old_output(tmp_path, plays):
    out = tmp_path / "out"
    _prepare(tmp_path, "--input", str(write_jsonl(tmp_path / "good.jsonl", plays)))
    before = (out / "train_000000.bin").read_bytes()
    junk = write_jsonl(tmp_path / "junk.jsonl", [{"text": "1 2 3 4 5 6 7 8 9 0 " * 20}, {"text": "   "}])
    proc = run_cli(
        [*PREPARE, "--output", str(out), "--input", str(junk), "--min-quality", "0.5", *SMALL], tmp_path
    )
    assert proc.returncode == 2 and "no documents left to prepare" in proc.stderr
    assert "low_quality: 1" in proc.stderr and "empty: 1" in proc.stderr
    assert (out / "train_000000.bin").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("args, message", [
    (["--input", "nowhere.jsonl"], "input not found: nowhere.jsonl"),
    (["--input", "nothing*.jsonl"], "no files match nothing*.jsonl"),
    (["--input", "x.jsonl", "--min-quality", "2"], "data.min_quality must be in [0, 1]"),
    (["--input", "x.jsonl", "--set", "data.dedup_treshold=0.5"], "did you mean 'data.dedup_threshold'"),
    (["--input", "s3://no-such-bucket-llm-training/x.jsonl"], "s3://"),
    ([], "--input is required"),
])  # fmt: skip
def test_bad_arguments_are_one_line(tmp_path, args, message):
    (tmp_path / "x.jsonl").write_text('{"text": "hello"}\n')
    proc = run_cli([*PREPARE, "--output", str(tmp_path / "out"), *args], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_scripts_prepare_data_accepts_the_guides_flags(tmp_path, plays):
    source = write_jsonl(tmp_path / "raw_data.jsonl", plays)
    script = Path(__file__).resolve().parents[1] / "scripts" / "prepare_data.py"
    proc = run_cli(
        [str(script), "--input", str(source), "--output", str(tmp_path / "prepared_data"),
         "--max-length", "2048", "--vocab-size", "500"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for name in ("train.json", "validation.json", "vocab.json"):
        assert (tmp_path / "prepared_data" / name).is_file()


def test_split_threshold_length_and_config_flags(tmp_path):
    source = str(corpus("fortunes"))

    def prepare(name, *args):
        out = tmp_path / name
        proc = run_cli([*PREPARE, "--input", source, "--output", str(out), *SMALL, *args], tmp_path)
        assert proc.returncode == 0, proc.stderr
        return report_of(out)

    half = prepare("half", "--validation-fraction", "0.5", "--seed", "7")
    share = half["validation_documents"] / (half["train_documents"] + half["validation_documents"])
    assert 0.45 < share < 0.55
    reseeded = prepare("reseeded", "--validation-fraction", "0.5", "--seed", "8")
    assert reseeded["validation_documents"] != half["validation_documents"]
    loose = prepare("loose", "--deduplicate", "--dedup-threshold", "0.5")
    strict = prepare("strict", "--deduplicate", "--dedup-threshold", "0.95")
    assert loose["dropped"]["near_duplicate"] > strict["dropped"].get("near_duplicate", 0)
    short = prepare("short", "--max-document-bytes", "300")
    assert short["problems"]["counts"]["line_too_long"] > 100
    config = tmp_path / "data.yaml"
    config.write_text("data:\n  min_quality: 0.9\n")
    assert prepare("configured", "--config", str(config))["dropped"]["low_quality"] > 1000
