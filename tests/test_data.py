"""Data preparation on real text, the manifests, the loader and its resume, and bad input files."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from llm_training import DataPreparationPipeline
from llm_training.data.clean import clean_text
from llm_training.data.loader import BatchLoader, TokenDataset
from llm_training.data.prepare import is_validation, prepare_documents
from llm_training.data.sources import Document, read_documents, sample_data_path
from llm_training.data.tokenizer import Tokenizer
from llm_training.errors import DataError


def test_prepare_real_text_writes_shards_and_manifests(tmp_path, shakespeare_jsonl):
    result = DataPreparationPipeline(
        output_dir=tmp_path / "prepared", vocab_size=1000, validation_fraction=0.4
    ).run(input_file=shakespeare_jsonl, max_seq_length=128)
    out = tmp_path / "prepared"
    for name in ("train.json", "validation.json", "vocab.json", "prepare_report.json"):
        assert (out / name).is_file()
    train = json.loads((out / "train.json").read_text())
    assert train["dtype"] == "uint16" and train["max_seq_length"] == 128 and train["vocab_size"] == 1000
    ids = np.fromfile(out / train["shards"][0]["path"], dtype=np.uint16)
    assert ids.size == train["num_tokens"] and (ids == train["eot_id"]).sum() == train["num_documents"]
    assert train["num_documents"] + json.loads((out / "validation.json").read_text())["num_documents"] == 6
    tok = Tokenizer.load(out / "vocab.json")
    text = tok.decode(ids[:200].tolist())
    assert "the" in text.lower()  # real English came back out
    assert result.report["documents_read"] == 6
    assert train["num_bytes"] / train["num_tokens"] > 2.0  # BPE compresses English


def test_preparation_is_deterministic(tmp_path, shakespeare_jsonl):
    docs = list(read_documents(shakespeare_jsonl))
    a = prepare_documents(docs, tmp_path / "a", vocab_size=600)
    b = prepare_documents(docs, tmp_path / "b", vocab_size=600)
    for name in ("train_000000.bin", "validation_000000.bin", "vocab.json"):
        assert (a.output_dir / name).read_bytes() == (b.output_dir / name).read_bytes()


def test_split_by_document_hash_is_stable():
    ids = [f"doc{i}" for i in range(2000)]
    held = [i for i in ids if is_validation(i, 1, 0.1)]
    assert 150 < len(held) < 250
    assert held == [i for i in ids if is_validation(i, 1, 0.1)]


def test_single_document_holds_out_its_tail(tmp_path):
    text = "\n".join(f"Line {i} of a plain text file with some words in it." for i in range(400))
    result = prepare_documents([Document("one", text)], tmp_path / "p", vocab_size=300)
    assert (
        result.report["validation_tokens"] > 0
        and result.report["train_tokens"] > result.report["validation_tokens"]
    )
    assert "tail" in result.report["split"]


def test_clean_text():
    assert clean_text("a\x00b\r\nc  \n\n\n\nd\x1b") == "ab\nc\n\nd"
    assert clean_text("_\x08a_\x08b") == "ab"  # overstrike
    assert clean_text("cafe\u0301") == "caf\u00e9"  # NFC


def test_sample_data_is_shipped():
    docs = list(read_documents(sample_data_path()))
    assert len(docs) == 79 and sum(len(d.text) for d in docs) > 400_000


def test_loader_covers_epoch_and_resumes_exactly(tmp_path, shakespeare_jsonl):
    prepare_documents(read_documents(shakespeare_jsonl), tmp_path / "p", vocab_size=500)
    ds = TokenDataset(tmp_path / "p" / "train.json", seq_len=32)
    loader = BatchLoader(ds, batch_size=4, seed=3)
    batches = list(loader)
    assert len(batches) == len(loader) == ds.num_windows // 4
    assert batches[0]["input_ids"].shape == (4, 32)
    assert (batches[0]["labels"][:, :-1] == batches[0]["input_ids"][:, 1:]).all()
    assert loader.state_dict()["epoch"] == 1

    fresh = BatchLoader(ds, batch_size=4, seed=3)
    it = iter(fresh)
    for _ in range(5):
        next(it)
    state = fresh.state_dict()
    resumed = BatchLoader(ds, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(rest, batches[5:], strict=True))

    ranks = [BatchLoader(ds, batch_size=4, seed=3, rank=r, world_size=2) for r in (0, 1)]
    firsts = [next(iter(r))["input_ids"] for r in ranks]
    assert not (firsts[0] == firsts[1]).all()


def test_too_small_for_a_batch(tmp_path):
    prepare_documents(
        [Document("a", "word " * 400), Document("b", "more words " * 300)],
        tmp_path / "p",
        vocab_size=300,
        validation_fraction=0.5,
    )
    ds = TokenDataset(tmp_path / "p" / "train.json", seq_len=64)
    with pytest.raises(DataError, match="cannot fill one batch"):
        BatchLoader(ds, batch_size=10_000)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.txt", b"fine line\nbad \xff\xfe byte\n", "bad.txt:2: not valid UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": broken}\n', "bad.jsonl:2: invalid JSON"),
        ("field.jsonl", b'{"body": "no text field"}\n', "field.jsonl:1: no text field 'text' (fields: body)"),
        ("empty.txt", b"", "input file is empty"),
        ("list.json", b'{"a": 1}', "expected a JSON list of records"),
    ],
)
def test_bad_files_name_the_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        list(read_documents(path))
    assert message in str(info.value)


def test_truncated_gzip_and_missing_file(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "hello"}\n' * 1000)[:60])
    with pytest.raises(DataError, match="cut.jsonl.gz: cannot read past this point"):
        list(read_documents(path))
    with pytest.raises(DataError, match="input not found"):
        list(read_documents(tmp_path / "absent.txt"))


def test_nothing_left_after_cleaning(tmp_path):
    with pytest.raises(DataError, match="no documents left to prepare .1 read; empty: 1"):
        prepare_documents([Document("a", "\x00\x01  \n")], tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_failed_preparation_keeps_the_previous_dataset(tmp_path, shakespeare_jsonl):
    out = tmp_path / "p"
    prepare_documents(read_documents(shakespeare_jsonl), out, vocab_size=400)
    before = (out / "train_000000.bin").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(DataError):
        prepare_documents(read_documents(bad), out, vocab_size=400)
    assert (out / "train_000000.bin").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
