"""The tokenizer: training, the three ways to load GPT-2, tiktoken ids == Hugging Face ids, cutting, errors."""

from __future__ import annotations

import itertools
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, corpus_records
from llm_training.data.tokenizer import (
    BOS,
    EOT,
    PAD,
    PIECE_CHARS,
    SPECIAL_TOKENS,
    Tokenizer,
    split_for_encoding,
)
from llm_training.errors import DataError

CORPORA_NAMES = ("fortunes", "kjv_bible", "shakespeare", "wikipedia_sample")
GPT2 = REPO.parent / "shared" / "tokenizers" / "gpt2"
# a document longer than this is compared on its head: Hugging Face is the slow side of every comparison
COMPARE_CHARS = 32_000
TRICKY = [
    "",
    " ",
    "Hello world",
    "  leading spaces and trailing   ",
    "line one\n\n\n  indented\n\ttabbed\r\nwindows\n",
    "It's they'll've I'M don't 'quoted' O'Neill",
    "3,141.59 + 2e10 = $12 — 日本語 Ελληνικά 😀 \u00a0\u2028\x00\x1c",
    f"a literal {EOT} and {PAD}{BOS} inside a document",
]


def hf_ids(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """What Hugging Face itself says: the reference every fast id is checked against."""
    return [e.ids for e in tok.backend.encode_batch(texts, add_special_tokens=False)]


@pytest.fixture(scope="module")
def corpora() -> dict[str, list[str]]:
    return {name: [r["text"] for r in corpus_records(name)] for name in CORPORA_NAMES}


@pytest.fixture(scope="module")
def trained(corpora) -> Tokenizer:
    # a generator: training streams its input; every 8th document's head from each corpus keeps it to a second
    sample = (text[:50_000] for docs in corpora.values() for text in docs[::8])
    return Tokenizer.train(sample, vocab_size=4096)


@pytest.fixture(scope="module")
def gpt2() -> Path:
    if not (GPT2 / "encoder.json").is_file():
        pytest.skip(
            f"GPT-2 tokenizer files not at {GPT2} (tests read ../shared/tokenizers beside the repository)"
        )
    return GPT2


def test_trained_tokenizer_special_tokens_and_size(trained):
    assert SPECIAL_TOKENS == (EOT, PAD, BOS)
    assert (trained.eot_id, trained.pad_id, trained.bos_id) == (0, 1, 2)
    assert trained.vocab_size == 4096 and trained.dtype == np.uint16
    assert trained.uses_tiktoken


@pytest.mark.parametrize("name", CORPORA_NAMES)
def test_fast_ids_equal_hugging_face_on_every_document(trained, corpora, name):
    texts = [text[:COMPARE_CHARS] for text in corpora[name]]
    assert trained.encode_batch(texts, num_threads=2) == hf_ids(trained, texts)
    assert trained.uses_tiktoken  # the check against Hugging Face did not switch the fast path off


def test_tricky_texts_round_trip_and_match_hugging_face(trained):
    assert trained.encode_batch(TRICKY) == hf_ids(trained, TRICKY)
    for text in TRICKY:
        assert trained.decode(trained.encode(text)) == text
    # special-token text in a document is text, never a special id
    assert trained.eot_id not in trained.encode(TRICKY[-1])


def test_decode_skips_special_tokens_and_takes_arrays(trained):
    ids = trained.encode("To be, or not to be")
    assert trained.decode([trained.bos_id, *ids, trained.eot_id, trained.pad_id]) == "To be, or not to be"
    assert trained.decode(np.asarray(ids, dtype=np.uint16)) == "To be, or not to be"


def test_save_load_keeps_ids_and_fingerprint(trained, corpora, tmp_path):
    path = tmp_path / "vocab.json"  # prepared data's name for a Hugging Face tokenizer.json
    trained.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.fingerprint == trained.fingerprint and len(trained.fingerprint) == 16
    assert loaded.to_json()["model"]["type"] == "BPE"
    texts = corpora["wikipedia_sample"][:5]
    assert loaded.encode_batch(texts) == trained.encode_batch(texts)
    assert Tokenizer.load(tmp_path).fingerprint == trained.fingerprint  # the folder holding it
    other = Tokenizer.train(iter(["something else entirely"] * 10), vocab_size=300)
    assert other.fingerprint != trained.fingerprint


def test_long_texts_are_cut_where_ids_do_not_change(trained, corpora):
    fast = trained._fast_encoding()
    play = max(corpora["shakespeare"], key=len)
    nasty = "".join(
        f"word{i}{'  ' * (i % 3)}{chr(10) * (i % 4)}{'   ' if i % 5 == 0 else ''}\t" for i in range(40_000)
    )
    no_space = "x" * (3 * PIECE_CHARS)
    for text in (play, nasty, no_space, "short\ntext"):
        pieces = split_for_encoding(text)
        assert "".join(pieces) == text
        assert list(itertools.chain.from_iterable(map(fast.encode_ordinary, pieces))) == fast.encode_ordinary(
            text
        )
        assert all(len(p) <= 2 * PIECE_CHARS for p in pieces) or text is no_space
    assert len(split_for_encoding(play)) >= len(play) // (2 * PIECE_CHARS) and split_for_encoding(
        no_space
    ) == [no_space]
    # the whole path, threads and cutting included, against Hugging Face
    assert trained.encode_batch([nasty, play[:300_000]], num_threads=2) == hf_ids(
        trained, [nasty, play[:300_000]]
    )
    # why the cut goes before a newline, not after: "a\n\n" + "B" keeps "\n\n" whole, "a\n\nB" does not
    split = trained.backend.pre_tokenizer.pre_tokenize_str
    assert [w for w, _ in split("a\n\n")] + ["B"] != [w for w, _ in split("a\n\nB")]


def test_encode_to_array(trained):
    arrays = trained.encode_to_array(["hello there", ""])
    assert [a.dtype for a in arrays] == [np.uint16, np.uint16]
    assert arrays[0].tolist() == trained.encode("hello there") and arrays[1].size == 0
    assert trained.encode_to_array(["hello"], dtype=np.uint32)[0].dtype == np.uint32
    with pytest.raises(ValueError, match="uint8"):
        trained.encode_to_array(["hello"], dtype=np.uint8)


def test_gpt2_loads_three_ways_with_known_ids(gpt2, corpora, tmp_path):
    # vocab.json + merges.txt: the Hugging Face names of the same two files
    (tmp_path / "hf").mkdir()
    shutil.copy(gpt2 / "encoder.json", tmp_path / "hf" / "vocab.json")
    shutil.copy(gpt2 / "vocab.bpe", tmp_path / "hf" / "merges.txt")
    loaded = [
        Tokenizer.load(gpt2),
        Tokenizer.load(gpt2 / "encoder.json"),
        Tokenizer.load(tmp_path / "hf" / "vocab.json"),
    ]
    assert len({tok.fingerprint for tok in loaded}) == 1
    tok = loaded[0]
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the quick brown fox") == [262, 2068, 7586, 21831]
    assert tok.encode(EOT) == [27, 91, 437, 1659, 5239, 91, 29]  # text, not the special id
    # GPT-2 has <|endoftext|>; the other two are added after its vocabulary
    assert (tok.eot_id, tok.pad_id, tok.bos_id, tok.vocab_size) == (50256, 50257, 50258, 50259)
    texts = [t[:COMPARE_CHARS] for t in corpora["wikipedia_sample"][:20] + corpora["fortunes"][:500]] + TRICKY
    assert tok.encode_batch(texts) == hf_ids(tok, texts)
    assert tok.uses_tiktoken
    assert tok.decode(tok.encode(texts[0])) == texts[0]


def test_non_byte_level_tokenizer_uses_hugging_face(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    backend = HFTokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(
        ["the cat sat on the mat"] * 3, trainers.WordLevelTrainer(special_tokens=["[UNK]"])
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert not tok.uses_tiktoken
    assert tok.encode("the cat") == hf_ids(tok, ["the cat"])[0]
    assert tok.eot_id is not None and tok.pad_id is not None and tok.bos_id is not None  # added


def test_fast_path_falls_back_when_tiktoken_disagrees(caplog):
    """A vocabulary where tiktoken (whole word "abc" is a token) and Hugging Face (no merge a + bc) part ways."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({"bc": 256, "ab": 257, "abc": 258})
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[("b", "c"), ("a", "b"), ("ab", "c")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = Tokenizer(backend)
    with caplog.at_level(logging.WARNING, logger="llm_training.tokenizer"):
        ids = tok.encode_batch(["abc abc"])
    assert ids == hf_ids(tok, ["abc abc"]) and ids[0][0] != 258
    assert not tok.uses_tiktoken and "disagrees" in caplog.text


def test_bad_tokenizer_paths_raise_data_error_naming_the_file(tmp_path, gpt2):
    not_json = tmp_path / "notes.txt"
    not_json.write_text("hello")
    neither = tmp_path / "config.json"
    neither.write_text('{"hidden_size": "large"}')
    broken_hf = tmp_path / "broken.json"
    broken_hf.write_text('{"model": {"type": "Nonsense"}}')
    lonely = tmp_path / "lonely" / "vocab.json"
    lonely.parent.mkdir()
    shutil.copy(gpt2 / "encoder.json", lonely)
    bad_merges = tmp_path / "bad" / "vocab.json"
    bad_merges.parent.mkdir()
    shutil.copy(gpt2 / "encoder.json", bad_merges)
    (bad_merges.parent / "merges.txt").write_text("#version: 0.2\nĠ t\nthree parts here\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [  # what to load, the file the message must name, what it must say
        (tmp_path / "missing.json", tmp_path / "missing.json", "not found"),
        (not_json, not_json, "not a tokenizer file"),
        (neither, neither, "neither"),
        (broken_hf, broken_hf, "not a loadable"),
        (lonely, lonely, "put merges.txt in"),
        (bad_merges, bad_merges.parent / "merges.txt:3", "not a merge"),
        (empty, empty, "no tokenizer in this folder"),
    ]
    for path, named, needle in cases:
        with pytest.raises(DataError) as caught:
            Tokenizer.load(path)
        message = str(caught.value)
        assert str(named) in message and needle in message and "\n" not in message, message
