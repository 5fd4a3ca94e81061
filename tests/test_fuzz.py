"""Fuzzing every command that reads user input with generated malformed inputs (issue 19).

Each case is made here from a seed, never stored. The contract, for every command and every input: no traceback,
no exception escaping ``main()``, a non-zero exit always comes with a message, and nothing an earlier run wrote
(a prepared folder, a checkpoint, results, completions, a file of the user's) is changed or removed.
"""

from __future__ import annotations

import hashlib
import json
import random
import zlib
from pathlib import Path

import pytest

from conftest import TINY, call_cli, free_port, wait_for_health

SEED = 19


def _valid_lines(n: int = 12) -> list[str]:
    rng = random.Random(SEED)
    words = [
        "the",
        "king",
        "said",
        "that",
        "all",
        "men",
        "of",
        "the",
        "realm",
        "would",
        "come",
        "to",
        "see",
        "the",
        "sea",
        "and",
        "the",
        "sky",
        "at",
        "dawn",
    ]
    return [
        json.dumps({"id": f"d{i}", "text": " ".join(rng.choice(words) for _ in range(60))}) for i in range(n)
    ]


def _mutations(base: bytes, count: int, seed: int) -> list[bytes]:
    """Seeded byte-level damage of a valid file: flips, cuts, inserted hostile bytes."""
    rng = random.Random(seed)
    hostile = [b"\x00", b"\xff\xfe", b"\\ud800", b'"', b"{", b"]", b"\n", b"\xc3", b"\x1b[2J", b"\r"]
    out = []
    for _ in range(count):
        data = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(len(data))
            kind = rng.randrange(3)
            if kind == 0:
                data[pos] ^= 1 << rng.randrange(8)
            elif kind == 1:
                data[pos:pos] = rng.choice(hostile)
            else:
                del data[pos : pos + rng.randint(1, 40)]
        out.append(bytes(data))
    return out


def data_cases(field: str = "text") -> list[tuple[str, bytes]]:
    """Malformed JSON Lines inputs whose records carry text in ``field``."""
    good = "\n".join(_valid_lines()).replace('"text"', f'"{field}"').encode()
    rec = lambda value: (json.dumps({field: value}) + "\n").encode()  # noqa: E731
    cases = [
        ("empty", b""),
        ("blank-lines", b"\n\n  \n\t\n"),
        ("random-bytes", random.Random(SEED).randbytes(4096)),
        ("utf16-bom", ("\ufeff" + good.decode()).encode("utf-16")),
        ("latin1", "caf\xe9 na\xefve r\xe9sum\xe9\n".encode("latin-1") * 20),
        ("utf8-bom", b"\xef\xbb\xbf" + good),
        ("truncated-json", good[: len(good) // 2]),
        ("top-level-list", b"[1, 2, 3]\n"),
        ("null-lines", b"null\nnull\n"),
        ("number-lines", b"5\n6.5\n-1e400\n"),
        ("text-number", rec(5) * 3),
        ("text-null", rec(None) * 3),
        ("text-list", rec(["a", "b"]) * 3),
        ("text-object", rec({"a": 1}) * 3),
        ("no-text-field", b'{"body": "hello there"}\n' * 3),
        ("deep-nesting", b'{"' + field.encode() + b'": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"),
        ("deep-nesting-top", b"[" * 200_000 + b"\n"),
        ("lone-surrogate", b'{"' + field.encode() + b'": "abc \\ud800 def ' + b"word " * 40 + b'"}\n' * 3),
        ("low-surrogate", b'{"' + field.encode() + b'": "\\udfff"}\n'),
        ("nul-bytes", rec("a\x00b\x00" * 50) * 3),
        ("control-only", rec("\x01\x02\x03\x7f" * 20) * 3),
        ("nan", b'{"' + field.encode() + b'": NaN}\n'),
        ("huge-number", b'{"' + field.encode() + b'": 1' + b"0" * 5000 + b"}\n"),
        ("duplicate-keys", b'{"' + field.encode() + b'": "a", "' + field.encode() + b'": 7}\n'),
        ("huge-key", b'{"' + b"k" * 1_000_000 + b'": 1}\n'),
        ("crlf", good.replace(b"\n", b"\r\n")),
        ("cr-only", good.replace(b"\n", b"\r")),
        # 200 kB in one record (the 16 MB cap on a line is tested in tests/test_hostile.py)
        ("one-huge-line", rec("word " * 40_000)),
        ("ansi-escapes", rec("\x1b[31mred\x1b[0m \x1b]0;title\x07 text " * 30) * 3),
        ("bidi-and-zero-width", rec("\u202e\u200b\ufeff abc \u2066 " * 50) * 3),
    ]
    cases += [(f"mutation-{i}", data) for i, data in enumerate(_mutations(good, 12, SEED))]
    return cases


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` and a hash of its bytes (symlinks by target)."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = "link:" + str(path.readlink())
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def written(path: Path, content: bytes) -> Path:
    """The hostile input, as the file a command is given."""
    path.write_bytes(content)
    return path


def check(proc, name: str) -> None:
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, (name, text[-3000:])
    if proc.returncode != 0:
        assert proc.stderr.strip(), (name, "non-zero exit without a message", proc.returncode)
        last = proc.stderr.strip().splitlines()[-1]
        assert len(last) < 2000, (name, "error line not bounded", len(last))


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """An earlier run's outputs and a file of the user's, made once; each test gets its own copy."""
    from llm_training.cli.infer import main as infer_main
    from llm_training.cli.main_job import cli_main as main_job

    root = tmp_path_factory.mktemp("earlier")
    (root / "precious.txt").write_text("the user's own notes\n")
    data = root / "corpus.jsonl"
    data.write_text("\n".join(_valid_lines(40)) + "\n")
    proc = call_cli(main_job, ["--input-file", str(data), "--output-dir", str(root / "run"), *TINY,
                               "--set", "training.max_steps=2", "--set", "training.sample_tokens=0"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    prompts = root / "prompts.jsonl"
    prompts.write_text('{"prompt": "the king"}\n{"prompt": "at dawn"}\n')
    model = root / "run" / "checkpoints" / "model_final.pt"
    proc = call_cli(infer_main, ["--model", str(model), "--input", str(prompts), "--output",
                                 str(root / "completions.jsonl"), "--max-new-tokens", "3"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return root


@pytest.fixture
def earlier(earlier_run, tmp_path):
    """This test's copy of the earlier run: (folder, its final checkpoint, digest of every file)."""
    import shutil

    root = shutil.copytree(earlier_run, tmp_path / "earlier", symlinks=True)
    return root, root / "run" / "checkpoints" / "model_final.pt", tree_digest(root)


def _unchanged(earlier) -> None:
    root, _, before = earlier
    after = tree_digest(root)
    changed = {k for k in before if after.get(k) != before[k]}
    assert not changed, ("outputs of the earlier run changed or removed", sorted(changed))


DATA = data_cases()


@pytest.mark.parametrize("name, content", DATA, ids=[n for n, _ in DATA])
def test_prepare_data(name, content, tmp_path, earlier):
    from llm_training.cli.prepare_data import main

    src = written(tmp_path / "in.jsonl", content)
    root = earlier[0]
    # half the cases aim the output at the earlier run's folder: refused or replaced only with its own folder
    output = root / "run" if zlib.crc32(name.encode()) % 2 else tmp_path / "out"
    proc = call_cli(main, ["--input", str(src), "--output", str(output), "--vocab-size", "300", "--quiet"])
    check(proc, name)
    if output == root / "run":
        _unchanged(earlier)


@pytest.mark.parametrize("name, content", DATA[::3], ids=[n for n, _ in DATA[::3]])
def test_main_job(name, content, tmp_path, earlier):
    from llm_training.cli.main_job import cli_main as main

    src = written(tmp_path / "in.jsonl", content)
    proc = call_cli(main, ["--input-file", str(src), "--output-dir", str(earlier[0]), *TINY,
                           "--set", "training.max_steps=1", "--set", "training.sample_tokens=0"])  # fmt: skip
    check(proc, name)
    _unchanged(earlier)


EVAL = data_cases() + [
    ("choices-not-list", b'{"prompt": "q", "choices": 5, "answer": 0}\n'),
    ("answer-out-of-range", b'{"prompt": "q", "choices": ["a", "b"], "answer": 99}\n'),
    ("answer-negative", b'{"prompt": "q", "choices": ["a", "b"], "answer": -1}\n'),
    ("choices-empty", b'{"prompt": "q", "choices": [], "answer": 0}\n'),
    ("choice-surrogate", b'{"prompt": "q", "choices": ["\\ud800", "b"], "answer": 0}\n'),
    ("label-object", b'{"text": "q", "label": {"x": 1}}\n{"text": "r", "label": [1]}\n'),
    ("mixed-kinds", b'{"text": "plain"}\n{"prompt": "q", "choices": ["a"], "answer": 0}\n'),
    ("json-array-of-junk", b'{"data": [1, null, "x", {"text": 3}]}'),
]


@pytest.mark.parametrize("name, content", EVAL, ids=[n for n, _ in EVAL])
def test_evaluate(name, content, tmp_path, earlier):
    from llm_training.cli.evaluate import main

    _, model, _ = earlier
    src = written(tmp_path / ("test.json" if name.startswith("json-") else "test.jsonl"), content)
    proc = call_cli(main, ["--model-path", str(model), "--test-data", str(src),
                           "--output", str(tmp_path / "results.json")])  # fmt: skip
    check(proc, name)
    _unchanged(earlier)


INFER = data_cases("prompt") + [
    ("max-new-tokens-huge", b'{"prompt": "x", "max_new_tokens": 1000000000}\n'),
    ("max-new-tokens-negative", b'{"prompt": "x", "max_new_tokens": -5}\n'),
    ("max-new-tokens-string", b'{"prompt": "x", "max_new_tokens": "many"}\n'),
    ("max-new-tokens-float", b'{"prompt": "x", "max_new_tokens": 2.5}\n'),
    ("max-new-tokens-bool", b'{"prompt": "x", "max_new_tokens": true}\n'),
    ("id-object", b'{"prompt": "x", "id": {"a": [1]}}\n'),
    ("json-string-lines", b'"just a prompt"\n"\\ud800"\n'),
]


@pytest.mark.parametrize("name, content", INFER, ids=[n for n, _ in INFER])
def test_infer(name, content, tmp_path, earlier):
    from llm_training.cli.infer import main

    root, model, _ = earlier
    src = written(tmp_path / "prompts.jsonl", content)
    proc = call_cli(main, ["--model", str(model), "--input", str(src), "--output", str(tmp_path / "out.jsonl"),
                           "--max-new-tokens", "2"])  # fmt: skip
    check(proc, name)
    # another job's completions are never appended to or rewritten by a job with other prompts
    proc = call_cli(main, ["--model", str(model), "--input", str(src), "--output",
                           str(root / "completions.jsonl"), "--max-new-tokens", "2"])  # fmt: skip
    check(proc, name + " (into another job's output)")
    _unchanged(earlier)


def config_cases() -> list[tuple[str, str]]:
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8)
    )
    cases = [
        ("empty", ""),
        ("not-yaml", "model: [unclosed\n  - : : :\n"),
        ("top-level-list", "- 1\n- 2\n"),
        ("top-level-scalar", "42\n"),
        ("billion-laughs", laughs + "training:\n  batch_size: *i\n"),
        ("python-tag", "model: !!python/object/apply:os.system ['echo pwned > pwned.txt']\n"),
        ("unknown-section", "modle:\n  num_layers: 2\n"),
        ("unknown-key", "model:\n  num_layerz: 2\n"),
        ("section-not-mapping", "model: 5\n"),
        ("wrong-type", "model:\n  num_layers: two\n"),
        ("list-for-int", "model:\n  num_layers: [2]\n"),
        ("nan", "training:\n  learning_rate: .nan\n"),
        ("inf", "training:\n  learning_rate: .inf\n"),
        ("negative-batch", "training:\n  batch_size: -8\n"),
        ("zero-layers", "model:\n  num_layers: 0\n"),
        ("absurd-vocab", "model:\n  vocab_size: 2000000000\n"),
        ("absurd-width", "model:\n  hidden_size: 1048576\n"),
        ("absurd-context", "model:\n  max_seq_length: 100000000\n"),
        ("huge-int", "training:\n  max_steps: 1" + "0" * 400 + "\n"),
        ("bool-for-float", "training:\n  learning_rate: yes\n"),
        ("heads-not-dividing", "model:\n  hidden_size: 64\n  num_attention_heads: 7\n"),
        ("deep-nesting", "model: " + "[" * 5000 + "]" * 5000 + "\n"),
        ("long-value", "model:\n  style: " + "x" * 1_000_000 + "\n"),
        ("tabs", "model:\n\tnum_layers: 2\n"),
        ("binary", "\x00\x01\x02\xff"),
        ("surrogate-escape", 'model:\n  style: "\\ud800"\n'),
        ("duplicate-keys", "model:\n  num_layers: 2\n  num_layers: 3\n"),
    ]
    return cases


CONFIGS = config_cases()


@pytest.mark.parametrize("name, text", CONFIGS, ids=[n for n, _ in CONFIGS])
def test_train_config(name, text, tmp_path, earlier):
    from llm_training.cli.train import main

    root, _, _ = earlier
    cfg = tmp_path / "config.yaml"
    cfg.write_bytes(text.encode("utf-8", "surrogatepass"))
    proc = call_cli(main, ["--config", str(cfg), "--data-dir", str(root / "run" / "prepared_data"),
                           "--output-dir", str(tmp_path / "out"), "--max-steps", "1"])  # fmt: skip
    check(proc, name)
    assert not (tmp_path / "pwned.txt").exists() and not Path("pwned.txt").exists()
    _unchanged(earlier)


def server_cases() -> list[tuple[str, str, bytes, dict]]:
    j = {"content-type": "application/json"}
    cases = [
        ("predict-not-json", "/predict", b"not json", j),
        ("predict-empty", "/predict", b"", j),
        ("predict-list", "/predict", b"[1,2]", j),
        ("predict-prompt-number", "/predict", b'{"prompt": 5}', j),
        ("predict-surrogate", "/predict", b'{"prompt": "a\\ud800b"}', j),
        ("predict-deep", "/predict", b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", j),
        ("predict-huge-tokens", "/predict", b'{"prompt": "x", "max_new_tokens": 1000000000}', j),
        ("predict-negative-tokens", "/predict", b'{"prompt": "x", "max_new_tokens": -1}', j),
        ("predict-nan-temperature", "/predict", b'{"prompt": "x", "temperature": NaN}', j),
        ("predict-wrong-content-type", "/predict", b'{"prompt": "x"}', {"content-type": "text/plain"}),
        ("predict-latin1-body", "/predict", '{"prompt": "café"}'.encode("latin-1"), j),
        ("completions-stop-flood", "/v1/completions",
         json.dumps({"prompt": "x", "max_tokens": 2, "stop": ["s" * 10] * 80_000}).encode(), j),
        ("completions-stop-surrogate", "/v1/completions", b'{"prompt": "x", "stop": ["\\udc00"]}', j),
        ("completions-n-huge", "/v1/completions", b'{"prompt": "x", "n": 100000}', j),
        ("completions-prompt-list-junk", "/v1/completions", b'{"prompt": [1, null, {}]}', j),
        ("completions-stream-junk", "/v1/completions", b'{"prompt": "x", "stream": "yes please"}', j),
        ("completions-model-surrogate", "/v1/completions", b'{"prompt": "x", "model": "\\ud800"}', j),
        ("completions-top-p-string", "/v1/completions", b'{"prompt": "x", "top_p": "high"}', j),
        ("completions-huge-number", "/v1/completions", b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", j),
        ("completions-dup-keys", "/v1/completions", b'{"prompt": "x", "prompt": 7}', j),
    ]  # fmt: skip
    rng = random.Random(SEED)
    good = b'{"prompt": "the king said", "max_tokens": 3}'
    for i in range(10):
        cases.append(
            (f"mutated-{i}", rng.choice(["/predict", "/v1/completions"]), _mutations(good, 1, i)[0], j)
        )
    return cases


SERVER = server_cases()


@pytest.fixture(scope="module")
def server(earlier_run):
    import os
    import subprocess
    import sys

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_training.cli.serve", "--model", str(earlier_run / "run" / "checkpoints" / "model_final.pt"), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=300)


@pytest.mark.parametrize("name, path, body, headers", SERVER, ids=[c[0] for c in SERVER])
def test_server(name, path, body, headers, server):
    import httpx

    url, proc = server
    r = httpx.post(url + path, content=body, headers=headers, timeout=120)
    assert r.status_code != 500 and r.status_code < 600, (name, r.status_code, r.text[:500])
    if r.status_code >= 400:
        assert "error" in r.json(), (name, r.text[:500])
        assert len(r.text) < 20_000, (name, "error body not bounded")
    assert httpx.get(url + "/health", timeout=60).status_code == 200
    assert proc.poll() is None
