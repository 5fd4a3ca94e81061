"""Byte-level BPE tokenizer: trained and loaded with Hugging Face ``tokenizers``, encoded with ``tiktoken``.

Hugging Face ``tokenizers`` is the source of truth (training, the saved JSON, decoding). For the common kind,
byte-level BPE with GPT-2's split regex and no normalizer, encoding goes through a ``tiktoken.Encoding`` built
from the same vocabulary: the same ids about ten times faster. It is built on first use and checked against
Hugging Face on a probe text and on the first :data:`VERIFY_CHARS` characters encoded; any difference logs a
warning and switches that tokenizer back to Hugging Face for good. Other kinds always use Hugging Face.

Special-token text inside a document (a literal ``"<|endoftext|>"``) is encoded as ordinary text on both
paths, so a document can never forge a document boundary and ``decode(encode(text)) == text`` always holds.

What :meth:`Tokenizer.load` accepts:

- a Hugging Face ``tokenizer.json`` (what :meth:`Tokenizer.save` writes; prepared data stores it as
  ``vocab.json``): any JSON file whose top-level ``"model"`` is an object;
- a GPT-2 style ``vocab.json`` (a flat token -> id map) with ``merges.txt`` beside it;
- OpenAI's ``encoder.json`` with ``vocab.bpe`` beside it;
- a folder holding one of those.

Special tokens: a tokenizer file with a ``tokenizer_config.json`` beside it (a Hugging Face model's folder)
keeps its vocabulary exactly, so that ids match the model's embedding: its own ``eos_token`` ends a document,
its ``bos_token`` (if any) begins one, and padding uses its ``pad_token``, else the end token (padding is
masked out, never learned). Saved forms (``to_str``: prepared data's ``vocab.json``, checkpoints, exports)
mark those tokens' roles in their ``added_tokens`` entries, which Hugging Face ignores, so they load back the
same. Any other tokenizer is ours: any of :data:`SPECIAL_TOKENS` it lacks is added as a special token after
its vocabulary (a bare GPT-2 ``encoder.json`` has ``<|endoftext|>`` at 50256 and gains ``<|pad|>`` = 50257 and
``<|bos|>`` = 50258); the ones we train have them at 0, 1, 2.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llm_training.data.tokenizer_files import (  # noqa: F401 (BOS, EOT, PAD, ...: this module's names too)
    BOS,
    EOT,
    OURS,
    PAD,
    ROLES_KEY,
    SPECIAL_TOKENS,
    SpecialTokens,
    backend_from_text,
    read_tokenizer,
    settle_special_tokens,
)
from llm_training.errors import ConfigError

log = logging.getLogger("llm_training.tokenizer")

# GPT-2's pre-tokenizer regex, the one Hugging Face's ByteLevel(use_regex=True) applies, in tiktoken's syntax
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PIECE_CHARS = 64 * 1024  # long texts are encoded in pieces of about this size so that threads stay balanced
VERIFY_CHARS = 256 * 1024  # how much real text the fast path is checked against Hugging Face on
# exercises every branch of the regex, whitespace runs, non-ASCII and special-token text
_PROBE = (
    "Hello world! It's 2024; they'll've I'M 'quoted' don't 3,141.59 $12\n\n  indented\tand\ttabs   \r\n"
    "trailing   \n\n\nÜnïcödé 日本語 😀 Ελληνικά <|endoftext|><|pad|> x\u00a0y\u2028z  end  "
)
_UNSET = object()


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map that byte-level BPE vocabularies are written in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


# GPT-2's regex never joins a non-whitespace character with the whitespace after it, and nothing there looks
# behind, so a cut at such a point tokenizes exactly as the whole text. Cutting *after* a newline is not safe:
# "a\n\nB" splits as "a", "\n", "\n", "B", but the piece "a\n\n" ends in one "\n\n" (GPT-2: 628, not 198 198),
# because "\s+(?!\S)" sees the end of the piece instead of "B". Prefer newlines; ASCII whitespace only, since
# Python's \s is wider than the regex engines' (it includes \x1c-\x1f).
_CUT_AT_NEWLINE = re.compile(r"(?<=\S)\n")
_CUT_AT_SPACE = re.compile(r"(?<=\S)[ \t\r\n]")


def split_for_encoding(text: str, size: int = PIECE_CHARS) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` characters whose ids, concatenated, equal the whole text's.

    Valid for GPT-2's regex only. A stretch of ``size`` characters with no safe point is kept whole.
    """
    pieces = []
    start = 0
    while len(text) - start > size + size // 2:  # no tiny last piece
        lo, hi = start + size // 2, start + size
        cut = None
        for pattern in (_CUT_AT_NEWLINE, _CUT_AT_SPACE):
            matches = list(pattern.finditer(text, lo, hi))
            if matches:
                cut = matches[-1]
                break
        if cut is None:  # no safe point in the window: look further on
            found = _CUT_AT_SPACE.search(text, hi)
            if found is None:
                break
            cut = found
        pieces.append(text[start : cut.start()])
        start = cut.start()
    pieces.append(text[start:])
    return pieces


class Tokenizer:
    """Byte-level BPE with an end-of-text, a padding and (usually) a begin token; ``vocab.json`` in prepared
    data is its saved form.

    ``backend`` is the Hugging Face ``tokenizers.Tokenizer``. ``special``: a model's own special tokens, used
    as they are; None: ours (EOT, PAD, BOS), added to ``backend`` where missing. The ids need not differ
    (GPT-2's begin, end and padding are all ``<|endoftext|>``).
    """

    def __init__(self, backend, special: SpecialTokens | None = None) -> None:
        self.special = settle_special_tokens(backend, special)
        # literal special-token text in a document stays text, as in tiktoken's encode_ordinary
        backend.encode_special_tokens = True
        self.backend = backend
        self.eot_id: int = backend.token_to_id(self.special.eos)
        self.pad_id: int = backend.token_to_id(self.special.pad or self.special.eos)
        self.bos_id: int | None = None if self.special.bos is None else backend.token_to_id(self.special.bos)
        self._fast = _UNSET  # tiktoken.Encoding, or None for Hugging Face; decided on first use
        self._verified_chars = 0

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """A short hash of the tokenizer's JSON: data shards and checkpoints with equal ones share a tokenizer."""
        return hashlib.sha256(self.backend.to_str().encode("utf-8")).hexdigest()[:16]

    @property
    def uses_tiktoken(self) -> bool:
        """Whether encoding goes through the fast tiktoken path (decided, and built, on first call)."""
        return self._fast_encoding() is not None

    @property
    def dtype(self):
        """The smallest numpy integer type that holds every id: uint16 up to 65,536 tokens, else uint32."""
        import numpy as np

        return np.dtype(np.uint16 if self.vocab_size <= 2**16 else np.uint32)

    # ---- construction ----------------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
        """Train byte-level BPE on ``texts`` (any iterable, consumed once as a stream)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),  # ids 0, 1, 2
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, seen or not
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        """A tokenizer from the JSON text of :meth:`to_str` (as stored in checkpoints and exports)."""
        return cls(*backend_from_text(text))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer.json, a GPT-2 vocabulary with its merges, or a folder of either."""
        return cls(*read_tokenizer(Path(path)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_str(), encoding="utf-8")

    def to_str(self) -> str:
        """The JSON a Hugging Face ``tokenizers.Tokenizer`` loads; a model's own special tokens carry their
        roles under ROLES_KEY (a key Hugging Face ignores), so that :meth:`from_json` and :meth:`load` give
        this tokenizer back."""
        text = self.backend.to_str(pretty=False)
        if self.special == OURS:
            return text
        spec = json.loads(text)
        for token in spec.get("added_tokens", []):
            roles = [role for role, content in self.special._asdict().items() if content == token["content"]]
            if roles:
                token[ROLES_KEY] = roles
        return json.dumps(spec, ensure_ascii=False, separators=(",", ":"))

    def to_json(self) -> dict:
        return json.loads(self.backend.to_str())

    # ---- encoding and decoding -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text], num_threads=1)[0]

    def encode_batch(self, texts: Iterable[str], num_threads: int | None = None) -> list[list[int]]:
        """Ids of each text, special-token text encoded as text.

        ``num_threads`` (default: all CPUs) applies to the tiktoken path; Hugging Face sizes its own pool
        (``RAYON_NUM_THREADS``).
        """
        texts = list(texts)
        fast = self._fast_encoding()
        if fast is None:
            return self._encode_hf(texts)
        self._verify(fast, texts)
        if self._fast is None:  # the check just failed
            return self._encode_hf(texts)
        return _encode_tiktoken(fast, texts, num_threads or os.cpu_count() or 1)

    def encode_to_array(self, texts: Iterable[str], dtype=None, num_threads: int | None = None) -> list:
        """:meth:`encode_batch` as one numpy array per text, of ``dtype`` (default :attr:`dtype`)."""
        import numpy as np

        dtype = np.dtype(dtype or self.dtype)
        if self.vocab_size - 1 > np.iinfo(dtype).max:
            raise ValueError(f"{dtype.name} cannot hold ids up to {self.vocab_size - 1}")
        return [np.asarray(ids, dtype=dtype) for ids in self.encode_batch(texts, num_threads)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens left out."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays and tensors too
        return self.backend.decode(ids, skip_special_tokens=True)

    # ---- the fast path ---------------------------------------------------------------------------------------

    def _encode_hf(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def _fast_encoding(self):
        if self._fast is _UNSET:
            self._fast = None
            spec = self.to_json()
            reason = _fast_path_blocker(spec)
            if reason:
                log.debug("tokenizer encodes with Hugging Face: %s", reason)
                return None
            try:
                fast = _tiktoken_encoding(spec)
                agrees = fast.encode_ordinary(_PROBE) == self._encode_hf([_PROBE])[0]
            except Exception as exc:  # e.g. duplicate ids in a hand-made vocabulary
                log.warning("tiktoken cannot take this vocabulary (%s); encoding with Hugging Face", exc)
                return None
            if not agrees:
                log.warning(
                    "tiktoken disagrees with Hugging Face on the probe text; encoding with Hugging Face"
                )
                return None
            self._fast = fast
        return self._fast

    def _verify(self, fast, texts: list[str]) -> None:
        """Compare with Hugging Face on the first VERIFY_CHARS characters ever encoded; fall back on a mismatch."""
        sample = []
        for text in texts:
            if self._verified_chars >= VERIFY_CHARS:
                break
            sample.append(text[: VERIFY_CHARS - self._verified_chars])
            self._verified_chars += len(sample[-1])
        if sample and fast.encode_ordinary_batch(sample, num_threads=1) != self._encode_hf(sample):
            log.warning("tiktoken disagrees with Hugging Face on this tokenizer; encoding with Hugging Face")
            self._fast = None


def check_same_tokenizer(ours: Tokenizer, vocab: str | Path | Tokenizer, whose: str, fix: str) -> None:
    """Refuse data whose tokenizer (``vocab``: prepared data's ``vocab.json``, or the tokenizer it will be
    prepared with) is not ``ours``, the one a model (``whose``, e.g. "the model's") was trained with: the same
    ids would name other tokens and training would go on silently from a meaningless start. ``fix``: what to
    do instead."""
    data = vocab if isinstance(vocab, Tokenizer) else Tokenizer.load(vocab)
    if data.fingerprint == ours.fingerprint or data.backend.get_vocab(True) == ours.backend.get_vocab(True):
        return
    where = "the data" if isinstance(vocab, Tokenizer) else f"{vocab}: the data"
    raise ConfigError(
        f"{where} was tokenized with another tokenizer ({data.vocab_size} tokens) than {whose} "
        f"({ours.vocab_size} tokens); {fix}"
    )


def _encode_tiktoken(fast, texts: list[str], num_threads: int) -> list[list[int]]:
    if num_threads == 1 or sum(map(len, texts)) <= PIECE_CHARS:
        return [fast.encode_ordinary(text) for text in texts]
    # tasks of about PIECE_CHARS characters: long texts cut, short ones grouped (a thread-pool task costs about
    # as much as encoding a short document, so one task per document would run at a third of the speed)
    tasks: list[list[str]] = [[]]
    owners: list[list[int]] = [[]]
    size = 0
    for index, text in enumerate(texts):
        for piece in split_for_encoding(text):
            if size >= PIECE_CHARS:
                tasks.append([])
                owners.append([])
                size = 0
            tasks[-1].append(piece)
            owners[-1].append(index)
            size += len(piece)
    out: list = [None] * len(texts)
    with ThreadPoolExecutor(num_threads) as pool:
        done = pool.map(lambda task: [fast.encode_ordinary(piece) for piece in task], tasks)
        for owner, results in zip(owners, done, strict=True):
            for index, ids in zip(owner, results, strict=True):
                if out[index] is None:
                    out[index] = ids
                else:
                    out[index].extend(ids)
    return out


def _fast_path_blocker(spec: dict) -> str | None:
    """Why tiktoken cannot reproduce this tokenizer's ids, or None when it can."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        return f"model {model.get('type')} is not BPE"
    if model.get("dropout") or model.get("byte_fallback"):
        return "BPE with dropout or byte fallback"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "BPE with subword prefixes or suffixes"
    if spec.get("normalizer"):
        return "it has a normalizer"
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return "its pre-tokenizer is not ByteLevel with GPT-2's regex and no prefix space"
    added = spec.get("added_tokens", [])
    if any(not token.get("special") for token in added):
        return "it has added tokens that are not special"  # Hugging Face would match them inside the text
    special = {token["content"] for token in added}
    chars = set(_byte_to_unicode().values())
    vocab = model.get("vocab") or {}
    if not chars <= vocab.keys():
        return "its vocabulary lacks some of the 256 bytes"  # tiktoken cannot encode a byte it has no id for
    if any(not set(token) <= chars for token in vocab if token not in special):
        return "its vocabulary has tokens that are not byte-level"
    # tiktoken merges by the rank (here: id) of the merged token, so ids must grow in merge order
    merged = [
        vocab.get("".join(m) if isinstance(m, list) else m.replace(" ", "")) for m in model.get("merges", [])
    ]
    if None in merged or any(a >= b for a, b in itertools.pairwise(merged)):
        return "its ids are not in merge order"
    return None


def _tiktoken_encoding(spec: dict):
    import tiktoken

    to_byte = {char: byte for byte, char in _byte_to_unicode().items()}
    special = {token["content"] for token in spec.get("added_tokens", [])}
    ranks = {
        bytes(to_byte[char] for char in token): token_id
        for token, token_id in spec["model"]["vocab"].items()
        if token not in special
    }
    return tiktoken.Encoding(
        "llm_training_bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={}
    )
