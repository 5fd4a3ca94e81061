"""Reading tokenizer files (Hugging Face ``tokenizer.json``, GPT-2's vocabulary and merges) and deciding their
special tokens: a model's own, named by the ``tokenizer_config.json`` beside the file or marked in a saved
tokenizer, or ours (EOT, PAD, BOS), added where missing. ``tokenizer.Tokenizer`` is the one user."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

from llm_training.errors import DataError
from llm_training.limits import json_loads

log = logging.getLogger("llm_training.tokenizer")

EOT = "<|endoftext|>"
PAD = "<|pad|>"
BOS = "<|bos|>"
SPECIAL_TOKENS = (EOT, PAD, BOS)


class SpecialTokens(NamedTuple):
    """The texts of the tokens that end a document, begin one (None: none) and pad (None: the end token)."""

    eos: str
    bos: str | None
    pad: str | None


OURS = SpecialTokens(EOT, BOS, PAD)
ROLES_KEY = "llm_training_roles"  # in an added token of a saved tokenizer: ["eos"], ["bos", "eos"], ...

USAGE = "give a tokenizer.json, a vocab.json with merges.txt, encoder.json with vocab.bpe, or a folder of one"


def read_tokenizer(path: Path):
    """(Hugging Face ``tokenizers.Tokenizer``, the model's own special tokens or None for ours) from a
    tokenizer.json, a GPT-2 vocabulary with its merges, or a folder of either."""
    if path.is_dir():
        path = _find_in_folder(path)
    elif not path.is_file():
        raise DataError(f"tokenizer not found: {path} ({USAGE})")
    spec = _read_json(path)
    # GPT-2's own vocabulary has a token "model" (id 19849), so look at the value, not just the key
    if isinstance(spec, dict) and isinstance(spec.get("model"), dict):
        return _hf_from_json(path, spec), _marked_roles(spec) or _configured_roles(path)
    if isinstance(spec, dict) and spec and all(isinstance(v, int) for v in spec.values()):
        return _hf_from_gpt2(path, spec, _merges_beside(path)), _configured_roles(path)
    raise DataError(
        f'{path}: neither a Hugging Face tokenizer (no "model" object) nor a GPT-2 vocabulary '
        f"(a token -> id map); {USAGE}"
    )


def backend_from_text(text: str):
    """(``tokenizers.Tokenizer``, special tokens or None) from ``Tokenizer.to_str``'s JSON."""
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_str(text), _marked_roles(json_loads(text))


def settle_special_tokens(backend, special: SpecialTokens | None) -> SpecialTokens:
    """A model's own special tokens made special in ``backend`` (none added), or, for None, ours added where
    missing; returns the ones in force."""
    if special is None:
        _add_missing_special_tokens(backend)
        return OURS
    _mark_special(backend, special)
    return special


def _find_in_folder(folder: Path) -> Path:
    for name in ("tokenizer.json", "vocab.json", "encoder.json"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: no tokenizer in this folder; {USAGE}")


def _read_json(path: Path):
    try:
        return json_loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a tokenizer file ({str(exc).splitlines()[0]}); {USAGE}") from None


def _hf_from_json(path: Path, spec: dict):
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return HFTokenizer.from_str(json.dumps(spec))
    except Exception as exc:  # tokenizers raises plain Exceptions for malformed files
        raise DataError(
            f"{path}: not a loadable Hugging Face tokenizer ({str(exc).splitlines()[0]}); {USAGE}"
        ) from None


def _merges_beside(vocab_path: Path) -> Path:
    # the usual partner first, the other name too: people rename one file of a pair
    names = ["vocab.bpe", "merges.txt"] if vocab_path.name == "encoder.json" else ["merges.txt", "vocab.bpe"]
    for name in names:
        if (vocab_path.parent / name).is_file():
            return vocab_path.parent / name
    raise DataError(
        f"{vocab_path}: a GPT-2 style vocabulary needs its merges beside it; put {names[0]} in {vocab_path.parent}"
    )


def _hf_from_gpt2(vocab_path: Path, vocab: dict[str, int], merges_path: Path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    merges = []
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{merges_path}: cannot read the merges ({exc}); {USAGE}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise DataError(f"{merges_path}:{number}: not a merge 'left right': {line[:40]!r}; {USAGE}")
        merges.append((parts[0], parts[1]))
    try:
        backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    except Exception as exc:  # e.g. a merge whose tokens are not in the vocabulary
        raise DataError(
            f"{vocab_path}: vocabulary and {merges_path.name} do not fit ({str(exc).splitlines()[0]})"
        ) from None
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _marked_roles(spec) -> SpecialTokens | None:
    """The special tokens :meth:`Tokenizer.to_str` marked in ``added_tokens``; None when none are."""
    added = spec.get("added_tokens") if isinstance(spec, dict) else None
    roles = {
        role: token.get("content")
        for token in (added if isinstance(added, list) else [])
        if isinstance(token, dict)
        for role in (token.get(ROLES_KEY) or [])
    }
    return SpecialTokens(roles["eos"], roles.get("bos"), roles.get("pad")) if roles.get("eos") else None


def _configured_roles(path: Path) -> SpecialTokens | None:
    """A Hugging Face model's special tokens from the ``tokenizer_config.json`` (or ``special_tokens_map.json``)
    beside its tokenizer file; None without one, or without an ``eos_token`` (then ours are added)."""
    found: dict[str, str | None] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if not (path.parent / name).is_file():
            continue
        config = _read_json(path.parent / name)
        for key in ("eos_token", "bos_token", "pad_token"):
            value = config.get(key) if isinstance(config, dict) else None
            value = value.get("content") if isinstance(value, dict) else value  # an AddedToken's fields
            if key not in found and (value is None or isinstance(value, str)):
                found[key] = value
    if not found.get("eos_token"):
        if found:
            log.warning("%s: no eos_token beside it; adding %s, %s and %s", path, EOT, PAD, BOS)
        return None
    return SpecialTokens(found["eos_token"], found.get("bos_token"), found.get("pad_token"))


def _mark_special(backend, special: SpecialTokens) -> None:
    """Make a model's own special tokens special (most already are) without adding any: a text the
    vocabulary lacks is refused, since a new id would have no row in the model's embedding."""
    from tokenizers import AddedToken

    for text in dict.fromkeys(t for t in special if t is not None):
        if backend.token_to_id(text) is None:
            raise DataError(f"the special token {text!r} of the tokenizer's config is not in its vocabulary")
    marked = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    missing = [t for t in dict.fromkeys(special) if t is not None and t not in marked]
    if missing:  # in the vocabulary: adding reuses the id, the vocabulary keeps its size
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])


def _add_missing_special_tokens(backend) -> None:
    """Make EOT, PAD and BOS special tokens: reuse a vocabulary entry of that text, else append new ids."""
    from tokenizers import AddedToken

    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    missing = [token for token in SPECIAL_TOKENS if token not in special]
    if missing:
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in missing])
