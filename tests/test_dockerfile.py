"""Dockerfile.prod, read without Docker: what it copies exists and survives .dockerignore, its install lines
name extras that pyproject.toml has, and its CMD is a command line that llm-serve's own parser accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of Dockerfile.prod, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile.prod").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        current += " " + line[:-1] if line.endswith("\\") else " " + line
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return [(x.split(None, 1)[0].upper(), x.split(None, 1)[1]) for x in lines]


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops ``relative`` (Docker's rules: Go globs from the context's root, ``**`` any
    number of folders, a pattern that matches a folder drops what is inside, the last match wins)."""

    def regex(pattern: str) -> re.Pattern:
        out = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
            out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        return re.compile(out + "(?:/.*)?")

    verdict = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if regex(pattern.lstrip("!")).fullmatch(relative):
            verdict = not negated
    return verdict


def test_the_ignore_rules_read_as_docker_reads_them():
    patterns = ["**/__pycache__", "*.pt", "tests", "!tests/keep.txt"]
    assert ignored("src/a/__pycache__/x.pyc", patterns) and ignored("model.pt", patterns)
    assert not ignored("src/model.pt", patterns) and ignored("tests/x.py", patterns)
    assert not ignored("tests/keep.txt", patterns) and not ignored("src/llm_training/cli/serve.py", patterns)


def test_copied_files_exist_and_are_not_ignored():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [shlex.split(args) for name, args in instructions() if name == "COPY"]
    assert copies
    for words in copies:
        sources = [w for w in words[:-1] if not w.startswith("--")]
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: not in the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            needed = [p for p in files if "__pycache__" not in p.parts and ".egg-info" not in str(p)]
            dropped = [
                str(p.relative_to(ROOT)) for p in needed if ignored(str(p.relative_to(ROOT)), patterns)
            ]
            assert needed and not dropped, f"COPY {source}: .dockerignore drops {dropped[:5]}"


def test_install_lines_name_extras_that_exist():
    extras = set(pyproject()["optional-dependencies"])
    runs = [args for name, args in instructions() if name == "RUN" and "pip install" in args]
    wanted = [x for args in runs for group in re.findall(r"\.\[([^\]]*)\]", args) for x in group.split(",")]
    assert wanted and set(wanted) <= extras, set(wanted) - extras
    assert {"serve", "export"} <= set(wanted)  # the server, and onnxruntime for ONNX exports


def test_the_command_parses_with_llm_serves_own_parser():
    from llm_training.cli.serve import build_parser

    steps = instructions()
    env = {}
    for name, args in steps:
        if name == "ENV":
            env.update(w.split("=", 1) for w in shlex.split(args))
    (command,) = [args for name, args in steps if name == "CMD"]
    words = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], command))
    assert words[:2] == ["exec", "llm-serve"]  # exec: the server is PID 1 and gets docker stop's SIGTERM
    assert pyproject()["scripts"]["llm-serve"] == "llm_training.cli.serve:main"
    args = build_parser().parse_args(words[2:])
    (exposed,) = [args for name, args in steps if name == "EXPOSE"]
    assert args.host == "0.0.0.0" and str(args.port) == exposed and args.model == env["MODEL_PATH"]
    health = next(a for name, a in steps if name == "HEALTHCHECK")
    assert f"127.0.0.1:{args.port}/health" in health
