"""llm-validate-data and llm-analyze-data on real prepared folders, the page checked in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_user_error, corpus_records, run_cli
from llm_training.cli import analyze_data, validate_data
from llm_training.data.inspect import (
    CHECKS,
    js_divergence,
    length_outliers,
    open_prepared,
    parse_checks,
    validate,
)
from llm_training.data.prepare import is_validation, prepare_documents
from llm_training.data.sources import Document
from llm_training.errors import DataError

SECTION_TITLES = (
    "Summary",
    "Document lengths",
    "Token frequency",
    "Quality scores",
    "Deduplication and filtering",
)


def _fortunes(limit: int | None = None, predicate=None) -> list[Document]:
    return [Document(r["id"], r["text"]) for r in corpus_records("fortunes", limit, predicate)]


def _computers_and_cookies(record: dict) -> bool:
    """About 1,200 fortunes; 'cookie' repeats some of 'computers' exactly or nearly."""
    category, _, number = record["id"].partition("/")
    return category == "computers" or (category == "cookie" and int(number) < 150)


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory) -> Path:
    """Fortune cookies, quality-filtered and deduplicated: real, messy text that preparation cleaned up
    (it drops low-quality, exact and near-duplicate documents)."""
    out = tmp_path_factory.mktemp("clean") / "prepared"
    prepare_documents(
        _fortunes(predicate=_computers_and_cookies),
        out,
        vocab_size=512,
        min_quality=0.5,
        deduplicate=True,
        validation_fraction=0.1,
        workers=1,
    )
    return out


@pytest.fixture(scope="module")
def contaminated_dir(tmp_path_factory) -> Path:
    """No deduplication, and copies of 12 training documents placed in the validation split."""
    docs = _fortunes(400)
    originals = [d for d in docs if not is_validation(d.id, 1234, 0.1)][:12]
    copies = [Document(f"copy/{d.id}", d.text) for d in originals]
    out = tmp_path_factory.mktemp("contaminated") / "prepared"
    prepare_documents(
        docs + copies,
        out,
        split_fn=lambda doc_id: doc_id.startswith("copy/") or is_validation(doc_id, 1234, 0.1),
        vocab_size=512,
        validation_fraction=0.1,
        workers=1,
    )
    return out


def _validate(capsys, *args: str) -> tuple[int, str]:
    code = validate_data.main(list(args))
    return code, capsys.readouterr().out


def _lines(out: str, status: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(status + " ")]


# ------------------------------------------------------------------------------------------ validate
def test_clean_folder_passes_every_check(clean_dir, capsys, tmp_path):
    report = tmp_path / "nested" / "findings.json"
    code, out = _validate(capsys, "--data-dir", str(clean_dir), "--json", str(report))
    assert code == 0, out
    assert not _lines(out, "FAIL"), out
    for name in (
        "integrity/integrity",
        "duplicates/contamination",
        "duplicates/exact_train",
        "quality/mean",
        "distribution/js_divergence",
        "distribution/bytes_per_token",
        "distribution/validation_split",
    ):
        assert any(line.startswith(f"PASS {name}:") for line in out.splitlines()), (name, out)
    assert "sha256" in out and out.strip().splitlines()[-1].startswith("PASS: ")
    data = json.loads(report.read_text())
    assert data["status"] == "PASS" and data["checks"] == list(CHECKS)
    assert data["thresholds"]["max_duplicate_fraction"] == 0.01
    assert {f["check"] for f in data["findings"]} == set(CHECKS)


def test_contamination_and_duplicates_fail(contaminated_dir, capsys):
    code, out = _validate(capsys, "--data-dir", str(contaminated_dir), "--checks", "duplicates")
    assert code == 1, out
    (contamination,) = [line for line in _lines(out, "FAIL") if "duplicates/contamination" in line]
    assert int(re.search(r"contamination: (\d+) of", contamination).group(1)) >= 12
    # only integrity and the named check ran
    assert {line.split()[1].split("/")[0] for line in out.splitlines()[:-1]} == {"integrity", "duplicates"}
    prepared = open_prepared(contaminated_dir / "validation.json")
    assert prepared.selected == "validation"


def test_thresholds_come_from_the_flags(clean_dir, capsys):
    code, out = _validate(
        capsys,
        "--data-dir",
        str(clean_dir),
        "--checks",
        "quality",
        "--min-quality",
        "0.99",
        "--max-low-quality-fraction",
        "0.01",
    )
    assert code == 1 and any("quality/low_quality" in line for line in _lines(out, "FAIL")), out
    code, out = _validate(
        capsys, "--data-dir", str(clean_dir), "--checks", "distribution", "--max-token-share", "0.001"
    )
    assert code == 1 and any("top_token_train" in line for line in _lines(out, "FAIL")), out


def _corrupt(folder: Path, how: str) -> None:
    shard = folder / "train_000000.bin"
    if how == "flip":
        data = bytearray(shard.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 64):
            data[i] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif how == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif how == "table":
        table = np.load(folder / "train_documents.npy")
        table["offset"][5] += 3
        np.save(folder / "train_documents.npy", table)


@pytest.mark.parametrize(
    ("how", "needle", "skipped"),
    [("flip", "sha256", False), ("truncate", "bytes, expected", True), ("table", "do not tile", True)],
)
def test_corrupted_folder_fails_integrity(clean_dir, tmp_path, capsys, how, needle, skipped):
    broken = tmp_path / "broken"
    shutil.copytree(clean_dir, broken)
    _corrupt(broken, how)
    code, out = _validate(capsys, "--data-dir", str(broken))
    assert code == 1, out
    assert any(needle in line for line in _lines(out, "FAIL") if "integrity/" in line), out
    assert bool(_lines(out, "SKIP")) == skipped, out


def test_bad_input_exits_2(tmp_path, clean_dir):
    proc = run_cli(
        ["-m", "llm_training.cli.validate_data", "--data-dir", str(tmp_path / "missing")], tmp_path
    )
    assert_user_error(proc, "not found", "missing")
    proc = run_cli(
        ["-m", "llm_training.cli.validate_data", "--data-dir", str(clean_dir), "--checks", "quality,speling"],
        tmp_path,
    )
    assert_user_error(proc, "'speling'", ", ".join(CHECKS))
    (tmp_path / "empty").mkdir()
    assert_user_error(
        run_cli(["-m", "llm_training.cli.validate_data", "--data-dir", str(tmp_path / "empty")], tmp_path),
        "manifest",
    )


def test_help_documents_every_flag():
    text = validate_data.build_parser().format_help()
    for flag in (
        "--data-dir",
        "--checks",
        "--min-quality",
        "--max-low-quality-fraction",
        "--min-mean-quality",
        "--max-duplicate-fraction",
        "--max-token-share",
        "--max-js-divergence",
        "--max-bytes-per-token-ratio",
        "--json",
    ):
        assert flag in text
    assert "Exit status" in text


def test_statistics_helpers():
    a = np.array([5, 3, 0, 2])
    assert js_divergence(a, a * 7) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(np.array([1, 0]), np.array([0, 1])) == pytest.approx(1.0)
    lengths = np.full(200, 100)
    lengths[[3, 7]] = [100_000, 1]
    out = length_outliers(lengths)
    assert out["count"] == 2 and out["long"] == [3] and out["short"] == [7]
    assert parse_checks("duplicates") == ["integrity", "duplicates"]
    with pytest.raises(DataError, match="valid checks"):
        parse_checks("integrity,nope")


def test_validate_api_matches_the_counts(contaminated_dir):
    prepared = open_prepared(contaminated_dir)
    findings = {f.name: f for f in validate(prepared, ["duplicates", "quality"])}
    assert findings["contamination"].status == "FAIL" and findings["contamination"].value >= 12
    assert findings["mean"].status == "PASS"


# ------------------------------------------------------------------------------------------ analyze
@pytest.fixture(scope="module")
def analysis_html(clean_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("analysis") / "stats" / "deeper" / "analysis.html"
    proc = run_cli(
        [
            "-m",
            "llm_training.cli.analyze_data",
            "--data-file",
            str(clean_dir / "train.json"),
            "--output",
            str(output),
        ],
        clean_dir.parent,
    )
    assert proc.returncode == 0, proc.stderr
    assert output.is_file() and "wrote" in proc.stdout
    return output


def test_analysis_page_is_self_contained(analysis_html):
    page = analysis_html.read_text(encoding="utf-8")
    for title in SECTION_TITLES:
        assert f"<h2>{title}</h2>" in page
    assert page.count("<svg") >= 4
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I), "external reference"
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"""url\(\s*["']?(?!#)""", page), "url() to anything but an element of the page"
    # the only URLs are the SVG namespace names (xmlns), which a browser never fetches
    assert set(re.findall(r"https?://[^\s\"'>]+", page)) <= {
        "http://www.w3.org/2000/svg",
        "http://www.w3.org/1999/xlink",
    }
    # token text is escaped: end-of-text is among the top tokens of these short documents
    assert "&lt;|endoftext|&gt;" in page and "<|endoftext|>" not in page
    assert "Top 30 tokens" in page and "Near duplicates dropped" in page


def test_analyze_accepts_the_folder_and_rejects_bad_input(clean_dir, tmp_path, capsys):
    output = tmp_path / "a.html"
    assert analyze_data.main(["--data-file", str(clean_dir), "--output", str(output)]) == 0
    assert "<svg" in output.read_text(encoding="utf-8")
    proc = run_cli(
        ["-m", "llm_training.cli.analyze_data", "--data-file", str(tmp_path / "nope.json")], tmp_path
    )
    assert_user_error(proc, "nope.json")


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip(
            "chromium is not on PATH (Debian: apt-get install chromium); the page is checked in a real browser"
        )
    return path


def _browser(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_page_renders_in_chromium(analysis_html, tmp_path):
    proc = _browser(tmp_path, "--dump-dom", analysis_html.as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    for title in SECTION_TITLES:
        assert title in dom
    assert dom.count("<svg") >= 4
    assert "Top 30 tokens" in dom

    png = tmp_path / "page.png"
    proc = _browser(tmp_path, f"--screenshot={png}", "--window-size=1200,3000", analysis_html.as_uri())
    assert proc.returncode == 0 and png.is_file(), proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    from PIL import Image  # matplotlib's own dependency

    with Image.open(png) as image:
        assert image.size == (1200, 3000)
        pixels = np.asarray(image.convert("L"))
    assert (pixels < 128).mean() > 0.005  # text and plots drawn, not a blank page
